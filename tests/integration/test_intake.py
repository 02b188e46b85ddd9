"""Job creation as a group commit: the jobs of one batch share an INSERT, a commit and a Redis
pipeline, yet each gets its own outcome. Against the real PostgreSQL, Redis and worker."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from celery import Celery
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from app.jobs import transitions
from app.jobs.events import stream_key
from app.jobs.intake import JobIntake, NewJob
from app.models import Job, JobEvent
from app.queue import celery_config
from app.runtime import runtime
from tests.conftest import Tenant, job_row, wait_until

pytestmark = pytest.mark.usefixtures("worker")


def new_job(owner: str, *, key: str | None = None, retry_of: uuid.UUID | None = None) -> NewJob:
    job_id = uuid.uuid4()
    return NewJob(
        id=job_id,
        owner=owner,
        kind="chat",
        input={"prompt": f"batched {job_id}"},
        priority=0,
        max_attempts=3,
        idempotency_key=key,
        request_hash="same-body" if key else None,
        model=runtime().settings.model_for("chat"),
        retry_of=retry_of,
        at=transitions.now(),
    )


def test_one_batch_gives_each_job_its_own_outcome(tenant: Tenant) -> None:
    rt = runtime()
    plain = new_job(tenant.owner)
    orphan = new_job(tenant.owner, retry_of=uuid.uuid4())  # no such job: a foreign-key error
    first = new_job(tenant.owner, key="k1")
    replay = new_job(tenant.owner, key="k1")  # the same key later in the same batch

    stored = rt.intake.store_and_dispatch([plain, orphan, first, replay])

    assert stored[0].id == plain.id and stored[2].id == first.id
    assert isinstance(stored[1], IntegrityError)
    assert stored[3] is None  # the caller replays the job stored under k1
    with rt.db.transaction() as session:
        ids = set(session.scalars(select(Job.id).where(Job.owner == tenant.owner)))
        events = session.scalars(
            select(JobEvent.job_id).where(
                JobEvent.job_id.in_([plain.id, first.id]), JobEvent.type == "job.queued"
            )
        ).all()
    assert ids == {plain.id, first.id}
    assert sorted(map(str, events)) == sorted([str(plain.id), str(first.id)])
    for job in (plain, first):
        assert rt.redis.xlen(stream_key(job.id)) >= 1  # job.queued reached the live feed
        assert tenant.wait_for(str(job.id))["status"] == "succeeded"  # and the worker got it


def test_forty_concurrent_posts_get_forty_jobs_and_all_run(tenant: Tenant, app) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def post(n: int) -> tuple[int, str]:
        with app.test_client() as client:
            response = client.post(
                "/api/v1/jobs",
                json={"kind": "chat", "input": {"prompt": f"together {n}"}},
                headers=tenant.headers,
            )
            return response.status_code, response.get_json()["id"]

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(post, range(40)))
    assert {status for status, _ in results} == {202}
    assert len({job_id for _, job_id in results}) == 40
    for _, job_id in results:
        assert tenant.wait_for(job_id)["status"] == "succeeded"


def test_a_publish_that_fails_after_commit_leaves_the_job_for_the_sweeper(
    tenant: Tenant, app
) -> None:
    rt = runtime()
    dead_broker = Celery("dead-broker")
    config = celery_config(rt.settings)
    config["broker_url"] = "redis://127.0.0.1:9/0"  # nothing listens on port 9
    config["broker_transport_options"] = {**config["broker_transport_options"], "max_retries": 0}
    dead_broker.conf.update(config, broker_connection_timeout=0.5)
    intake = JobIntake(rt.db, rt.bus, dead_broker, rt.intake.window)
    job = new_job(tenant.owner)

    [row] = intake.store_and_dispatch([job])  # does not raise: the row is what counts

    assert row.id == job.id and job_row(job.id).status == "queued"
    # Once its dispatch is older than the grace period, the sweeper publishes it again.
    with rt.db.transaction() as session:
        session.execute(
            update(Job)
            .where(Job.id == job.id)
            .values(dispatched_at=func.now() - timedelta(seconds=60))
        )
    runtime().jobs.sweep()
    assert tenant.wait_for(str(job.id))["status"] == "succeeded"
    assert wait_until(lambda: job_row(job.id).attempt == 1)
