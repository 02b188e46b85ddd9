"""A job's time: `run_at` (kept in PostgreSQL, published by the sweeper once due, refused by
the claim before), `expires_after` (a job still queued then fails `expired`) and
`timeout_seconds` (the attempt's own time limit). Against the real PostgreSQL, Redis, Celery
worker and simulator; the sweeps are called directly, as beat would call them."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import event, func, update

from app.models import Job
from app.runtime import runtime
from tests.conftest import Tenant, job_row, undispatched_job, wait_until

pytestmark = pytest.mark.usefixtures("worker")

DAY = 86_400


def iso(instant: datetime) -> str:
    return instant.isoformat()


def in_seconds(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def events_of(tenant: Tenant, job_id: str) -> list[dict[str, Any]]:
    return tenant.get(f"/api/v1/jobs/{job_id}/events?after=0").get_json()["items"]


def wait_for_the_clock(instant: datetime) -> None:
    """Until this process's clock (and so PostgreSQL's, on this host) has passed `instant`."""
    wait_until(lambda: datetime.now(UTC) > instant, timeout=30)


def field_of(response: Any) -> str:
    assert response.status_code == 422, response.get_json()
    problem = response.get_json()
    assert problem["type"] == "/problems/validation-error"
    return problem["errors"][0]["field"]


# run_at ----------------------------------------------------------------------------------------


def test_a_scheduled_job_is_not_claimed_before_its_run_at_and_runs_after_a_sweep(
    tenant: Tenant,
) -> None:
    run_at = in_seconds(3)
    job = tenant.submit("chat", {"prompt": f"later {uuid.uuid4()}"}, run_at=iso(run_at))
    job_id = uuid.UUID(job["id"])
    assert job["status"] == "queued"
    assert datetime.fromisoformat(job["run_at"]) == run_at
    # Stored, not published: the republish of unclaimed jobs never sees it either.
    assert job_row(job_id).dispatched_at is None
    # An early delivery (a duplicate, a message sent by hand) starts nothing.
    assert runtime().jobs.claim_job(job_id, "too-early") is None
    assert runtime().jobs.dispatch(job_id)
    # A sweep before it is due leaves it alone.
    runtime().jobs.sweep()
    row = job_row(job_id)
    assert (row.status, row.attempt, row.dispatched_at) == ("queued", 0, None)
    queued = events_of(tenant, str(job_id))[0]
    assert queued["type"] == "job.queued"
    assert datetime.fromisoformat(queued["data"]["run_at"]) == run_at

    wait_for_the_clock(run_at)
    wait_until(lambda: (runtime().jobs.sweep(), job_row(job_id).dispatched_at)[1], timeout=20)
    done = tenant.wait_for(str(job_id))
    assert done["status"] == "succeeded" and done["attempt"] == 1
    assert datetime.fromisoformat(done["started_at"]) >= run_at


def test_a_run_at_that_has_just_passed_runs_at_once(tenant: Tenant) -> None:
    job = tenant.submit("chat", {"prompt": "now"}, run_at=iso(in_seconds(-60)))
    assert job_row(uuid.UUID(job["id"])).dispatched_at is not None
    assert tenant.wait_for(job["id"])["status"] == "succeeded"


def test_a_scheduled_job_can_be_canceled_and_is_then_never_published(tenant: Tenant) -> None:
    job = tenant.submit("chat", {"prompt": "never"}, run_at=iso(in_seconds(3600)))
    canceled = tenant.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert canceled.status_code == 200 and canceled.get_json()["status"] == "canceled"
    job_id = uuid.UUID(job["id"])
    with runtime().db.transaction() as session:
        session.execute(update(Job).where(Job.id == job_id).values(run_at=func.now()))
    runtime().jobs.sweep()
    row = job_row(job_id)
    assert (row.status, row.dispatched_at, row.attempt) == ("canceled", None, 0)
    types = [e["type"] for e in events_of(tenant, job["id"])]
    assert types == ["job.queued", "job.canceled"]


def test_a_retry_runs_now_with_the_same_expiry_and_timeout(tenant: Tenant) -> None:
    job = tenant.submit(
        "chat",
        {"prompt": "again"},
        run_at=iso(in_seconds(3600)),
        expires_after=600,
        timeout_seconds=5,
    )
    assert tenant.post(f"/api/v1/jobs/{job['id']}/cancel").status_code == 200
    retried = tenant.post(f"/api/v1/jobs/{job['id']}/retry")
    assert retried.status_code == 202, retried.get_json()
    clone = retried.get_json()
    assert clone["run_at"] is None and clone["timeout_seconds"] == 5
    created = datetime.fromisoformat(clone["created_at"])
    assert datetime.fromisoformat(clone["expires_at"]) == created + timedelta(seconds=600)
    assert tenant.wait_for(clone["id"])["status"] == "succeeded"


def test_the_sweep_publishes_due_jobs_one_statement_per_batch(tenant: Tenant) -> None:
    due = [undispatched_job(tenant.owner, prompt="due") for _ in range(25)]
    with runtime().db.transaction() as session:
        session.execute(
            update(Job)
            .where(Job.id.in_(due))
            .values(dispatched_at=None, run_at=func.now() - timedelta(seconds=1))
        )
    with statements_of_this_thread() as statements:
        report = runtime().jobs.sweep(batch=10)
    # Released through the owner's dispatch window (app/jobs/fairness.py): one UPDATE a batch.
    due_scans = [s for s in statements if "run_at <= now()" in s and "UPDATE jobs" in s]
    assert report.scheduled >= 25
    # Full batches, then the one that found fewer than a batch (none, after an exact multiple).
    assert len(due_scans) == report.scheduled // 10 + 1
    for job_id in due:
        assert tenant.wait_for(str(job_id))["status"] == "succeeded"


# expires_after ---------------------------------------------------------------------------------


def test_a_job_still_queued_at_its_expiry_fails_expired(tenant: Tenant) -> None:
    run_at = in_seconds(1)
    job = tenant.submit("chat", {"prompt": "stale"}, run_at=iso(run_at), expires_after=1)
    expires_at = datetime.fromisoformat(job["expires_at"])
    assert expires_at == run_at + timedelta(seconds=1)
    # Nobody swept while it was due (no beat runs here): once it has expired, the sweep fails
    # it instead of publishing it.
    wait_for_the_clock(expires_at)
    report = runtime().jobs.sweep()
    assert report.expired >= 1
    failed = tenant.get(f"/api/v1/jobs/{job['id']}").get_json()
    assert failed["status"] == "failed" and failed["attempt"] == 0
    assert failed["error"]["code"] == "expired"
    assert job_row(uuid.UUID(job["id"])).dispatched_at is None
    queued, last = events_of(tenant, job["id"])
    assert datetime.fromisoformat(queued["data"]["expires_at"]) == expires_at
    assert last["type"] == "job.failed"
    assert last["data"]["reason"] == "expired" and last["data"]["attempt"] == 0
    assert last["data"]["error"]["code"] == "expired"


def test_the_claim_refuses_an_expired_job(tenant: Tenant) -> None:
    job_id = undispatched_job(tenant.owner)
    with runtime().db.transaction() as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(expires_at=func.now() - timedelta(seconds=1))
        )
    # Before the sweeper gets to it, a delivery still starts nothing.
    assert runtime().jobs.claim_job(job_id, "too-late") is None
    assert job_row(job_id).status == "queued"
    runtime().jobs.sweep()
    row = job_row(job_id)
    assert (row.status, row.error_code, row.attempt) == ("failed", "expired", 0)


def test_a_job_that_starts_in_time_is_not_expired(tenant: Tenant) -> None:
    job = tenant.submit("chat", {"prompt": "in time"}, expires_after=60)
    assert tenant.wait_for(job["id"])["status"] == "succeeded"
    runtime().jobs.sweep()
    assert tenant.get(f"/api/v1/jobs/{job['id']}").get_json()["status"] == "succeeded"


def test_the_sweep_expires_one_statement_per_batch(tenant: Tenant) -> None:
    stale = [undispatched_job(tenant.owner, prompt="stale") for _ in range(25)]
    with runtime().db.transaction() as session:
        session.execute(
            update(Job)
            .where(Job.id.in_(stale))
            .values(expires_at=func.now() - timedelta(seconds=1))
        )
    with statements_of_this_thread() as statements:
        report = runtime().jobs.sweep(batch=10)
    expiries = [s for s in statements if "expires_at <= now()" in s]
    assert report.expired >= 25
    assert len(expiries) == report.expired // 10 + 1
    for job_id in stale:
        assert job_row(job_id).error_code == "expired"


# timeout_seconds -------------------------------------------------------------------------------


def test_timeout_seconds_fails_a_slow_job(tenant: Tenant) -> None:
    job = tenant.submit("chat", {"prompt": "slow [[sim tokens=200 duration=8]]"}, timeout_seconds=1)
    assert job["timeout_seconds"] == 1
    failed = tenant.wait_for(job["id"], timeout=8)
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "time_limit_exceeded"
    assert "timeout_seconds (1 s)" in failed["error"]["message"]


# The bounds, each crossed ----------------------------------------------------------------------


def soft_limit() -> int:
    return int(runtime().settings.job_soft_time_limit)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("run_at", lambda: "2030-01-01T09:00:00"),  # no offset
        ("run_at", lambda: 1893488400),  # a Unix time, not RFC 3339 text
        ("run_at", lambda: "next tuesday"),
        ("run_at", lambda: iso(in_seconds(-6 * 60))),
        ("run_at", lambda: iso(in_seconds(366 * DAY))),
        ("expires_after", lambda: 0),
        ("expires_after", lambda: 30 * DAY + 1),
        ("expires_after", lambda: "soon"),
        ("timeout_seconds", lambda: 0),
        ("timeout_seconds", lambda: soft_limit() + 1),
    ],
)
def test_a_bad_timing_is_a_422_naming_its_field(tenant: Tenant, field: str, value: Any) -> None:
    body = {"kind": "chat", "input": {"prompt": "hi"}, field: value()}
    assert field_of(tenant.post("/api/v1/jobs", json=body)) == field


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("run_at", lambda: iso(in_seconds(-4 * 60))),
        ("run_at", lambda: iso(in_seconds(364 * DAY))),
        ("expires_after", lambda: 30 * DAY),
        ("timeout_seconds", soft_limit),
    ],
)
def test_a_timing_at_its_bound_is_accepted(tenant: Tenant, field: str, value: Any) -> None:
    job = tenant.submit("chat", {"prompt": "bound"}, **{field: value()})
    tenant.post(f"/api/v1/jobs/{job['id']}/cancel")  # a year-ahead job would wait a year


def test_a_batch_names_the_item_whose_timing_is_bad(tenant: Tenant) -> None:
    good = {"kind": "chat", "input": {"prompt": "fine"}}
    items = [{**good, "run_at": "2030-01-01T09:00:00"}, good, {**good, "expires_after": 0}]
    response = tenant.post("/api/v1/batches", json={"items": items})
    assert response.status_code == 422, response.get_json()
    fields = [error["field"] for error in response.get_json()["errors"]]
    assert fields == ["items[0].run_at", "items[2].expires_after"]
    # The deployment's own bound, checked once every item has the right shape.
    items = [good, {**good, "timeout_seconds": soft_limit() + 1}]
    response = tenant.post("/api/v1/batches", json={"items": items})
    assert field_of(response) == "items[1].timeout_seconds"
    lines = b'{"kind": "chat", "input": {"prompt": "x"}, "expires_after": 0}\n'
    response = tenant.post(
        "/api/v1/batches", data=lines, headers={"Content-Type": "application/jsonl"}
    )
    assert field_of(response) == "lines[1].expires_after"


def test_a_batch_holds_its_scheduled_items_until_they_are_due(tenant: Tenant) -> None:
    run_at = in_seconds(3600)
    items = [
        {"kind": "chat", "input": {"prompt": "now"}},
        {"kind": "chat", "input": {"prompt": "later"}, "run_at": iso(run_at), "timeout_seconds": 5},
    ]
    response = tenant.post("/api/v1/batches", json={"items": items})
    assert response.status_code == 202, response.get_json()
    batch_id = response.get_json()["id"]
    results = tenant.get(f"/api/v1/batches/{batch_id}/results").get_data(as_text=True)
    now_id, later_id = (json.loads(line)["id"] for line in results.splitlines())
    assert tenant.wait_for(now_id)["status"] == "succeeded"
    later = tenant.get(f"/api/v1/jobs/{later_id}").get_json()
    assert later["status"] == "queued" and later["timeout_seconds"] == 5
    assert datetime.fromisoformat(later["run_at"]) == run_at
    assert job_row(uuid.UUID(later_id)).dispatched_at is None
    assert tenant.post(f"/api/v1/batches/{batch_id}/cancel").status_code == 200
    assert tenant.get(f"/api/v1/jobs/{later_id}").get_json()["status"] == "canceled"


def test_run_at_is_part_of_the_idempotent_request(tenant: Tenant) -> None:
    run_at = in_seconds(3600).replace(microsecond=0)
    headers = {"Idempotency-Key": f"timing-{uuid.uuid4()}"}
    body = {"kind": "chat", "input": {"prompt": "once"}, "run_at": iso(run_at)}
    first = tenant.post("/api/v1/jobs", json=body, headers=headers)
    assert first.status_code == 202
    # The same instant written with another offset is the same request.
    elsewhere = run_at.astimezone(timezone(timedelta(hours=5)))
    replay = tenant.post("/api/v1/jobs", json={**body, "run_at": iso(elsewhere)}, headers=headers)
    assert replay.status_code == 200 and replay.get_json()["id"] == first.get_json()["id"]
    later = {**body, "run_at": iso(run_at + timedelta(minutes=1))}
    reused = tenant.post("/api/v1/jobs", json=later, headers=headers)
    assert reused.status_code == 422
    assert reused.get_json()["type"] == "/problems/idempotency-key-reused"
    tenant.post(f"/api/v1/jobs/{first.get_json()['id']}/cancel")


@contextmanager
def statements_of_this_thread() -> Iterator[list[str]]:
    """The SQL this thread sends while inside: the in-process worker's own statements, on the
    same engine from other threads, are not counted."""
    thread, statements = threading.get_ident(), []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if threading.get_ident() == thread:
            statements.append(statement)

    event.listen(runtime().db.engine, "before_cursor_execute", seen)
    try:
        yield statements
    finally:
        event.remove(runtime().db.engine, "before_cursor_execute", seen)
