"""GET /metrics with metrics off (the tests' settings set no CONVEYOR_METRICS_TOKEN, and
without one the endpoint is not served), and what the sweeper records. tests/chaos/test_metrics.py
scrapes a running stack with a real Prometheus."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from flask import Flask
from prometheus_client import REGISTRY
from sqlalchemy import func, update

from app.models import Job
from app.runtime import runtime
from tests.conftest import undispatched_job

RECOVERIES = "conveyor_lease_recoveries_total"


def test_metrics_are_off_without_a_token(app: Flask) -> None:
    assert app.extensions["conveyor"].settings.metrics_token is None
    answer = app.test_client().get("/metrics", headers={"Authorization": "Bearer anything"})
    assert answer.status_code == 404
    assert answer.content_type == "application/problem+json"
    assert "CONVEYOR_METRICS_TOKEN" in answer.get_json()["detail"]


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def lost_worker_job(owner: str, kind: str, **row: Any) -> uuid.UUID:
    """A job claimed by a worker that then died: its lease has run out."""
    job_id = undispatched_job(owner, kind=kind)
    assert runtime().jobs.claim_job(job_id, "worker-that-died") is not None
    with runtime().db.transaction() as session:
        values = {"lease_expires_at": func.now() - timedelta(seconds=1), **row}
        session.execute(update(Job).where(Job.id == job_id).values(**values))
    return job_id


def test_the_sweepers_recoveries_and_expiries_are_counted(app: Flask) -> None:
    """Through the real state machine on the tests' PostgreSQL (this process's own values):
    the sweeper's three lease recoveries and a queued job past its expiry. Kinds of this test's
    own keep the kind-labelled counts exact."""
    owner = f"tenant-{uuid.uuid4().hex[:10]}"
    lost, gone, expired = (f"probe-{uuid.uuid4().hex[:6]}" for _ in range(3))
    recoveries = {o: sample(RECOVERIES, outcome=o) for o in ("requeued", "failed", "canceled")}
    sweeps = sample("conveyor_sweeps_total")

    lost_worker_job(owner, lost)
    lost_worker_job(owner, gone, attempt=3)
    lost_worker_job(owner, gone, cancel_requested_at=func.now())
    expiring = undispatched_job(owner, kind=expired)
    with runtime().db.transaction() as session:
        past = func.now() - timedelta(seconds=1)
        session.execute(update(Job).where(Job.id == expiring).values(expires_at=past))
    assert sample("conveyor_job_queue_wait_seconds_count", kind=lost) == 1  # its claim

    runtime().jobs.sweep()

    for outcome in ("requeued", "failed", "canceled"):
        assert sample(RECOVERIES, outcome=outcome) >= recoveries[outcome] + 1
    assert sample("conveyor_sweeps_total") >= sweeps + 1
    assert sample("conveyor_job_retries_total", kind=lost, code="worker_lost") == 1
    finished = "conveyor_jobs_finished_total"
    assert sample(finished, kind=gone, status="failed", tenant="") == 1
    assert sample(finished, kind=gone, status="canceled", tenant="") == 1
    assert sample("conveyor_job_duration_seconds_count", kind=gone, status="failed") == 1
    # Expired while queued, never started: finished, with no duration.
    assert sample(finished, kind=expired, status="failed", tenant="") == 1
    assert sample("conveyor_job_duration_seconds_count", kind=expired, status="failed") == 0
