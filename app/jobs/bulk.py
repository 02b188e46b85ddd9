"""Cancel and retry many jobs at once, chosen by a filter across owners (the admin's bulk
actions). Each call handles at most `limit` jobs, newest first, in one transaction, and says
whether more match: a caller repeats it until none does. The jobs then go on as if each had been
canceled or retried alone: the same events, rooms and cancel signals (transitions.py), but
stored by one statement for the whole call instead of a transaction per job.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    and_,
    case,
    cast,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import aliased

from app import metrics
from app.db import Database
from app.jobs import fairness, sql
from app.jobs.events import Event, EventBus
from app.jobs.intake import JobIntake, NewJob, create_params
from app.jobs.listing import JobFilter, newest_first
from app.jobs.payloads import CanceledPayload
from app.jobs.states import JobStatus
from app.jobs.transitions import expires_after_of, expiry
from app.models import Job, JobEvent

MAX_BULK = 10_000
# Bulk retries take this transaction-level advisory lock, so that two at once cannot both
# retry one job (each retries only jobs without a retry yet).
RETRY_LOCK = 0x636F6E7665796F72  # "conveyor"

QUEUED, RUNNING = JobStatus.QUEUED.value, JobStatus.RUNNING.value
CANCELED, FAILED = JobStatus.CANCELED.value, JobStatus.FAILED.value


@dataclass(frozen=True)
class CancelOutcome:
    canceled: int  # queued jobs, canceled at once
    stopping: int  # running jobs whose workers were told to stop
    more: bool  # jobs that match remain beyond this call's limit


@dataclass(frozen=True)
class RetryOutcome:
    retried: int
    jobs: list[uuid.UUID]  # the new jobs, in the order of the ones they retry
    more: bool


def _cancelable() -> ColumnElement[bool]:
    """Queued jobs, and running ones not yet asked to stop: a running job asked before is
    not chosen again, so that repeated calls move on to the next jobs."""
    return or_(
        Job.status == QUEUED,
        and_(Job.status == RUNNING, Job.cancel_requested_at.is_(None)),
    )


def _retryable() -> ColumnElement[bool]:
    """Failed and canceled jobs that no job retries yet: a job is retried once, and its retry
    (if that fails too) next time."""
    retry = aliased(Job)
    return and_(Job.status.in_([FAILED, CANCELED]), ~exists().where(retry.retry_of == Job.id))


def cancel_jobs(
    db: Database, bus: EventBus, intake: JobIntake, where: JobFilter, limit: int, at: datetime
) -> CancelOutcome:
    """Cancels up to `limit` matching jobs in one statement, as `Jobs.cancel_job` would each:
    queued ones end `canceled` with their event, running ones get `cancel_requested_at` and a
    signal to their worker. Like the batch's cancel (sql.CANCEL_BATCH), one UPDATE decides per
    row as it is when locked."""
    payload = CanceledPayload(reason="requested")
    chosen = newest_first(select(Job.id).where(*where.conditions(), _cancelable()))
    target = chosen.limit(limit).with_for_update().cte("target")
    queued = Job.status == QUEUED
    changed = (
        update(Job)
        .where(Job.id.in_(select(target.c.id)), Job.status.in_([QUEUED, RUNNING]))
        .values(
            status=case((queued, CANCELED), else_=Job.status),
            finished_at=case((queued, at), else_=Job.finished_at),
            last_seq=case((queued, Job.last_seq + 1), else_=Job.last_seq),
            lease_expires_at=case((queued, None), else_=Job.lease_expires_at),
            cancel_requested_at=case(
                (Job.status == RUNNING, func.coalesce(Job.cancel_requested_at, at)),
                else_=Job.cancel_requested_at,
            ),
            updated_at=at,
        )
        .returning(
            Job.id, Job.owner, Job.status, Job.last_seq, Job.batch_id, Job.kind, Job.started_at
        )
        .cte("changed")
    )
    events = insert(JobEvent).from_select(
        ["job_id", "seq", "type", "at", "data"],
        select(
            changed.c.id,
            changed.c.last_seq,
            literal(payload.event_type.value),
            literal(at),
            cast(literal(json.dumps(payload.as_data())), JSONB),
        ).where(changed.c.status == CANCELED),
    )
    statement = select(changed).add_cte(events.cte("events"))
    with db.engine.begin() as connection:
        rows = connection.execute(statement).all()
        more = _exists(connection, where, _cancelable())
    canceled = [row for row in rows if row.status == CANCELED]
    for row in canceled:
        metrics.job_finished(row.kind, CANCELED, row.owner, row.started_at, at)
    bus.publish(
        [Event(row.id, row.owner, row.last_seq, payload, at, row.batch_id) for row in canceled]
    )
    bus.signal_cancels([row.id for row in rows if row.status == RUNNING])
    # Their owners' windows may have room now (a job held by its window was canceled too).
    intake.release_quietly({row.owner for row in canceled})
    return CancelOutcome(len(canceled), len(rows) - len(canceled), more)


def retry_jobs(
    db: Database, bus: EventBus, intake: JobIntake, where: JobFilter, limit: int, at: datetime
) -> RetryOutcome:
    """Retries up to `limit` matching failed or canceled jobs, as `Jobs.retry_job` would each
    (a new job from the old one's request, `retry_of` set), stored by one statement with
    their job.queued events, then published and dispatched together, each through its owner's
    dispatch window as a new job is (app/jobs/fairness.py)."""
    chosen = newest_first(select(*RETRIED_COLUMNS).where(*where.conditions(), _retryable()))
    with db.engine.begin() as connection:
        connection.execute(select(func.pg_advisory_xact_lock(RETRY_LOCK)))
        originals = connection.execute(chosen.limit(limit)).all()
        jobs = [_retry_of(row, at) for row in originals]
        stored = []
        if jobs:
            window = intake.window.params()
            if window["window"] is not None:
                fairness.lock_owners(connection, (job.owner for job in jobs))
            stored = connection.execute(sql.CREATE, create_params(jobs, window)).all()
        more = _exists(connection, where, _retryable())
    for job in jobs:
        metrics.job_created(job.kind, job.owner)
    if jobs:
        bus.publish([job.queued_event() for job in jobs])
        intake.dispatch([row for row in stored if row.dispatched_at is not None])
    return RetryOutcome(len(jobs), [job.id for job in jobs], more)


# What a retry clones of the old job's request, as `Jobs.retry_job` does (its run_at excepted:
# a retry runs now), plus what `expires_after_of` reads.
RETRIED_COLUMNS = (
    Job.id,
    Job.owner,
    Job.kind,
    Job.input,
    Job.priority,
    Job.max_attempts,
    Job.model,
    Job.models,
    Job.webhook,
    Job.timeout_seconds,
    Job.max_cost_usd,
    Job.expires_at,
    Job.run_at,
    Job.created_at,
)


def _retry_of(row: Any, at: datetime) -> NewJob:
    return NewJob(
        id=uuid.uuid4(),
        owner=row.owner,
        kind=row.kind,
        input=row.input,
        priority=row.priority,
        max_attempts=row.max_attempts,
        idempotency_key=None,
        request_hash=None,
        model=row.model,
        models=row.models,
        retry_of=row.id,
        at=at,
        webhook=row.webhook,
        expires_at=expiry(at, None, expires_after_of(row)),
        timeout_seconds=row.timeout_seconds,
        max_cost_usd=row.max_cost_usd,
    )


def _exists(connection: Connection, where: JobFilter, chosen: ColumnElement[bool]) -> bool:
    return bool(connection.scalar(select(exists().where(*where.conditions(), chosen))))
