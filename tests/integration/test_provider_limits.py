"""Pool-wide provider limits with the real worker, Redis, PostgreSQL and the simulator over HTTP:
each limit crossed, a provider's 429 pausing the pool without burning attempts, the circuit
breaker, and the waiting job as the API shows it. Each test has a model of its own, whose limits
tests/conftest.py configures (TEST_PROVIDER_LIMITS) with periods of a few seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

from app.config import Settings
from app.migrate import ROOT
from app.runtime import runtime
from devtools.simprocess import SimulatorProcess
from tests.conftest import TEST_PROVIDER_LIMITS, Tenant, job_row, wait_until

pytestmark = pytest.mark.usefixtures("worker", "sweeper")


@pytest.fixture
def sweeper() -> Iterator[None]:
    """The beat's sweep, every half second: it publishes the deferred jobs whose turn came."""
    jobs, stop = runtime().jobs, threading.Event()

    def sweep() -> None:
        while not stop.wait(0.5):
            jobs.sweep()

    thread = threading.Thread(target=sweep, name="test-sweeper", daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def second_worker(settings: Settings, app: Flask) -> Iterator[None]:
    """Another worker process (gevent, the production pool) on the tests' queue, with the same
    provider limits: the limits must hold across processes, not only across threads."""
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "OPENAI_BASE_URL": settings.openai_base_url or "",
        "OPENAI_API_KEY": "sim",
        "CONVEYOR_PROVIDER_LIMITS": json.dumps(TEST_PROVIDER_LIMITS),
        "CONVEYOR_WORKER_CONCURRENCY": "20",
        "CONVEYOR_LOG_LEVEL": "WARNING",
    }
    command = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker"]
    command += ["--pool", "gevent", "-Q", "conveyor", "--loglevel", "WARNING"]
    command += ["-n", f"limits-{uuid.uuid4().hex}@%h"]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    client = app.test_client()

    def gevent_worker_up() -> bool:
        health = client.get("/api/v1/health").get_json()
        return health["components"]["workers"]["pools"].get("gevent", 0) >= 1

    try:
        wait_until(gevent_worker_up, timeout=90)
        yield
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def submit(tenant: Tenant, model: str, prompt: str, **job_input: Any) -> str:
    """A chat job on `model`, which the API would not let a request name (tests only)."""
    created = runtime().jobs.create_job(
        owner=tenant.owner,
        kind="chat",
        input={"prompt": prompt, **job_input},
        model=model,
    )
    return str(created.job.id)


def arrivals(sim: SimulatorProcess, tag: str) -> list[dict[str, Any]]:
    return sorted(sim.requests(tag), key=lambda item: item["at"])


def most_in_any_window(times: list[float], window: float) -> int:
    return max(
        (sum(1 for other in times if start <= other < start + window) for start in times),
        default=0,
    )


def test_the_request_limit_holds_across_the_pool_and_costs_no_attempt(
    tenant: Tenant, simulator: SimulatorProcess, second_worker: None
) -> None:
    """pl-rpm: 3 requests per 4 s. Twelve jobs at once, four windows' worth, run by two worker
    processes."""
    tag = f"rpm-{uuid.uuid4().hex[:8]}"
    ids = [submit(tenant, "pl-rpm", f"job {n} [[sim tag={tag} tokens=5]]") for n in range(12)]
    jobs = [tenant.wait_for(job_id, timeout=120) for job_id in ids]
    assert [job["status"] for job in jobs] == ["succeeded"] * 12
    assert all(job["attempt"] == 1 and job["max_attempts"] == 3 for job in jobs)
    assert all(job["waiting"] is None for job in jobs)
    times = [item["at"] for item in arrivals(simulator, tag)]
    assert len(times) == 12
    # The limiter stamps a call when it sends it; the simulator sees it a network hop and a
    # scheduling delay later, which on a loaded test machine has reached a few hundred ms: so
    # the simulator is held to a window 1 s shorter than the period (unlimited, all twelve
    # would arrive within about a second), and the span below shows the pacing.
    assert most_in_any_window(times, 3.0) <= 3
    assert times[-1] - times[0] >= 11.5  # four windows: 0, 4, 8 and 12 s
    processes = {job_row(uuid.UUID(job_id)).worker for job_id in ids}
    assert len(processes) == 2, processes


def test_a_waiting_job_shows_its_reason_stays_queued_and_keeps_attempt_zero(
    tenant: Tenant,
) -> None:
    """pl-wait: 1 request per 6 s. The second job waits longer than a slot may."""
    first = submit(tenant, "pl-wait", "first [[sim tokens=3]]")
    assert tenant.wait_for(first, timeout=30)["status"] == "succeeded"
    second = submit(tenant, "pl-wait", "second [[sim tokens=3]]")

    def waiting() -> dict[str, Any] | None:
        job = tenant.get(f"/api/v1/jobs/{second}").get_json()
        return job if job["waiting"] is not None else None

    job = wait_until(waiting, timeout=20)
    assert job["status"] == "queued"
    assert job["attempt"] == 0
    assert job["waiting"]["reason"] == "provider_rate_limit"
    assert job["waiting"]["endpoint"] == "pl-wait"
    assert job["waiting"]["until"] == job["run_at"]
    listed = tenant.get("/api/v1/jobs?status=queued").get_json()["items"]
    assert [item["waiting"]["reason"] for item in listed if item["id"] == second] == [
        "provider_rate_limit"
    ]
    done = tenant.wait_for(second, timeout=40)
    assert done["status"] == "succeeded"
    assert done["attempt"] == 1
    assert done["waiting"] is None


def test_the_token_limit_counts_the_estimate_and_reconciles_with_the_usage(
    tenant: Tenant, simulator: SimulatorProcess
) -> None:
    """pl-tpm: 300 tokens per 5 s. Each job is estimated at about 130 tokens (max_tokens 100
    and its input) and uses about 20: two fit at once, the third waits, and the log of the
    window ends up holding what the calls reported."""
    tag = f"tpm-{uuid.uuid4().hex[:8]}"
    ids = [
        submit(tenant, "pl-tpm", f"job {n} [[sim tag={tag} tokens=10]]", max_tokens=100)
        for n in range(3)
    ]
    jobs = [tenant.wait_for(job_id, timeout=60) for job_id in ids]
    assert [job["status"] for job in jobs] == ["succeeded"] * 3
    times = [item["at"] for item in arrivals(simulator, tag)]
    assert times[2] - times[0] >= 3.0  # the third waited for the first to leave the window
    limits = runtime().model_client.limits
    assert limits is not None
    log = runtime().redis.zrange(limits.key("pl-tpm", "log"), 0, -1)
    counted = sorted(int(member.decode().rsplit(":", 1)[1]) for member in log)
    used = sorted(job["usage"]["tokens_in"] + job["usage"]["tokens_out"] for job in jobs)
    # Calls older than the period have left the log; those left count what they used.
    assert counted
    assert set(counted) <= set(used)
    assert max(counted) < 100


def test_a_provider_429_pauses_the_pool_once_and_burns_no_attempt(
    tenant: Tenant, simulator: SimulatorProcess
) -> None:
    """The simulator allows 3 requests per 5 s for pl-pause; Conveyor's own limit says 4, so
    the fourth call gets the provider's 429: the endpoint pauses for every process until its
    Retry-After, the job goes back to queued with its attempt given back, and the jobs behind
    it wait instead of calling."""
    limits = runtime().model_client.limits
    assert limits is not None
    pauses_before = limits.stats("pl-pause").get("pauses", 0)
    simulator.configure(rate_limits={"pl-pause": {"rpm": 3, "period": 5}})
    tag = f"pause-{uuid.uuid4().hex[:8]}"
    try:
        ids = [submit(tenant, "pl-pause", f"job {n} [[sim tag={tag} tokens=3]]") for n in range(8)]
        jobs = [tenant.wait_for(job_id, timeout=120) for job_id in ids]
    finally:
        simulator.configure(rate_limits={})
    assert [job["status"] for job in jobs] == ["succeeded"] * 8
    # Every job has the attempts it started with: a 429's attempt was given back.
    assert all(job["max_attempts"] - job["attempt"] == 2 for job in jobs)
    outcomes = [item["outcome"] for item in arrivals(simulator, tag)]
    rejected = outcomes.count("rate_limited")
    pauses = limits.stats("pl-pause").get("pauses", 0) - pauses_before
    assert rejected >= 1
    assert pauses >= 1
    assert rejected <= pauses  # at most one 429 per pause
    assert outcomes.count("ok") == 8
    retried = [job for job in jobs if job["attempt"] > 1]
    assert retried
    events = tenant.get(f"/api/v1/jobs/{retried[0]['id']}/events?after=0").get_json()
    codes = [event["data"].get("error", {}).get("code") for event in events["items"]]
    assert "provider_paused" in codes


def test_the_breaker_opens_after_consecutive_failures_probes_half_open_and_closes(
    tenant: Tenant,
) -> None:
    """pl-breaker: open after 2 consecutive 5xx, for 3 s."""
    limits = runtime().model_client.limits
    assert limits is not None
    opened_before = limits.stats("pl-breaker").get("opened", 0)
    broken = submit(tenant, "pl-breaker", f"down {uuid.uuid4()} [[sim fault=500 times=100]]")
    failed = tenant.wait_for(broken, timeout=30)
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "model_unavailable"
    assert limits.stats("pl-breaker").get("opened", 0) - opened_before >= 1
    # Open: the next job waits (no call, no attempt) ...
    flaky = submit(tenant, "pl-breaker", f"flaky {uuid.uuid4()} [[sim fault=500 times=1]]")

    def waiting() -> dict[str, Any] | None:
        job = tenant.get(f"/api/v1/jobs/{flaky}").get_json()
        return job if job["waiting"] is not None else None

    job = wait_until(waiting, timeout=20)
    assert job["waiting"]["reason"] == "circuit_open"
    assert job["attempt"] == 0
    # ... and is the half-open probe after the cooldown: it fails (the breaker opens again),
    # its retry waits out the next cooldown, probes again, succeeds and closes the breaker.
    done = tenant.wait_for(flaky, timeout=60)
    assert done["status"] == "succeeded"
    assert done["attempt"] == 2
    assert limits.stats("pl-breaker").get("opened", 0) - opened_before >= 2
    assert not runtime().redis.exists(limits.key("pl-breaker", "breaker"))
    healthy = submit(tenant, "pl-breaker", "healthy [[sim tokens=3]]")
    assert tenant.wait_for(healthy, timeout=20)["status"] == "succeeded"


def test_the_simulator_refuses_a_bad_rate_limit(simulator: SimulatorProcess) -> None:
    from devtools.simprocess import SimulatorError

    with pytest.raises(SimulatorError, match="rpm"):
        simulator.configure(rate_limits={"m": {"rpm": 0}})
