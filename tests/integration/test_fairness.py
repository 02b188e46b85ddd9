"""Fair dispatch: per-tenant windows of published jobs, weights and concurrency caps, held jobs
released as jobs finish, fail, are canceled, or by the sweeper. Real PostgreSQL, Redis, worker
(8 threads) and simulator; the tests' window is `auto`, its floor of 32 (8 slots + 25 % is less).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from app.models import OUTSTANDING, Job
from app.runtime import runtime
from tests.conftest import Tenant, job_row, put_tenant, wait_until

pytestmark = pytest.mark.usefixtures("worker")

SLOTS = 8  # the tests' worker (conftest)
WINDOW = 32  # CONVEYOR_TENANT_WINDOW=auto: max(tenant_window_min 32, 8 + 2)


def slow(seconds: float) -> dict[str, Any]:
    return {"prompt": f"[[sim tokens=5 duration={seconds}]] {uuid.uuid4()}"}


def counts(owner: str, db: Any = None) -> tuple[int, int]:
    """The owner's running jobs and its outstanding ones (published and unfinished)."""
    with (db or runtime().db).transaction() as session:
        row = session.execute(
            sa.select(
                sa.func.count().filter(Job.status == "running"),
                sa.func.count().filter(sa.text(OUTSTANDING)),
            ).where(Job.owner == owner)
        ).one()
    return row[0], row[1]


@contextmanager
def peaks(owner: str) -> Iterator[dict[str, int]]:
    """The most running and outstanding jobs of `owner` seen while the block runs (polled)."""
    seen = {"running": 0, "outstanding": 0}
    done = threading.Event()
    db = runtime().db  # the thread has no app context

    def poll() -> None:
        while not done.is_set():
            running, outstanding = counts(owner, db)
            seen["running"] = max(seen["running"], running)
            seen["outstanding"] = max(seen["outstanding"], outstanding)
            done.wait(0.01)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join()


def wait_all(tenant: Tenant, ids: list[str], timeout: float = 60) -> list[dict[str, Any]]:
    return [tenant.wait_for(job_id, timeout=timeout) for job_id in ids]


# Work conserving ------------------------------------------------------------------------------


def test_a_lone_tenant_fills_every_worker_slot(tenant: Tenant) -> None:
    with peaks(tenant.owner) as seen:
        ids = [tenant.submit("chat", slow(1.5))["id"] for _ in range(2 * SLOTS)]
        wait_until(lambda: counts(tenant.owner)[0] == SLOTS, timeout=30)
        jobs = wait_all(tenant, ids)
    assert {job["status"] for job in jobs} == {"succeeded"}
    assert seen["running"] == SLOTS
    # Under its window, nothing was held: every job was published at submit.
    assert seen["outstanding"] == 2 * SLOTS


# Caps and windows -----------------------------------------------------------------------------


def test_the_concurrency_cap_holds_and_held_jobs_run_as_others_finish(
    admin: Tenant, tenant: Tenant
) -> None:
    assert put_tenant(admin, tenant.owner, max_concurrency=2).status_code == 200
    with peaks(tenant.owner) as seen:
        created = [tenant.submit("chat", slow(0.4)) for _ in range(7)]
        assert [job.get("waiting") for job in created[:2]] == [None, None]
        assert {job["waiting"]["reason"] for job in created[2:]} == {"tenant_concurrency"}
        shown = admin.get(f"/api/v1/admin/tenants/{tenant.owner}").get_json()
        assert shown["max_concurrency"] == 2 and shown["window"] == 2
        assert shown["held"] + shown["outstanding"] + 0 >= 5
        jobs = wait_all(tenant, [job["id"] for job in created])
    assert {job["status"] for job in jobs} == {"succeeded"}
    assert seen["running"] == 2  # reached, never passed
    assert seen["outstanding"] <= 2
    assert all(job["waiting"] is None for job in jobs)


def test_a_raised_cap_releases_held_jobs_at_once(admin: Tenant, tenant: Tenant) -> None:
    put_tenant(admin, tenant.owner, max_concurrency=1)
    ids = [tenant.submit("chat", slow(3))["id"] for _ in range(4)]
    wait_until(lambda: counts(tenant.owner)[0] == 1, timeout=30)
    assert counts(tenant.owner)[1] == 1
    raised = put_tenant(admin, tenant.owner, max_concurrency=4).get_json()
    assert raised["window"] == 4 and raised["outstanding"] == 4 and raised["held"] == 0
    wait_until(lambda: counts(tenant.owner)[0] == 4, timeout=30)
    assert {job["status"] for job in wait_all(tenant, ids)} == {"succeeded"}


def test_a_batch_goes_through_the_window(admin: Tenant, tenant: Tenant) -> None:
    put_tenant(admin, tenant.owner, max_concurrency=2)
    items = [{"kind": "chat", "input": slow(0.3)} for _ in range(6)]
    with peaks(tenant.owner) as seen:
        response = tenant.post("/api/v1/batches", json={"items": items})
        assert response.status_code == 202, response.get_json()
        batch_id = response.get_json()["id"]
        with runtime().db.transaction() as session:
            ids = session.scalars(
                sa.select(Job.id).where(Job.batch_id == uuid.UUID(batch_id))
            ).all()
        jobs = wait_all(tenant, [str(job_id) for job_id in ids])
    assert len(jobs) == 6 and {job["status"] for job in jobs} == {"succeeded"}
    assert seen["running"] <= 2 and seen["outstanding"] <= 2


HELD = {"reason": "tenant_concurrency", "endpoint": None, "until": None}


def test_a_due_scheduled_job_waits_for_its_window(admin: Tenant, tenant: Tenant) -> None:
    put_tenant(admin, tenant.owner, max_concurrency=1)
    first = tenant.submit("chat", slow(3))
    run_at = datetime.now(UTC) + timedelta(seconds=0.5)
    later = tenant.submit("chat", slow(0.1), run_at=run_at.isoformat())
    assert later["waiting"]["reason"] == "scheduled"
    assert datetime.fromisoformat(later["waiting"]["until"]) == run_at
    wait_until(lambda: datetime.now(UTC) > run_at + timedelta(seconds=0.2))
    wait_until(lambda: counts(tenant.owner)[0] == 1, timeout=30)
    runtime().jobs.sweep()
    shown = tenant.get(f"/api/v1/jobs/{later['id']}").get_json()
    assert shown["status"] == "queued", shown
    assert shown["waiting"] == HELD
    assert tenant.wait_for(first["id"])["status"] == "succeeded"
    assert tenant.wait_for(later["id"])["status"] == "succeeded"


# Fairness -------------------------------------------------------------------------------------


def test_a_second_tenant_starts_before_the_first_ones_backlog(
    new_tenant: Any,
) -> None:
    a, b = new_tenant(), new_tenant()
    backlog = 72
    items = [{"kind": "chat", "input": slow(0.5)} for _ in range(backlog)]
    batch = a.post("/api/v1/batches", json={"items": items})  # all at once
    assert batch.status_code == 202, batch.get_json()
    assert counts(a.owner)[1] <= WINDOW  # the rest is held, not in the broker
    b_ids = [b.submit("chat", slow(0.5))["id"] for _ in range(2)]
    wait_all(b, b_ids)
    with runtime().db.transaction() as session:
        b_submitted, b_started = session.execute(
            sa.select(sa.func.min(Job.created_at), sa.func.max(Job.started_at)).where(
                Job.owner == b.owner
            )
        ).one()

        def a_started(*where: Any) -> int:
            return session.scalar(sa.select(sa.func.count()).where(Job.owner == a.owner, *where))

        a_between = a_started(Job.started_at > b_submitted, Job.started_at < b_started)
        a_after = a_started(sa.or_(Job.started_at.is_(None), Job.started_at > b_started))
    # B waited behind at most A's window (the messages of A already in the broker), not
    # behind A's whole backlog: A's releases since are published behind B's jobs.
    assert a_between <= WINDOW, a_between
    assert a_after >= backlog - WINDOW - SLOTS, a_after
    wait_until(lambda: counts(a.owner) == (0, 0), timeout=120)
    with runtime().db.transaction() as session:
        statuses = session.scalars(sa.select(Job.status).where(Job.owner == a.owner)).all()
    assert set(statuses) == {"succeeded"} and len(statuses) == backlog


# Releases -------------------------------------------------------------------------------------


def test_a_failed_job_releases_the_next_held_one(admin: Tenant, tenant: Tenant) -> None:
    put_tenant(admin, tenant.owner, max_concurrency=1)
    first = tenant.submit("chat", slow(1))
    # Held behind the first; the failing one fails at once (a 400 is not retried).
    failing = tenant.submit("chat", {"prompt": f"[[sim fault=400]] {uuid.uuid4()}"})
    held = tenant.submit("chat", slow(0.1))
    assert failing["waiting"] == held["waiting"] == HELD
    assert tenant.wait_for(first["id"])["status"] == "succeeded"
    assert tenant.wait_for(failing["id"])["status"] == "failed"
    assert tenant.wait_for(held["id"])["status"] == "succeeded"


def test_canceling_releases_held_jobs(admin: Tenant, tenant: Tenant) -> None:
    put_tenant(admin, tenant.owner, max_concurrency=1)
    running = tenant.submit("chat", slow(20))
    held = [tenant.submit("chat", slow(0.1)) for _ in range(2)]
    wait_until(lambda: counts(tenant.owner)[0] == 1, timeout=30)
    # A held job canceled: it was never published, and the next one stays held.
    assert tenant.post(f"/api/v1/jobs/{held[0]['id']}/cancel").status_code == 200
    assert job_row(uuid.UUID(held[1]["id"])).dispatched_at is None
    # The running one canceled: its place goes to the next held job.
    tenant.post(f"/api/v1/jobs/{running['id']}/cancel")
    assert tenant.wait_for(running["id"])["status"] == "canceled"
    assert tenant.wait_for(held[1]["id"])["status"] == "succeeded"


def test_the_sweeper_releases_a_held_job_whose_release_was_lost(tenant: Tenant) -> None:
    job = tenant.submit("chat", slow(0.1))
    assert tenant.wait_for(job["id"])["status"] == "succeeded"
    # A job held while the window was full, whose release was lost (a crash after a finish).
    with runtime().db.transaction() as session:
        lost = session.execute(
            sa.insert(Job)
            .values(
                id=uuid.uuid4(),
                owner=tenant.owner,
                kind="chat",
                status="queued",
                input=slow(0.1),
                max_attempts=3,
                last_seq=1,
                dispatched_at=None,
            )
            .returning(Job.id)
        ).scalar_one()
    assert tenant.get(f"/api/v1/jobs/{lost}").get_json()["waiting"] == HELD
    report = runtime().jobs.sweep()
    assert report.released >= 1
    assert tenant.wait_for(str(lost))["status"] == "succeeded"


# The admin's settings -------------------------------------------------------------------------


def test_weight_and_cap_are_set_and_shown(admin: Tenant, tenant: Tenant) -> None:
    path = f"/api/v1/admin/tenants/{tenant.owner}"
    shown = admin.get(path).get_json()
    assert shown["weight"] == 1 and shown["max_concurrency"] is None
    assert shown["window"] == WINDOW and shown["outstanding"] == 0 and shown["held"] == 0
    body = put_tenant(admin, tenant.owner, weight=1.5, daily_budget_usd="5").get_json()
    assert body["weight"] == 1.5 and body["window"] == WINDOW * 3 // 2
    assert body["daily_budget_usd"] == "5.00000000"
    body = put_tenant(admin, tenant.owner, weight=0.1, max_concurrency=2).get_json()
    assert body["window"] == 2 and body["max_concurrency"] == 2  # ceil(3.2) = 4, capped at 2
    # Replaced as a whole: left out, the weight is 1 and the cap none.
    body = put_tenant(admin, tenant.owner).get_json()
    assert body["weight"] == 1 and body["max_concurrency"] is None and body["window"] == WINDOW


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"weight": 0}, "weight"),
        ({"weight": -1}, "weight"),
        ({"weight": 100.01}, "weight"),
        ({"weight": 0.001}, "weight"),
        ({"weight": "heavy"}, "weight"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"max_concurrency": 100_001}, "max_concurrency"),
        ({"max_concurrency": 1.5}, "max_concurrency"),
        ({"max_concurrency": "3"}, "max_concurrency"),
        ({"max_concurrency": True}, "max_concurrency"),
    ],
)
def test_a_bad_weight_or_cap_is_a_422_naming_the_field(
    admin: Tenant, tenant: Tenant, body: dict[str, Any], field: str
) -> None:
    response = put_tenant(admin, tenant.owner, **body)
    assert response.status_code == 422, response.get_json()
    assert response.content_type == "application/problem+json"
    assert [e["field"] for e in response.get_json()["errors"]] == [field]


@pytest.mark.parametrize(("weight", "cap"), [(100, None), (0.01, None), (1, 1), (1, 100_000)])
def test_the_limits_of_weight_and_cap_are_accepted(
    admin: Tenant, tenant: Tenant, weight: float, cap: int | None
) -> None:
    response = put_tenant(admin, tenant.owner, weight=weight, max_concurrency=cap)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["weight"] == weight


def test_a_bulk_retry_goes_through_the_window(admin: Tenant, tenant: Tenant) -> None:
    failed = [tenant.submit("chat", {"prompt": f"[[sim fault=400]] {n}"}) for n in range(3)]
    for job in failed:
        assert tenant.wait_for(job["id"])["status"] == "failed"
    put_tenant(admin, tenant.owner, max_concurrency=1)
    body = {"filter": {"owner": tenant.owner, "status": "failed"}}
    with peaks(tenant.owner) as seen:
        retried = admin.post("/api/v1/admin/jobs/retry", json=body)
        assert retried.status_code == 200, retried.get_json()
        ids = retried.get_json()["jobs"]
        assert len(ids) == 3
        jobs = wait_all(tenant, ids)
    assert {job["status"] for job in jobs} == {"failed"}  # the same fault again
    assert seen["outstanding"] <= 1


def test_a_running_job_canceled_in_bulk_releases_held_jobs(admin: Tenant, tenant: Tenant) -> None:
    put_tenant(admin, tenant.owner, max_concurrency=1)
    running = tenant.submit("chat", slow(20))
    wait_until(lambda: counts(tenant.owner)[0] == 1, timeout=30)
    held = tenant.submit("chat", slow(0.1))
    assert held["waiting"] == HELD
    body = {"filter": {"owner": tenant.owner, "status": "running"}}
    assert admin.post("/api/v1/admin/jobs/cancel", json=body).get_json()["stopping"] == 1
    assert tenant.wait_for(running["id"])["status"] == "canceled"
    assert tenant.wait_for(held["id"])["status"] == "succeeded"
