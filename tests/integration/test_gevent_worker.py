"""The default pool: a real `celery worker --pool gevent` process (gevent cannot be
monkey-patched inside pytest, so it runs as a subprocess, on a queue of its own)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from app.config import Settings
from app.migrate import ROOT
from app.runtime import runtime
from tests.conftest import Tenant, job_row, undispatched_job, wait_until

QUEUE = "conveyor-gevent-test"


@pytest.fixture(scope="module")
def gevent_worker(settings: Settings, app) -> Iterator[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "OPENAI_BASE_URL": settings.openai_base_url or "",
        "OPENAI_API_KEY": "sim",
        "CONVEYOR_WORKER_CONCURRENCY": "20",
        "CONVEYOR_LOG_LEVEL": "WARNING",
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.celery_app",
            "worker",
            "--pool",
            "gevent",
            "-Q",
            QUEUE,
            "--loglevel",
            "WARNING",
            "-n",
            f"gevent-{uuid.uuid4().hex}@%h",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    yield process
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_on_gevent(job_id: uuid.UUID) -> None:
    runtime().celery.send_task("conveyor.run_job", args=[str(job_id)], queue=QUEUE)


def test_a_gevent_worker_reports_its_heartbeat_while_idle(tenant: Tenant, gevent_worker) -> None:
    """Its heartbeat starts with the worker (a bootstep), not with its first job: this runs
    before any job has been sent to it."""

    def gevent_workers() -> int:
        workers = tenant.client.get("/api/v1/health").get_json()["components"]["workers"]
        return workers["pools"].get("gevent", 0)

    assert wait_until(gevent_workers, timeout=60) == 1  # includes the worker's start-up


def test_a_gevent_worker_runs_a_job(tenant: Tenant, gevent_worker) -> None:
    job_id = undispatched_job(tenant.owner)
    run_on_gevent(job_id)
    job = tenant.wait_for(str(job_id), timeout=60)  # includes the worker's start-up
    assert job["status"] == "succeeded", job
    assert job_row(job_id).worker.endswith(f":{gevent_worker.pid}")
    assert tenant.get(f"/api/v1/jobs/{job_id}/result").get_json()["output"]["text"]


def test_a_gevent_worker_cancels_a_running_stream(tenant: Tenant, gevent_worker) -> None:
    job_id = undispatched_job(tenant.owner, prompt="long [[sim tokens=400 tps=20]]")
    run_on_gevent(job_id)
    tenant.wait_for(str(job_id), "running", timeout=60)
    wait_until(lambda: tenant.get(f"/api/v1/jobs/{job_id}/events?after=2").get_json()["items"])
    assert tenant.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 202
    job = tenant.wait_for(str(job_id), timeout=5)
    assert job["status"] == "canceled"
    result = tenant.get(f"/api/v1/jobs/{job_id}/result").get_json()
    assert result["output"]["partial_text"] and 0 < result["usage"]["tokens_out"] < 400
