"""Job creation as a group commit: the jobs that API threads submit together are stored by one
INSERT and one commit, their `job.queued` events by one Redis call, and their Celery messages
by one Redis pipeline (kombu's `Producer.batch()`).

Each job still follows the design's rule, row first and then publish: nothing is published
before the commit that stores it, and a publish that fails leaves the job `queued` with its
`dispatched_at`, for the sweeper to publish again. A request thread waits for its own job's
row, so a 202 still means the job is committed. A job past its owner's dispatch window is
stored held and published later, on release (app/jobs/fairness.py): the same INSERT decides.

Why: per request, the commit, the Redis round trips and kombu's per-publish client were most
of what `POST /jobs` cost beyond Flask itself (docs/performance.md); shared by a batch they
cost a fraction, and on a disk where every commit waits for an fsync, one commit per batch
instead of per job is the difference that matters most.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from celery import Celery
from sqlalchemy import Row
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from app import metrics
from app.batching import GroupCommit
from app.db import Database
from app.jobs import fairness, sql
from app.jobs.events import Event, EventBus
from app.jobs.fairness import DispatchWindow
from app.jobs.payloads import QueuedPayload
from app.queue import message_priority

logger = logging.getLogger(__name__)

RUN_JOB_TASK = "conveyor.run_job"
MAX_BATCH = 100
# A request gives up waiting for its batch after this long (the API answers 503); the database
# and Redis calls inside time out sooner on their own.
CREATE_WAIT_SECONDS = 30.0


@dataclass(frozen=True)
class NewJob:
    id: uuid.UUID
    owner: str
    kind: str
    input: dict[str, Any]
    priority: int
    max_attempts: int
    idempotency_key: str | None
    request_hash: str | None
    model: str | None
    retry_of: uuid.UUID | None
    at: datetime
    models: dict[str, str] | None = None  # role -> model, for kinds whose steps name roles
    # Set for the jobs of a batch (app/jobs/batches.py), which stores them itself.
    batch_id: uuid.UUID | None = None
    batch_item: int | None = None
    # The job's own webhook, {"url", "events"} (docs/webhooks.md).
    webhook: dict[str, Any] | None = None
    # Not before this instant: stored unpublished, the sweeper publishes it once due.
    run_at: datetime | None = None
    # Still queued at this instant: the sweeper fails it `expired`, and no claim starts it.
    expires_at: datetime | None = None
    timeout_seconds: int | None = None  # the attempt's time limit, under the deployment's
    max_cost_usd: Decimal | None = None  # the job's own spend limit (docs/api.md#budgets)

    @property
    def scheduled(self) -> bool:
        """Held back for the sweeper rather than published now: its run_at is still ahead."""
        return self.run_at is not None and self.run_at > self.at

    @property
    def dispatched_at(self) -> datetime | None:
        """NULL for a scheduled job (no message exists yet): the unclaimed-job republish
        never sees it, and the release of held jobs (app/jobs/fairness.py) does. A job due
        now may still be stored held, when its owner's dispatch window is full."""
        return None if self.scheduled else self.at

    def queued_event(self) -> Event:
        """The job's first event (seq 1), stored with the row and then published."""
        payload = QueuedPayload(
            kind=self.kind, retry_of=self.retry_of, run_at=self.run_at, expires_at=self.expires_at
        )
        return Event(self.id, self.owner, 1, payload, self.at, self.batch_id)


def message_labels(job_id: str, kind: str | None, attempt: int | None) -> dict[str, str]:
    """What Flower and the workers' logs show of a job's message, never its input: the task
    name with the job's kind (Celery's `shadow`: `conveyor.run_job:chat`; the task run is
    still conveyor.run_job) and, as its arguments, the job's id and the attempt the message is
    for (the job's attempts so far, plus one)."""
    labels = {"argsrepr": f"['{job_id}']", "kwargsrepr": "{}"}
    if kind is not None:
        labels["shadow"] = f"{RUN_JOB_TASK}:{kind}"
    if attempt is not None:
        labels["argsrepr"] = f"['{job_id}'] attempt {attempt + 1}"
    return labels


class Dispatchable(Protocol):
    """What a Celery message is made from: a new job, or a row the sweeper found due."""

    @property
    def id(self) -> uuid.UUID: ...

    @property
    def priority(self) -> int: ...


# What the intake gives back for one job: its row, None when its Idempotency-Key was already
# used (the caller replays), or the error that kept this one job from being stored.
StoreOutcome = Row[Any] | None | Exception


def create_params(
    jobs: Sequence[NewJob], window: dict[str, int | None]
) -> dict[str, str | int | None]:
    """The parameters of `sql.CREATE` that store `jobs` with their job.queued events, under
    the dispatch `window` (fairness.DispatchWindow.params())."""
    rows = [
        {
            **vars(job),
            "dispatched_at": job.dispatched_at,
            "event": job.queued_event().data,
            "ord": position,
        }
        for position, job in enumerate(jobs)
    ]
    return {
        "jobs": json.dumps(rows, default=str, separators=(",", ":")),
        "event_type": QueuedPayload.event_type.value,
        **window,
    }


class JobIntake:
    def __init__(self, db: Database, bus: EventBus, celery: Celery, window: DispatchWindow) -> None:
        self._db = db
        self._bus = bus
        self._celery = celery
        self.window = window
        self._releaser = fairness.Releaser(self.release)
        self._group = GroupCommit("job-intake", self.store_and_dispatch, max_batch=MAX_BATCH)

    def create(self, job: NewJob) -> Row[Any] | None:
        """Stores the job and publishes it; None when its Idempotency-Key was already used."""
        stored = self._group.call(job, CREATE_WAIT_SECONDS)
        if isinstance(stored, Exception):
            raise stored
        return stored

    def store_and_dispatch(self, batch: list[NewJob]) -> list[StoreOutcome]:
        """One batch: one INSERT and commit, then its events and Celery messages (what the
        writer thread runs; callable directly, e.g. to store a known set of jobs together)."""
        stored = self._store(batch)
        created = [job for job, row in zip(batch, stored, strict=True) if isinstance(row, Row)]
        for job in created:
            metrics.job_created(job.kind, job.owner)
        if created:
            self._bus.publish([job.queued_event() for job in created])
            # A job its owner's window held has no dispatched_at: it is published on release.
            self.dispatch([row for row in stored if isinstance(row, Row) and row.dispatched_at])
        return stored

    def _store(self, batch: list[NewJob]) -> list[StoreOutcome]:
        try:
            rows = self._insert(batch)
        except (IntegrityError, DataError) as exc:
            if len(batch) == 1:
                return [exc]
            # One bad job must not fail the others that happened to share its batch.
            return [self._store([job])[0] for job in batch]
        return [rows.get(job.id) for job in batch]

    def _insert(self, batch: Sequence[NewJob]) -> dict[uuid.UUID, Row[Any]]:
        window = self.window.params()
        with self._db.engine.begin() as connection:
            if window["window"] is not None:
                fairness.lock_owners(connection, (job.owner for job in batch))
            rows = connection.execute(sql.CREATE, create_params(batch, window)).all()
        return {row.id: row for row in rows}

    def release(self, owners: Iterable[str], batch: int = 500) -> list[Row[Any]]:
        """Publishes the held jobs of `owners` that their windows now have room for (one cheap
        probe for an owner that holds none). Called when an owner's outstanding jobs leave its
        window (a finish, a cancel, a raised window) and by every sweep; a failure leaves them
        held for the next sweep. Returns their rows (id, priority, run_at)."""
        released: list[Row[Any]] = []
        for owner in sorted(set(owners)):
            while True:
                window = self.window.params()
                with self._db.engine.begin() as connection:
                    rows = fairness.release_held(connection, owner, window, batch)
                # A publish that fails leaves them queued with their dispatched_at set: the
                # unclaimed-job republish sends them again after the grace period.
                self.dispatch(rows)
                released.extend(rows)
                if len(rows) < batch:
                    break
        return released

    def release_soon(self, owner: str) -> None:
        """`release` on the process's releaser thread, coalesced with other owners' (what a
        worker calls as a job finishes: its slot is not held while the tenant's lock is)."""
        self._releaser.poke(owner)

    def release_quietly(self, owners: Iterable[str]) -> None:
        """`release` for a caller whose own work is done and must not fail now (a finished
        job, a cancel): the sweeper releases what this could not."""
        try:
            self.release(owners)
        except SQLAlchemyError as exc:
            logger.warning("release of held jobs failed, the sweeper will retry: %s", exc)

    def dispatch(self, jobs: Sequence[Dispatchable]) -> None:
        """Their Celery messages through one pipeline (kombu flushes it every 1,000). Jobs
        whose publish fails stay queued for the sweeper.

        Per message, Celery would check the queue's declaration again and write the argument's
        repr with its `saferepr`: a third of the CPU of dispatching a batch of 1,000 (0.3 ms a
        job, most of a batch's cost). The first message declares the queue as usual, which
        kombu needs for Redis to route the rest; the others skip the check. The repr, a list
        of one id string, is the same text saferepr writes."""
        if not jobs:
            return
        broker = self._celery.conf.broker_url
        try:
            with self._celery.producer_or_acquire() as producer, producer.batch():
                for position, job in enumerate(jobs):
                    job_id = str(job.id)
                    kind, attempt = getattr(job, "kind", None), getattr(job, "attempt", 0)
                    self._celery.send_task(
                        RUN_JOB_TASK,
                        args=[job_id],
                        **message_labels(job_id, kind, attempt),
                        priority=message_priority(broker, job.priority),
                        producer=producer,
                        **({} if position == 0 else {"declare": []}),
                    )
        except Exception as exc:  # kombu raises several unrelated types for a broker outage
            logger.warning(
                "publish of %d jobs failed, the sweeper will retry: %s",
                len(jobs),
                exc,
                extra={"job_id": jobs[0].id},
            )
