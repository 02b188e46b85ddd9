"""What a worker process's heartbeat does for its running jobs, and what a job's progress costs.

A running job's progress costs no transaction of its own: its job.progress event goes out
live at once and reaches PostgreSQL with the process's next lease renewal (one statement for
all its jobs) or with the attempt's next write, and only while the attempt holds the job.
A finish reads whether its owner holds jobs to release, so an owner holding none costs no
release transaction. A cancel seen by a late beat wins over the time-out seen by the same
beat. (And: what makes an attempt `cached`.)"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import func, select, update

from app.execution.leases import ActiveJobs
from app.jobs.events import stream_key
from app.jobs.payloads import LogPayload, SucceededPayload
from app.kinds.context import JobCanceled, JobContext
from app.llm.client import CallRecord
from app.models import Job, JobEvent
from app.runtime import runtime
from tests.conftest import Tenant, job_row, undispatched_job, wait_until

HOUR = timedelta(hours=1)


def _claimed_context(owner: str) -> JobContext:
    job_id = undispatched_job(owner)
    claim = runtime().jobs.claim_job(job_id, "progress-test")
    assert claim is not None
    # No heartbeat renews it: a long lease keeps a test worker's sweeper from taking it back.
    with runtime().db.transaction() as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(lease_expires_at=func.now() + HOUR)
        )
    return JobContext(claim, runtime().jobs, runtime().model_client)


def _progress_due(ctx: JobContext, percent: float) -> None:
    """`ctx.progress` once its interval has passed since the last progress event."""
    ctx._last_progress_write = time.monotonic() - ctx.settings.progress_write_interval - 1
    ctx.progress(percent)


def _stored(job_id: uuid.UUID, event_type: str = "job.progress") -> list[tuple[int, Any]]:
    with runtime().db.transaction() as session:
        rows = session.execute(
            select(JobEvent.seq, JobEvent.data)
            .where(JobEvent.job_id == job_id, JobEvent.type == event_type)
            .order_by(JobEvent.seq)
        ).all()
    return [(row.seq, row.data) for row in rows]


def _live_seqs(job_id: uuid.UUID) -> list[int]:
    entries = runtime().redis.xrange(stream_key(job_id))
    return [int(entry_id.decode().split("-")[1]) for entry_id, _ in entries]


def test_progress_is_live_at_once_and_durable_with_the_next_lease_renewal(
    tenant: Tenant,
) -> None:
    ctx = _claimed_context(tenant.owner)
    active = ActiveJobs()
    active.track(ctx)
    _progress_due(ctx, 40)
    seq = ctx._seq
    wait_until(lambda: seq in _live_seqs(ctx.job_id))
    # Live, not yet written: the attempt made no transaction for it.
    assert _stored(ctx.job_id) == []
    assert job_row(ctx.job_id).progress == 0

    active.renew_all(runtime().jobs)

    assert _stored(ctx.job_id) == [(seq, {"progress": 40.0})]
    row = job_row(ctx.job_id)
    assert row.progress == 40 and row.last_seq == seq
    # Written once: the next renewal has nothing new to write.
    active.renew_all(runtime().jobs)
    assert _stored(ctx.job_id) == [(seq, {"progress": 40.0})]


def test_unwritten_progress_rides_on_the_attempts_next_write(tenant: Tenant) -> None:
    ctx = _claimed_context(tenant.owner)
    _progress_due(ctx, 25)
    progress_seq = ctx._seq
    ctx.emit(LogPayload(level="info", message="halfway"))
    assert _stored(ctx.job_id) == [(progress_seq, {"progress": 25.0})]
    assert [seq for seq, _ in _stored(ctx.job_id, "job.log")] == [progress_seq + 1]
    # Taken by that write: the heartbeat has nothing left to write for it.
    assert ctx.take_unwritten_progress() is None

    _progress_due(ctx, 60)
    ctx.finish(SucceededPayload(attempt=ctx.attempt), progress=100.0)
    assert [data for _, data in _stored(ctx.job_id)] == [{"progress": 25.0}, {"progress": 60.0}]
    row = job_row(ctx.job_id)
    assert row.status == "succeeded" and row.progress == 100


def test_a_renewal_writes_no_progress_for_an_attempt_that_lost_the_job(tenant: Tenant) -> None:
    ctx = _claimed_context(tenant.owner)
    active = ActiveJobs()
    active.track(ctx)
    _progress_due(ctx, 70)
    # The sweeper gave the job to a newer attempt meanwhile.
    with runtime().db.transaction() as session:
        session.execute(update(Job).where(Job.id == ctx.job_id).values(attempt=Job.attempt + 1))
    active.renew_all(runtime().jobs)
    assert _stored(ctx.job_id) == []
    assert job_row(ctx.job_id).progress == 0
    assert ctx.interrupted


def test_a_renewal_never_sets_progress_older_than_the_attempts_own_write(
    tenant: Tenant,
) -> None:
    ctx = _claimed_context(tenant.owner)
    _progress_due(ctx, 30)
    taken = ctx.take_unwritten_progress()
    assert taken is not None
    # The attempt's own write (a step, here a log) lands first with a newer seq...
    ctx.emit(LogPayload(level="info", message="later"))
    with runtime().db.transaction() as session:
        session.execute(update(Job).where(Job.id == ctx.job_id).values(progress=55))
    # ...then the heartbeat's older sample: its event is kept, the column is not rolled back.
    runtime().jobs.renew_leases([(ctx.job_id, ctx.attempt)], [taken])
    assert _stored(ctx.job_id) == [(taken.seq, {"progress": 30.0})]
    row = job_row(ctx.job_id)
    assert row.progress == 55 and row.last_seq == taken.seq + 1


def test_a_finish_releases_held_jobs_only_when_its_owner_holds_some(
    tenant: Tenant, monkeypatch: Any
) -> None:
    poked: list[str] = []
    monkeypatch.setattr(runtime().jobs.intake, "release_soon", poked.append)
    ctx = _claimed_context(tenant.owner)
    ctx.finish(SucceededPayload(attempt=ctx.attempt), progress=100.0)
    assert poked == []

    ctx = _claimed_context(tenant.owner)
    held = undispatched_job(tenant.owner)
    with runtime().db.transaction() as session:
        session.execute(update(Job).where(Job.id == held).values(dispatched_at=None))
    ctx.finish(SucceededPayload(attempt=ctx.attempt), progress=100.0)
    assert poked == [tenant.owner]


def test_an_attempt_is_cached_only_when_every_model_call_was(tenant: Tenant) -> None:
    """An image request (recorded outside `chat`) next to a cached chat answer: the job paid for
    a model call, so it is no cached job."""
    ctx = _claimed_context(tenant.owner)
    provider = runtime().model_client.provider
    ctx.llm.record(CallRecord(model="m", provider=provider, outcome="cached"))
    assert ctx.llm.all_cached
    ctx.llm.record(CallRecord(model="image-m", provider=provider, fixed_cost=Decimal("0.04")))
    assert not ctx.llm.all_cached


def test_a_late_beat_that_sees_a_cancel_and_the_deadline_ends_the_job_canceled(
    tenant: Tenant,
) -> None:
    """A beat delayed behind a busy pool finds the job both canceled and out of time: it ends
    as its owner asked."""
    ctx = _claimed_context(tenant.owner)
    active = ActiveJobs()
    active.track(ctx)
    with runtime().db.transaction() as session:
        session.execute(
            update(Job).where(Job.id == ctx.job_id).values(cancel_requested_at=func.now())
        )
    ctx.deadline = time.monotonic() - 1
    # The job's thread checks its flags as soon as the first is set.
    seen: list[type[BaseException]] = []
    ctx.set_closer(lambda: seen.append(_raised(ctx)))
    active.renew_all(runtime().jobs)
    assert seen[0] is JobCanceled, seen
    with pytest.raises(JobCanceled):
        ctx.check()


def _raised(ctx: JobContext) -> type[BaseException]:
    try:
        ctx.check()
    except Exception as exc:
        return type(exc)
    raise AssertionError("no flag set")
