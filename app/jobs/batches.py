"""Batches: many jobs created by one request, then followed, canceled and read back together.

A batch is stored the way the intake stores concurrent POSTs (app/jobs/intake.py), only on the
caller's thread, since it is a group already: the batch row, its jobs and their `job.queued`
events by one statement and one commit, then the events published and the Celery messages
pushed through pipelines. Row first, then publish, as for every job: a publish that fails
leaves the job queued for the sweeper.

A batch's counts, progress and cost are computed from its jobs when asked (one indexed
GROUP BY), never kept on the batch row, so they cannot drift from the jobs. Its jobs are
ordinary jobs: each runs, retries, is canceled and is read like any other, and its events
also go to the room `batch:<id>` (app/jobs/events.py).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from sqlalchemy import Row, func, select
from sqlalchemy.orm import Session

from app import metrics
from app.db import newest_page
from app.jobs import sql
from app.jobs.events import Event
from app.jobs.intake import NewJob
from app.jobs.payloads import CanceledPayload, QueuedPayload
from app.jobs.states import TERMINAL, JobStatus
from app.jobs.transitions import IdempotencyConflict, JobRequestError, expiry, now
from app.models import Batch, Job

if TYPE_CHECKING:
    from app.config import Settings
    from app.db import Database
    from app.jobs.events import EventBus
    from app.jobs.intake import JobIntake

logger = logging.getLogger(__name__)

MAX_ITEMS = 10_000
# Jobs read per query by the results download: it holds no connection between two pages.
RESULTS_PAGE = 500


class BatchNotFound(JobRequestError):
    pass


@dataclass(frozen=True)
class Timing:
    """When a job may start, how long it may stay queued once due, and its time limit."""

    run_at: datetime | None = None
    expires_after: int | None = None
    timeout_seconds: int | None = None

    def given(self) -> dict[str, Any]:
        """The fields a request set, as JSON values (for an Idempotency-Key's fingerprint)."""
        values = {
            "run_at": self.run_at.isoformat() if self.run_at is not None else None,
            "expires_after": self.expires_after,
            "timeout_seconds": self.timeout_seconds,
        }
        return {name: value for name, value in values.items() if value is not None}


@dataclass(frozen=True)
class BatchJob:
    """One validated item of a batch: what POST /jobs would create, with its defaults."""

    kind: str
    input: dict[str, Any]
    priority: int
    max_attempts: int
    model: str
    models: dict[str, str]  # role -> model, pinned as for a single job
    timing: Timing = field(default_factory=Timing)
    webhook: dict[str, Any] | None = None  # {"url", "events"}, checked by the API
    max_cost_usd: Decimal | None = None  # the job's own spend limit


@dataclass
class BatchSummary:
    """A batch's jobs, counted now: by status, with their usage and unfinished progress."""

    counts: dict[JobStatus, int] = field(default_factory=lambda: dict.fromkeys(JobStatus, 0))
    unfinished_progress: float = 0.0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: Decimal = Decimal(0)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def finished(self) -> int:
        return sum(self.counts[status] for status in TERMINAL)

    @property
    def percent(self) -> float:
        """Mean progress of the jobs (0-100), a finished job counting as 100."""
        if not self.total:
            return 100.0
        return round((self.unfinished_progress + 100.0 * self.finished) / self.total, 2)


@dataclass(frozen=True)
class StoredBatch:
    batch: Batch
    summary: BatchSummary
    replayed: bool  # an Idempotency-Key replay: the batch existed


@dataclass(frozen=True)
class CancelOutcome:
    canceled: int  # queued jobs canceled now
    stopping: int  # running jobs whose workers were told to stop


def get_batch(session: Session, owner: str, batch_id: uuid.UUID) -> Batch:
    batch = session.scalars(
        select(Batch).where(Batch.id == batch_id, Batch.owner == owner)
    ).one_or_none()
    if batch is None:
        raise BatchNotFound(f"no batch {batch_id}")
    return batch


def list_batches(
    session: Session, owner: str, limit: int, before: tuple[datetime, uuid.UUID] | None
) -> list[Batch]:
    """Newest first, after the keyset `before` (created_at, id) when given."""
    return newest_page(session, select(Batch).where(Batch.owner == owner), Batch, limit, before)


def summaries(session: Session, batch_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, BatchSummary]:
    """Each batch's summary, by one GROUP BY over the jobs_batch_item index."""
    found = {batch_id: BatchSummary() for batch_id in batch_ids}
    if not found:
        return found
    unfinished = Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value])
    rows = session.execute(
        select(
            Job.batch_id,
            Job.status,
            func.count(),
            func.coalesce(func.sum(Job.progress).filter(unfinished), 0.0),
            func.coalesce(func.sum(Job.tokens_in), 0),
            func.coalesce(func.sum(Job.tokens_out), 0),
            func.coalesce(func.sum(Job.cost_usd), 0),
        )
        .where(Job.batch_id.in_(list(found)))
        .group_by(Job.batch_id, Job.status)
    ).all()
    for batch_id, status, count, progress, tokens_in, tokens_out, cost in rows:
        summary = found[batch_id]
        summary.counts[JobStatus(status)] += count
        summary.unfinished_progress += float(progress)
        summary.tokens_in += int(tokens_in)
        summary.tokens_out += int(tokens_out)
        summary.cost_usd += Decimal(cost)
    return found


def result_pages(db: Database, batch_id: uuid.UUID) -> Iterator[list[Row[Any]]]:
    """The batch's jobs in item order, a page at a time, each page a short query of its own: a
    slow reader of a 10,000-job download holds neither a connection nor the rows."""
    after = -1
    while True:
        with db.transaction() as session:
            rows = session.execute(
                select(
                    Job.batch_item,
                    Job.id,
                    Job.status,
                    Job.output,
                    Job.error_code,
                    Job.error_message,
                )
                .where(Job.batch_id == batch_id, Job.batch_item > after)
                .order_by(Job.batch_item)
                .limit(RESULTS_PAGE)
            ).all()
        if not rows:
            return
        yield rows
        if len(rows) < RESULTS_PAGE:
            return
        after = rows[-1].batch_item


class Batches:
    """Creating and canceling batches: the clients they need, given once by create_app()
    (`runtime().batches`)."""

    def __init__(self, settings: Settings, db: Database, bus: EventBus, intake: JobIntake) -> None:
        self.settings = settings
        self.db = db
        self.bus = bus
        self.intake = intake

    def create_batch(
        self,
        *,
        owner: str,
        items: list[BatchJob],
        idempotency_key: str | None = None,
        fingerprint: str | None = None,
    ) -> StoredBatch:
        """Stores the batch and its jobs in one commit, then queues them. With an
        Idempotency-Key already used for a batch: that batch (same fingerprint), or
        IdempotencyConflict."""
        batch_id, at = uuid.uuid4(), now()
        jobs = [
            NewJob(
                id=uuid.uuid4(),
                owner=owner,
                kind=item.kind,
                input=item.input,
                priority=item.priority,
                max_attempts=item.max_attempts,
                idempotency_key=None,
                request_hash=None,
                model=item.model,
                models=item.models,
                webhook=item.webhook,
                retry_of=None,
                at=at,
                batch_id=batch_id,
                batch_item=position,
                run_at=item.timing.run_at,
                expires_at=expiry(at, item.timing.run_at, item.timing.expires_after),
                timeout_seconds=item.timing.timeout_seconds,
                max_cost_usd=item.max_cost_usd,
            )
            for position, item in enumerate(items)
        ]
        params = {
            "id": batch_id,
            "owner": owner,
            "item_count": len(jobs),
            "idempotency_key": idempotency_key,
            "request_hash": fingerprint,
            "at": at,
            "jobs": _jobs_json(jobs, held=self.intake.window.enabled),
            "event_type": QueuedPayload.event_type.value,
        }
        with self.db.engine.begin() as connection:
            stored = connection.execute(sql.CREATE_BATCH, params).one_or_none()
        if stored is None:
            return self._replay(owner, idempotency_key, fingerprint)
        for job in jobs:
            metrics.job_created(job.kind, owner)
        self.bus.publish([job.queued_event() for job in jobs])
        self._dispatch(owner, jobs)
        summary = BatchSummary()
        summary.counts[JobStatus.QUEUED] = len(jobs)
        batch = Batch(**{column: getattr(stored, column) for column in stored._fields})
        return StoredBatch(batch, summary, replayed=False)

    def _dispatch(self, owner: str, jobs: list[NewJob]) -> None:
        """With fair dispatch on, the jobs were stored held: as many as the owner's window has
        room for are released now (app/jobs/fairness.py), the others as its jobs finish."""
        if self.intake.window.enabled:
            self.intake.release_quietly([owner])
        else:
            self.intake.dispatch([job for job in jobs if not job.scheduled])

    def _replay(self, owner: str, key: str | None, fingerprint: str | None) -> StoredBatch:
        with self.db.transaction() as session:
            batch = session.scalars(
                select(Batch).where(Batch.owner == owner, Batch.idempotency_key == key)
            ).one()
            if batch.request_hash != fingerprint:
                raise IdempotencyConflict(
                    "this Idempotency-Key was already used with a different batch"
                )
            summary = summaries(session, [batch.id])[batch.id]
        return StoredBatch(batch, summary, replayed=True)

    def cancel_batch(self, owner: str, batch_id: uuid.UUID) -> CancelOutcome:
        """Cancels every queued job of the batch at once, in one statement, and asks the
        workers of its running jobs to stop (they end them `canceled`, as for one job)."""
        at = now()
        payload = CanceledPayload(reason="requested")
        with self.db.engine.begin() as connection:
            rows = connection.execute(
                sql.CANCEL_BATCH,
                {
                    "batch_id": batch_id,
                    "owner": owner,
                    "at": at,
                    "event_type": payload.event_type.value,
                    "data": json.dumps(payload.as_data()),
                },
            ).all()
        if not rows:
            raise BatchNotFound(f"no batch {batch_id}")
        canceled = [row for row in rows if row.status == JobStatus.CANCELED]
        for row in canceled:
            metrics.job_finished(row.kind, JobStatus.CANCELED.value, row.owner, row.started_at, at)
        stopping = [row.id for row in rows if row.status == JobStatus.RUNNING]
        self.bus.publish(
            [Event(row.id, row.owner, row.last_seq, payload, at, batch_id) for row in canceled]
        )
        self.bus.signal_cancels(stopping)
        if canceled:
            self.intake.release_quietly([owner])
        return CancelOutcome(canceled=len(canceled), stopping=len(stopping))


def _jobs_json(jobs: list[NewJob], held: bool) -> str:
    return json.dumps(
        [
            {
                "id": str(job.id),
                "kind": job.kind,
                "input": job.input,
                "priority": job.priority,
                "max_attempts": job.max_attempts,
                "model": job.model,
                "models": job.models or {},
                "run_at": job.run_at,
                "expires_at": job.expires_at,
                "timeout_seconds": job.timeout_seconds,
                "dispatched_at": None if held else job.dispatched_at,
                "webhook": job.webhook,
                "event": job.queued_event().data,
                "batch_item": job.batch_item,
                "max_cost_usd": job.max_cost_usd,
            }
            for job in jobs
        ],
        separators=(",", ":"),
        default=str,
    )
