"""Retention: finished jobs past their owner's retention are deleted with their events, model
calls, artifacts (rows and blobs), webhook deliveries and Redis streams, a batch per
transaction; everything else stays. Real PostgreSQL, Redis, worker and artifact store.

The purge runs over the whole test database: a run with a deployment default also deletes
other tests' finished jobs that are older than it (test_exports' are from 2025), which those
tests, already over, do not mind."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from app.jobs import retention
from app.jobs.artifacts import publish_effect
from app.jobs.events import stream_key
from app.jobs.payloads import SucceededPayload
from app.models import (
    Artifact,
    Batch,
    Job,
    JobEvent,
    JobStep,
    ModelCall,
    WebhookAttempt,
    WebhookDelivery,
)
from app.queue import RETENTION_TASK
from app.runtime import runtime
from tests.conftest import Tenant, put_tenant, undispatched_job, wait_until

pytestmark = pytest.mark.usefixtures("worker")

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8


def policy(default_days: int | None = None, batch_size: int = 500, max_jobs: int = 10**6) -> Any:
    return retention.Policy(default_days, batch_size, 0.0, max_jobs)


def purge(default_days: int | None = None, **kwargs: Any) -> retention.PurgeReport:
    rt = runtime()
    return retention.purge(rt.db, rt.bus, rt.artifacts, policy(default_days, **kwargs))


def finished_job(owner: str, days_ago: float, status: str = "succeeded") -> uuid.UUID:
    job_id = undispatched_job(owner)
    backdate([job_id], days_ago, status)
    return job_id


def backdate(job_ids: list[uuid.UUID], days_ago: float, status: str | None = None) -> None:
    values: dict[str, Any] = {"finished_at": sa.func.now() - timedelta(days=days_ago)}
    if status is not None:
        values["status"] = status
    with runtime().db.transaction() as session:
        session.execute(sa.update(Job).where(Job.id.in_(job_ids)).values(**values))


def existing(*job_ids: uuid.UUID) -> set[uuid.UUID]:
    with runtime().db.transaction() as session:
        return set(session.scalars(sa.select(Job.id).where(Job.id.in_(job_ids))))


def count(model: Any, column: Any, job_id: uuid.UUID) -> int:
    with runtime().db.transaction() as session:
        return session.scalar(sa.select(sa.func.count()).select_from(model).where(column == job_id))


def image_job_with_artifact(owner: str) -> tuple[uuid.UUID, Artifact]:
    """A succeeded job with a published artifact (row and blob), as an image job leaves one."""
    job_id = undispatched_job(owner, kind="image", extra_input={})
    claim = runtime().jobs.claim_job(job_id, "retention-test")
    assert claim is not None
    saved = runtime().artifacts.save(claim.job_id, claim.attempt, "a.png", PNG, "image/png")
    assert saved is not None
    runtime().jobs.finish_job(
        claim,
        claim.seq + 1,
        SucceededPayload(attempt=claim.attempt),
        effects=(publish_effect(),),
        output={"images": [saved.reference()]},
        progress=100.0,
    )
    with runtime().db.transaction() as session:
        artifact = session.get_one(Artifact, saved.id)
        session.add(
            JobStep(job_id=job_id, name="draw", attempt=1, output={}, started_at=sa.func.now())
        )
        delivery = WebhookDelivery(
            owner=owner,
            job_id=job_id,
            url="https://example.com/hook",
            event_type="job.succeeded",
            event_seq=3,
            payload={},
            status="succeeded",
        )
        session.add(delivery)
        session.flush()
        session.add(WebhookAttempt(delivery_id=delivery.id, attempt=1, duration_ms=1.0))
    return job_id, artifact


def blob_exists(artifact: Artifact) -> bool:
    return (runtime().settings.artifact_dir / artifact.storage_key).exists()


def test_a_tenants_expired_jobs_go_with_all_they_own_and_nothing_else_does(
    admin: Tenant, tenant: Tenant, new_tenant: Callable[[], Tenant]
) -> None:
    assert put_tenant(admin, tenant.owner, retention_days=1).status_code == 200
    chat = tenant.submit("chat", {"prompt": "keep me short"})
    tenant.wait_for(chat["id"])
    old_chat = uuid.UUID(chat["id"])
    old_image, artifact = image_job_with_artifact(tenant.owner)
    recent_image, recent_artifact = image_job_with_artifact(tenant.owner)
    failed = finished_job(tenant.owner, days_ago=3, status="failed")
    # A queued retry of the failed job, and a job that never finished, both older than a day.
    retry = undispatched_job(tenant.owner)
    queued = undispatched_job(tenant.owner)
    with runtime().db.transaction() as session:
        session.execute(sa.update(Job).where(Job.id == retry).values(retry_of=failed))
        session.execute(
            sa.update(Job)
            .where(Job.id.in_([retry, queued]))
            .values(created_at=sa.func.now() - timedelta(days=5))
        )
    other = new_tenant()
    others_old = finished_job(other.owner, days_ago=30)
    backdate([old_chat, old_image], days_ago=1.01)
    backdate([recent_image], days_ago=0.99)
    assert count(ModelCall, ModelCall.job_id, old_chat) >= 1
    redis = runtime().redis
    assert redis.exists(stream_key(old_chat)) and redis.exists(stream_key(old_image))
    assert blob_exists(artifact)

    report = purge()

    assert existing(old_chat, old_image, failed, recent_image, retry, queued, others_old) == {
        recent_image,
        retry,
        queued,
        others_old,
    }
    assert report.jobs >= 3 and report.artifacts >= 1
    for job_id in (old_chat, old_image, failed):
        assert count(JobEvent, JobEvent.job_id, job_id) == 0
        assert count(ModelCall, ModelCall.job_id, job_id) == 0
        assert count(JobStep, JobStep.job_id, job_id) == 0
        assert count(WebhookDelivery, WebhookDelivery.job_id, job_id) == 0
        assert not redis.exists(stream_key(job_id))
    with runtime().db.transaction() as session:
        assert session.get(Artifact, artifact.id) is None
        assert session.get(Artifact, recent_artifact.id) is not None
        assert session.get_one(Job, retry).retry_of is None
        attempts = sa.select(sa.func.count()).select_from(WebhookAttempt)
        assert session.scalar(attempts.where(WebhookAttempt.delivery_id.is_(None))) == 0
    assert not blob_exists(artifact)
    assert blob_exists(recent_artifact)
    assert count(JobEvent, JobEvent.job_id, recent_image) == 3
    assert count(WebhookDelivery, WebhookDelivery.job_id, recent_image) == 1
    assert redis.exists(stream_key(recent_image))
    # What is gone is a 404 for its owner, as after DELETE /jobs/{id}.
    assert tenant.get(f"/api/v1/jobs/{old_chat}").status_code == 404
    assert tenant.get(f"/api/v1/jobs/{recent_image}").status_code == 200


def test_the_default_applies_to_tenants_without_their_own_and_0_is_forever(
    admin: Tenant, new_tenant: Callable[[], Tenant]
) -> None:
    plain, forever, longer = new_tenant(), new_tenant(), new_tenant()
    put_tenant(admin, forever.owner, retention_days=0)
    put_tenant(admin, longer.owner, retention_days=5, daily_budget_usd="1")
    jobs = {t.owner: finished_job(t.owner, days_ago=3) for t in (plain, forever, longer)}
    longers_oldest = finished_job(longer.owner, days_ago=6)

    # No default: only the tenant with a retention of its own loses what is past it.
    purge(default_days=None)
    assert existing(*jobs.values(), longers_oldest) == set(jobs.values())

    purge(default_days=2)
    assert existing(*jobs.values()) == {jobs[forever.owner], jobs[longer.owner]}
    # A tenant set back to null follows the default again.
    put_tenant(admin, longer.owner, retention_days=None)
    purge(default_days=2)
    assert existing(jobs[forever.owner], jobs[longer.owner]) == {jobs[forever.owner]}


def test_a_run_deletes_in_batches_and_stops_at_its_cap(admin: Tenant, tenant: Tenant) -> None:
    put_tenant(admin, tenant.owner, retention_days=1)
    job_ids = [finished_job(tenant.owner, days_ago=2 + i / 100) for i in range(7)]

    first = purge(batch_size=3, max_jobs=5)
    # The oldest go first: 3, then the 2 left under the cap, in two transactions (and one per
    # other owner with a retention that earlier tests left, with nothing to delete).
    assert first.jobs == 5 and first.capped and first.transactions >= 2
    assert existing(*job_ids) == set(job_ids[:2])
    second = purge(batch_size=3, max_jobs=5)
    assert second.jobs == 2 and not second.capped
    assert existing(*job_ids) == set()


def test_a_batch_goes_with_its_last_job(admin: Tenant, tenant: Tenant) -> None:
    put_tenant(admin, tenant.owner, retention_days=1)
    items = [{"kind": "chat", "input": {"prompt": f"item {i}"}} for i in range(2)]
    created = tenant.post("/api/v1/batches", json={"items": items})
    assert created.status_code == 202, created.get_json()
    batch_id = uuid.UUID(created.get_json()["id"])
    with runtime().db.transaction() as session:
        first, second = session.scalars(
            sa.select(Job.id).where(Job.batch_id == batch_id).order_by(Job.batch_item)
        )
    for job_id in (first, second):
        tenant.wait_for(str(job_id))

    backdate([first], days_ago=2)
    purge()
    assert existing(first, second) == {second}
    assert tenant.get(f"/api/v1/batches/{batch_id}").status_code == 200
    backdate([second], days_ago=2)
    assert purge().batches >= 1
    with runtime().db.transaction() as session:
        assert session.get(Batch, batch_id) is None


def test_a_job_waits_for_its_pending_webhook_delivery(admin: Tenant, tenant: Tenant) -> None:
    put_tenant(admin, tenant.owner, retention_days=1)
    job_id = finished_job(tenant.owner, days_ago=2)
    with runtime().db.transaction() as session:
        delivery = WebhookDelivery(
            owner=tenant.owner,
            job_id=job_id,
            url="https://example.com/hook",
            event_type="job.succeeded",
            event_seq=1,
            payload={},
            status="pending",
            # Not due: the test's dispatcher leaves it alone.
            next_attempt_at=sa.func.now() + timedelta(hours=1),
        )
        session.add(delivery)
    purge()
    assert existing(job_id) == {job_id}
    with runtime().db.transaction() as session:
        session.execute(
            sa.update(WebhookDelivery)
            .where(WebhookDelivery.job_id == job_id)
            .values(status="failed", next_attempt_at=None)
        )
    purge()
    assert existing(job_id) == set()


def test_the_beat_task_runs_on_a_worker(admin: Tenant, tenant: Tenant) -> None:
    put_tenant(admin, tenant.owner, retention_days=1)
    old, recent = finished_job(tenant.owner, days_ago=2), finished_job(tenant.owner, days_ago=0)
    runtime().celery.send_task(RETENTION_TASK)
    wait_until(lambda: not existing(old), timeout=30)
    assert existing(recent) == {recent}


# The admin's API --------------------------------------------------------------------------


def test_the_admin_sets_a_tenants_retention(admin: Tenant, tenant: Tenant) -> None:
    path = f"/api/v1/admin/tenants/{tenant.owner}"
    shown = admin.get(path).get_json()
    # The tests' deployment sets no default: kept forever.
    assert shown["retention_days"] is None and shown["effective_retention_days"] is None
    body = put_tenant(admin, tenant.owner, retention_days=30).get_json()
    assert body["retention_days"] == 30 and body["effective_retention_days"] == 30
    assert admin.get(path).get_json()["retention_days"] == 30
    body = put_tenant(admin, tenant.owner, retention_days=0).get_json()
    assert body["retention_days"] == 0 and body["effective_retention_days"] is None
    assert put_tenant(admin, tenant.owner, retention_days=36_500).status_code == 200
    # Replaced as a whole, as the budgets are: left out is the default again.
    body = put_tenant(admin, tenant.owner, daily_budget_usd="1").get_json()
    assert body["retention_days"] is None


@pytest.mark.parametrize("value", [-1, 36_501, 1.5, "soon", [1]])
def test_a_bad_retention_is_a_422_naming_the_field(
    admin: Tenant, tenant: Tenant, value: Any
) -> None:
    response = put_tenant(admin, tenant.owner, retention_days=value)
    assert response.status_code == 422, response.get_json()
    assert response.content_type == "application/problem+json"
    assert [e["field"] for e in response.get_json()["errors"]] == ["retention_days"]
    assert admin.get(f"/api/v1/admin/tenants/{tenant.owner}").get_json()["created_at"] is None
