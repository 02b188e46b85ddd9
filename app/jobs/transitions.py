"""The job state machine: every transition is one conditional UPDATE plus its event, in one
transaction. Whoever wins the compare-and-set owns the transition; the others see zero rows.

Who writes a job's events (and so allocates its `seq`):
- nobody holds a lease (queued, terminal): the API and the sweeper, with `last_seq + 1` in SQL;
- a worker holds the lease (running): only that worker, from a local counter it took at claim,
  so token deltas need no database write. Its writes are fenced by `attempt`; when the sweeper
  takes an expired lease it starts after the newest seq in PostgreSQL *and* the Redis Stream.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import redis
from sqlalchemy import delete, func, literal_column, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import metrics
from app.jobs import budgets, fairness, presence, sql
from app.jobs.events import Event, record_event
from app.jobs.intake import RUN_JOB_TASK, NewJob, message_labels
from app.jobs.payloads import (
    CanceledPayload,
    EventError,
    EventPayload,
    FailedPayload,
    RetryingPayload,
    StartedPayload,
    TerminalPayload,
)
from app.jobs.states import TERMINAL, TERMINAL_STATUSES, EventType, JobStatus
from app.models import CACHE_REQUESTED, Job, ProviderBatchItem
from app.queue import message_priority

if TYPE_CHECKING:
    from celery import Celery

    from app.config import Settings
    from app.db import Database
    from app.jobs.artifacts import Artifacts
    from app.jobs.events import EventBus
    from app.jobs.intake import JobIntake

logger = logging.getLogger(__name__)

WORKER_LOST = "worker_lost"
EXPIRED = "expired"
# A sweep expires, and publishes due scheduled jobs, in at most this many batches each (the
# sweep task has a time limit); more wait for the next sweep.
MAX_TIMED_BATCHES = 20


class JobRequestError(Exception):
    """A request the job's current state does not allow."""


class JobNotFound(JobRequestError):
    pass


class JobStateConflict(JobRequestError):
    def __init__(self, job: Job, message: str) -> None:
        super().__init__(message)
        self.job = job


class IdempotencyConflict(JobRequestError):
    pass


class LeaseLost(Exception):
    """This worker's attempt is no longer the job's current one; it must stop writing."""


def now() -> datetime:
    return datetime.now(UTC)


def request_fingerprint(body: dict[str, Any]) -> str:
    """Of the validated request with its defaults applied, so that two bodies asking for the
    same job (one spelling a default, one leaving it out) have the same fingerprint."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Created:
    job: Job
    replayed: bool  # an Idempotency-Key replay: the job existed


def _replay_idempotent(
    session: Session, owner: str, key: str | None, fingerprint: str | None
) -> Created:
    existing = session.scalars(
        select(Job).where(Job.owner == owner, Job.idempotency_key == key)
    ).one()
    if existing.request_hash != fingerprint:
        raise IdempotencyConflict(
            "this Idempotency-Key was already used with a different request body"
        )
    return Created(existing, replayed=True)


def get_job(session: Session, owner: str, job_id: uuid.UUID) -> Job:
    job = session.scalars(select(Job).where(Job.id == job_id, Job.owner == owner)).one_or_none()
    if job is None:
        raise JobNotFound(f"no job {job_id}")
    return job


def _finish_unleased(session: Session, job: Job, payload: TerminalPayload, **values: Any) -> Event:
    """Terminal transition of a job no worker holds (row locked by the caller)."""
    at = now()
    status = TERMINAL_STATUSES[payload.event_type]
    # Counted before the caller commits: every caller commits right after, and a rare rollback
    # miscounting one job is cheaper than a hook on every commit path.
    metrics.job_finished(job.kind, status.value, job.owner, job.started_at, at)
    return _transition_unleased(
        session, job, payload, status=status.value, finished_at=at, updated_at=at, **values
    )


def _transition_unleased(session: Session, job: Job, payload: EventPayload, **values: Any) -> Event:
    """A transition of a job no worker holds (row locked by the caller): `values` are set on
    the row, and the event is appended at the next seq."""
    job.updated_at = now()
    job.lease_expires_at = None
    job.last_seq += 1
    for name, value in values.items():
        setattr(job, name, value)
    session.flush()
    return record_event(
        session, Event(job.id, job.owner, job.last_seq, payload, batch_id=job.batch_id)
    )


@dataclass(frozen=True)
class Checkpoint:
    """A step an earlier attempt finished: its output, and what its model calls cost."""

    name: str
    attempt: int  # the attempt that finished it
    output: Any
    tokens_in: int
    tokens_out: int
    cost_usd: Decimal

    @classmethod
    def of(cls, row: dict[str, Any]) -> Checkpoint:
        return cls(
            name=row["name"],
            attempt=row["attempt"],
            output=row["output"],
            tokens_in=int(row["tokens_in"]),
            tokens_out=int(row["tokens_out"]),
            cost_usd=Decimal(str(row["cost_usd"])),
        )


@dataclass(frozen=True)
class Claim:
    job_id: uuid.UUID
    owner: str
    kind: str
    input: dict[str, Any]
    attempt: int
    max_attempts: int
    priority: int
    model: str | None
    seq: int  # the seq of this attempt's job.started event
    models: dict[str, str] = field(default_factory=dict)  # role -> model, pinned at creation
    checkpoints: dict[str, Checkpoint] = field(default_factory=dict)  # finished steps by name
    batch_id: uuid.UUID | None = None
    timeout_seconds: int | None = None  # the job's own time limit, if it asked for one
    max_cost_usd: Decimal | None = None  # the job's own spend limit, if it set one
    cost_usd: Decimal = Decimal(0)  # what its earlier attempts spent
    # Its owner's tightest budget when it was claimed, ("daily" | "monthly", USD left).
    tenant_limit: tuple[str, Decimal] | None = None
    started_at: datetime | None = None  # the job's first start (of any attempt)

    @classmethod
    def of_row(cls, row: Any, **fields: Any) -> Claim:
        """The claim of the attempt whose job's columns `row` has (by name: id, owner, kind,
        input, attempt, max_attempts, priority, model, models, last_seq as its seq, batch_id,
        max_cost_usd, cost_usd, started_at); `fields` set the others."""
        return cls(
            row.id,
            row.owner,
            row.kind,
            row.input,
            row.attempt,
            row.max_attempts,
            row.priority,
            row.model,
            row.last_seq,
            models=dict(row.models or {}),
            batch_id=row.batch_id,
            max_cost_usd=row.max_cost_usd,
            cost_usd=Decimal(row.cost_usd),
            started_at=row.started_at,
            **fields,
        )


def _retry_transition(
    attempt: int, delay: float, code: str, message: str, lost_worker: str | None = None
) -> tuple[RetryingPayload, dict[str, Any]]:
    """Back to queued for another attempt in `delay` seconds: the `job.retrying` payload and
    the row's new values, for the worker's own retry (a fenced write) and for the sweeper's
    retry of a job whose worker was lost (`lost_worker`, an ORM write)."""
    retry_at = now() + timedelta(seconds=delay)
    payload = RetryingPayload(
        reason="worker_lost" if lost_worker is not None else None,
        attempt=attempt,
        worker=lost_worker,
        delay=round(delay, 3),
        retry_at=retry_at,
        error=EventError(code=code, message=message),
    )
    values = {
        "status": JobStatus.QUEUED.value,
        "retry_at": retry_at,
        "lease_expires_at": None,
        "dispatched_at": retry_at,
        "error_code": code,
        "error_message": message,
    }
    return payload, values


def retry_delay(attempt: int, base: float, cap: float, retry_after: float | None = None) -> float:
    """Exponential backoff with jitter; a provider's Retry-After is a floor, never shortened."""
    backoff = min(cap, base * 2 ** max(0, attempt - 1))
    delay = random.uniform(backoff / 2, backoff)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


def call_cost(call: dict[str, Any]) -> Decimal:
    """What a model call adds to its job's total: the cost its response reported (OpenRouter's
    `usage.cost`) when there was one, else the price table's figure."""
    reported = call.get("reported_cost_usd")
    return Decimal(str(reported if reported is not None else call["cost_usd"]))


def _calls_params(calls: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "calls": _json(calls),
        "tokens_in": sum(call["tokens_in"] for call in calls),
        "tokens_out": sum(call["tokens_out"] for call in calls),
        "cost_usd": sum((call_cost(call) for call in calls), Decimal(0)),
    }


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class LeaseState:
    job_id: uuid.UUID
    cancel_requested: bool


@dataclass
class SweepReport:
    republished: int = 0
    recovered: int = 0
    failed: int = 0
    canceled: int = 0
    artifacts_swept: int = 0
    scheduled: int = 0  # scheduled jobs published because their run_at came
    released: int = 0  # held jobs published because their owner's window had room
    expired: int = 0  # queued jobs failed `expired`


def expiry(at: datetime, run_at: datetime | None, expires_after: float | None) -> datetime | None:
    """When a job created at `at` expires: `expires_after` seconds after it is due, its run_at
    if that is later than its creation, else its creation."""
    if expires_after is None:
        return None
    due = max(at, run_at) if run_at is not None else at
    return due + timedelta(seconds=expires_after)


def expires_after_of(job: Job) -> int | None:
    """The `expires_after` a job was created with (its expiry, less the time it became due)."""
    if job.expires_at is None:
        return None
    due = max(job.created_at, job.run_at) if job.run_at is not None else job.created_at
    return round((job.expires_at - due).total_seconds())


# Statistics -----------------------------------------------------------------------------------


def job_stats(session: Session, owner: str) -> dict[str, Any]:
    """An owner's counts, totals, durations and cache use. Two statements, each an index-only
    scan of the owner's part of `jobs_owner_status_created` (which carries every column read
    here) and `jobs_owner_cache_requests`: never the table, however big its rows (migration
    0015; the plans are in docs/performance.md)."""
    groups = session.execute(
        select(
            Job.status,
            Job.kind,
            func.count(),
            func.sum(Job.tokens_in),
            func.sum(Job.tokens_out),
            func.sum(Job.cost_usd),
            func.count().filter(Job.cached),
        )
        .where(Job.owner == owner)
        .group_by(Job.status, Job.kind)
    ).all()
    # Literals, not parameters: the planner must see the partial index's own predicate.
    cache_requests = (
        select(func.count())
        .where(Job.owner == owner, text(f"status = 'succeeded' AND {CACHE_REQUESTED}"))
        .scalar_subquery()
    )
    seconds = func.extract("epoch", Job.finished_at - Job.started_at)
    durations = session.execute(
        select(
            func.percentile_cont(literal_column("ARRAY[0.5, 0.9, 0.99]"))
            .within_group(seconds)
            .label("p"),
            func.count(),
            cache_requests,
        ).where(Job.owner == owner, Job.status == JobStatus.SUCCEEDED.value)
    ).one()
    by_status: dict[str, int] = {status.value: 0 for status in JobStatus}
    by_kind: dict[str, dict[str, int]] = {}
    tokens_in = tokens_out = hits = 0
    cost = Decimal(0)
    for status, kind, count, group_in, group_out, group_cost, group_hits in groups:
        by_status[status] += count
        by_kind.setdefault(kind, {})[status] = count
        tokens_in += group_in
        tokens_out += group_out
        cost += group_cost
        hits += group_hits
    p50, p90, p99 = durations.p or (None, None, None)
    return {
        "by_status": by_status,
        "by_kind": by_kind,
        "tokens_in": int(tokens_in),
        "tokens_out": int(tokens_out),
        "cost_usd": cost,
        "duration_seconds": {"p50": p50, "p90": p90, "p99": p99, "count": durations[1]},
        "cache": {"requests": durations[2], "hits": hits},
    }


def queue_depth(session: Session) -> tuple[int, int]:
    """Queued and running jobs of every owner (each count can use its status's partial index)."""

    def count(status: JobStatus) -> Any:
        return select(func.count()).where(Job.status == status.value).scalar_subquery()

    row = session.execute(select(count(JobStatus.QUEUED), count(JobStatus.RUNNING))).one()
    return row[0], row[1]


def queued_by_priority(session: Session) -> dict[int, int]:
    """Queued jobs of every owner by priority (held and scheduled ones included)."""
    rows = session.execute(
        select(Job.priority, func.count())
        .where(Job.status == JobStatus.QUEUED.value)
        .group_by(Job.priority)
    ).all()
    return {priority: count for priority, count in rows}


def failures_by_code(
    session: Session, window: timedelta, owner: str | None = None, kind: str | None = None
) -> dict[str, int]:
    """Jobs that failed within `window` (of every owner, or of `owner`; of every kind, or of
    `kind`), by error code, most frequent first."""
    code = func.coalesce(Job.error_code, "unknown").label("code")
    where = [Job.status == JobStatus.FAILED.value, Job.finished_at >= func.now() - window]
    if owner is not None:
        where.append(Job.owner == owner)
    if kind is not None:
        where.append(Job.kind == kind)
    rows = session.execute(
        select(code, func.count()).where(*where).group_by(code).order_by(func.count().desc())
    ).all()
    return {code: count for code, count in rows}


class Jobs:
    """The transitions that need the process's clients: the database, the event bus, the
    Celery app, the intake and the settings, given once by create_app() (`runtime().jobs`)."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        redis_client: redis.Redis,
        bus: EventBus,
        celery: Celery,
        intake: JobIntake,
        artifacts: Artifacts,
    ) -> None:
        self.settings = settings
        self.db = db
        self.redis = redis_client
        self.bus = bus
        self.celery = celery
        self.intake = intake
        self.artifacts = artifacts

    # Creating and dispatching ---------------------------------------------------------------------

    def create_job(
        self,
        *,
        owner: str,
        kind: str,
        input: dict[str, Any],
        priority: int = 0,
        max_attempts: int | None = None,
        idempotency_key: str | None = None,
        fingerprint: str | None = None,
        retry_of: uuid.UUID | None = None,
        model: str | None = None,
        models: dict[str, str] | None = None,
        run_at: datetime | None = None,
        expires_after: float | None = None,
        timeout_seconds: int | None = None,
        webhook: dict[str, Any] | None = None,
        max_cost_usd: Decimal | None = None,
    ) -> Created:
        """`max_attempts` and `model` default to the configuration's for the kind; `models`
        (role -> model) pins the model of each role the kind's steps name; `webhook`
        ({"url", "events"}, checked by the caller) is the job's own webhook. A job with a
        future `run_at` is stored but published by the sweeper once due; with
        `expires_after`, it fails `expired` if still queued that many seconds after it became
        due."""
        at = now()
        row = self.intake.create(
            NewJob(
                id=uuid.uuid4(),
                owner=owner,
                kind=kind,
                input=input,
                priority=priority,
                max_attempts=max_attempts or self.settings.job_max_attempts,
                idempotency_key=idempotency_key,
                request_hash=fingerprint,
                model=model or self.settings.model_for(kind),
                retry_of=retry_of,
                at=at,
                models=models or None,
                run_at=run_at,
                expires_at=expiry(at, run_at, expires_after),
                timeout_seconds=timeout_seconds,
                webhook=webhook,
                max_cost_usd=max_cost_usd,
            )
        )
        if row is None:
            with self.db.transaction() as session:
                return _replay_idempotent(session, owner, idempotency_key, fingerprint)
        return Created(row, replayed=False)

    def dispatch(
        self,
        job_id: uuid.UUID,
        priority: int = 0,
        countdown: float | None = None,
        *,
        kind: str | None = None,
        attempt: int | None = None,
    ) -> bool:
        """Publish the task (labelled with the job's kind and `attempt`, its attempts so far).
        The row is already committed, so a failure here loses nothing."""
        try:
            self.celery.send_task(
                RUN_JOB_TASK,
                args=[str(job_id)],
                **message_labels(str(job_id), kind, attempt),
                countdown=countdown,
                priority=message_priority(self.celery.conf.broker_url, priority),
            )
        except Exception as exc:  # kombu raises several unrelated types for a broker outage
            logger.warning(
                "publish failed, the sweeper will retry: %s", exc, extra={"job_id": job_id}
            )
            return False
        return True

    # Requests from the API ------------------------------------------------------------------------

    def cancel_job(self, owner: str, job_id: uuid.UUID) -> Job:
        """A queued job is canceled at once, and so is one waiting for a provider batch; a
        running one is asked to stop (its worker ends it)."""
        with self.db.transaction() as session:
            job = session.scalars(
                select(Job).where(Job.id == job_id, Job.owner == owner).with_for_update()
            ).one_or_none()
            if job is None:
                raise JobNotFound(f"no job {job_id}")
            status = JobStatus(job.status)
            if status is JobStatus.CANCELED:
                return job
            if status in TERMINAL:
                raise JobStateConflict(
                    job, f"the job already {status.value}; it cannot be canceled"
                )
            if status is JobStatus.QUEUED:
                event = _finish_unleased(session, job, CanceledPayload(reason="requested"))
            elif job.lease_expires_at is None:
                # Handed to a provider batch (app/jobs/provider_batches.py): no worker runs it,
                # so it ends now; the provider batch is canceled once none of its jobs is left.
                canceled = CanceledPayload(reason="requested", attempt=job.attempt)
                event = _finish_unleased(session, job, canceled)
                session.execute(
                    update(ProviderBatchItem)
                    .where(
                        ProviderBatchItem.job_id == job.id,
                        ProviderBatchItem.attempt == job.attempt,
                        ProviderBatchItem.ended_at.is_(None),
                    )
                    .values(ended_at=func.now())
                )
            else:
                job.cancel_requested_at = job.cancel_requested_at or now()
                job.updated_at = now()
                event = None
        if event is not None:
            self.bus.publish([event])
            self.intake.release_quietly([owner])
        else:
            self.bus.signal_cancel(job_id)
        return job

    def retry_job(self, owner: str, job_id: uuid.UUID) -> Job:
        """A new job cloned from the old one's request (kind, input, priority, max_attempts,
        models, expires_after, timeout_seconds, webhook and max_cost_usd: a configuration
        change since does not change what is retried), linked to it through `retry_of`. It
        starts from scratch: checkpoints belong to the old job, and it runs now: an old run_at
        is not carried over (it has passed: the old job ran, or was canceled or expired, after
        it)."""
        with self.db.transaction() as session:
            old = get_job(session, owner, job_id)
            if JobStatus(old.status) not in (JobStatus.FAILED, JobStatus.CANCELED):
                raise JobStateConflict(old, "only failed or canceled jobs can be retried")
            request = {
                "kind": old.kind,
                "input": old.input,
                "priority": old.priority,
                "max_attempts": old.max_attempts,
                "model": old.model,
                "models": old.models,
                "expires_after": expires_after_of(old),
                "timeout_seconds": old.timeout_seconds,
                "webhook": old.webhook,
                "max_cost_usd": old.max_cost_usd,
            }
        try:
            return self.create_job(owner=owner, retry_of=job_id, **request).job
        except IntegrityError:
            # The old job was deleted between the read above and the insert (retry_of is a
            # foreign key): for the caller it no longer exists.
            raise JobNotFound(job_id) from None

    def delete_job(self, owner: str, job_id: uuid.UUID) -> None:
        with self.db.transaction() as session:
            job = get_job(session, owner, job_id)
            if JobStatus(job.status) not in TERMINAL:
                raise JobStateConflict(job, "only finished jobs can be deleted; cancel it first")
            session.execute(delete(Job).where(Job.id == job_id, Job.status.in_(list(TERMINAL))))
        self.bus.delete_stream(job_id)
        # Its artifacts are unreachable already (their job_id went NULL with it); their bytes
        # go now, or at the next sweep if the store fails.
        self.artifacts.sweep_orphans()

    # The worker's side ----------------------------------------------------------------------------

    def claim_job(self, job_id: uuid.UUID, worker: str) -> Claim | None:
        """Compare-and-set queued -> running. None: a duplicate delivery, an early retry delivery,
        a delivery before the job's run_at or after its expires_at, a canceled or deleted job.
        The caller acknowledges and does nothing."""
        at = now()
        # The new attempt's number is known only once the compare-and-set has won: the statement
        # writes it into this payload (the `attempt` placeholder is replaced).
        template = StartedPayload(attempt=1, worker=worker)
        with self.db.engine.begin() as connection:
            row = connection.execute(
                sql.CLAIM,
                {
                    "id": job_id,
                    "worker": worker,
                    "at": at,
                    "lease_seconds": self.settings.lease_seconds,
                    "type": template.event_type.value,
                    "data": _json(template.as_data()),
                },
            ).one_or_none()
            # An owner without spend limits (cached, see budgets.has_limits) costs the claim no
            # second query.
            limited = row is not None and budgets.has_limits(lambda: connection, row.owner)
            budget = budgets.budget_of(connection, row.owner) if limited else None
        if row is None:
            return None
        claim = Claim.of_row(
            row,
            checkpoints={step["name"]: Checkpoint.of(step) for step in row.steps or ()},
            timeout_seconds=row.timeout_seconds,
            tenant_limit=budget.tightest() if budget is not None else None,
        )
        waited = None if row.waited_seconds is None else float(row.waited_seconds)
        metrics.job_claimed(claim.kind, waited)
        started = StartedPayload(attempt=claim.attempt, worker=worker)
        self.bus.publish([Event(job_id, claim.owner, claim.seq, started, at, claim.batch_id)])
        return claim

    def fenced_update(self, claim: Claim, seq: int, payload: EventPayload, **options: Any) -> Event:
        """`_fenced_write` for a caller that needs only the event."""
        return self._fenced_write(claim, seq, payload, **options)[0]

    def _fenced_write(
        self,
        claim: Claim,
        seq: int,
        payload: EventPayload,
        *,
        calls: list[dict[str, Any]] | None = None,
        checkpoint: dict[str, Any] | None = None,
        effects: tuple[sql.Effect, ...] = (),
        probe_held: bool = False,
        **values: Any,
    ) -> tuple[Event, bool]:
        """One write of the lease holder: its state change, its event (of the payload's type),
        the model calls made since its last write and, given a `checkpoint` (name, output,
        tokens_in, tokens_out, cost_usd, started_at), a finished step, and its `effects`
        (sql.Effect), in one statement;
        LeaseLost if its attempt no longer holds the job. `finished_at` and `lease_expires_at`
        are set to now() and NULL whatever value is given. The flag: with `probe_held`, whether
        the owner has held jobs (sql.fenced)."""
        event = Event(claim.job_id, claim.owner, seq, payload, batch_id=claim.batch_id)
        params = {
            "job_id": claim.job_id,
            "attempt": claim.attempt,
            "seq": seq,
            "type": event.type.value,
            "at": event.at,
            "data": _json(event.data),
            "owner": claim.owner,
            **_calls_params(calls or []),
        }
        if checkpoint is not None:
            params["checkpoint"] = _json(checkpoint)
        for effect in effects:
            params.update(effect.params)
        for column, value in values.items():
            if column not in sql.TIMESTAMP_EXPRESSIONS:
                params[column] = _json(value) if column in sql.JSON_COLUMNS else value
        with self.db.engine.begin() as connection:
            statement = sql.fenced(
                tuple(sorted(values)),
                checkpoint is not None,
                tuple(effect.cte for effect in effects),
                probe_held,
            )
            row = connection.execute(statement, params).one()
        if not row.changed:
            if calls:
                self._record_calls(claim, calls, totals_only=True)
            raise LeaseLost(f"job {claim.job_id} attempt {claim.attempt} no longer holds the lease")
        self.bus.publish([event])
        return event, probe_held and row.held

    def finish_job(self, claim: Claim, seq: int, payload: TerminalPayload, **values: Any) -> Event:
        """The attempt's outcome: the job ends in the status of the payload's event type, and
        its owner's next held job, if any, takes its place in the dispatch window. Whether the
        owner has any is read by the finish's own statement: an owner holding none (the usual
        case) costs no release transaction. One held by an intake that commits just after the
        finish is released by the next sweep, as one a lost release would be."""
        event, held = self._fenced_write(
            claim,
            seq,
            payload,
            probe_held=True,
            status=TERMINAL_STATUSES[payload.event_type].value,
            finished_at=None,
            lease_expires_at=None,
            **values,
        )
        status = TERMINAL_STATUSES[payload.event_type].value
        metrics.job_finished(claim.kind, status, claim.owner, claim.started_at, event.at)
        if held:
            self.intake.release_soon(claim.owner)
        return event

    def schedule_retry(
        self,
        claim: Claim,
        seq: int,
        delay: float,
        code: str,
        message: str,
        calls: list[dict[str, Any]] | None = None,
    ) -> Event:
        payload, values = _retry_transition(claim.attempt, delay, code, message)
        event = self.fenced_update(claim, seq, payload, calls=calls, **values)
        metrics.job_retried(claim.kind, code)
        self.dispatch(
            claim.job_id, claim.priority, countdown=delay, kind=claim.kind, attempt=claim.attempt
        )
        return event

    def record_model_calls(self, claim: Claim, calls: list[dict[str, Any]]) -> None:
        """Model calls with no state change to ride on (e.g. the attempt lost its lease)."""
        if calls:
            self._record_calls(claim, calls, totals_only=False)

    def _record_calls(
        self, claim: Claim, calls: list[dict[str, Any]], *, totals_only: bool
    ) -> None:
        """Not fenced by attempt on purpose: the money was spent whether or not this attempt still
        holds the lease, and increments commute, so no newer write is clobbered. `totals_only`:
        the rows were already inserted by a fenced write that lost."""
        params = {
            "job_id": claim.job_id,
            "attempt": claim.attempt,
            "owner": claim.owner,
            **_calls_params(calls),
        }
        if totals_only:
            params["calls"] = "[]"
        with self.db.engine.begin() as connection:
            connection.execute(sql.RECORD_CALLS, params)

    def renew_leases(
        self, held: list[tuple[uuid.UUID, int]], progress: Iterable[Event] = ()
    ) -> dict[uuid.UUID, LeaseState]:
        """Extends every lease this worker process still holds, in one statement, and writes
        the job.progress events its jobs sent live since the last beat (`progress`, at most one
        per job). A job missing from the answer has been taken away (sweeper, deletion): its
        worker must stop."""
        if not held:
            return {}
        events = {event.job_id: event for event in progress}
        rows = []
        for job_id, attempt in held:
            row: dict[str, Any] = {"id": str(job_id), "attempt": attempt}
            if (event := events.get(job_id)) is not None:
                row |= {
                    "seq": event.seq,
                    "at": event.at.isoformat(),
                    "data": event.data,
                    "progress": event.data["progress"],
                }
            rows.append(row)
        with self.db.engine.begin() as connection:
            found = connection.execute(
                sql.RENEW_LEASES,
                {
                    "held": _json(rows),
                    "lease_seconds": self.settings.lease_seconds,
                    "progress_type": EventType.PROGRESS.value,
                },
            ).all()
        return {row.id: LeaseState(row.id, row.cancel_requested_at is not None) for row in found}

    # The sweeper ----------------------------------------------------------------------------------

    def sweep(self, batch: int = 500) -> SweepReport:
        """Nothing stays queued or running forever: fail queued jobs past their expiry, take
        back expired leases, publish scheduled jobs that are due, re-publish what nobody
        claimed. Safe to run concurrently (SKIP LOCKED, and every change is a CAS)."""
        report = SweepReport()
        self._expire_queued(report, batch)
        self._recover_expired_leases(report, batch)
        self._dispatch_due(report, batch)
        self._republish_unclaimed(report, batch)
        report.artifacts_swept = self.artifacts.sweep_orphans()
        metrics.swept()
        if any(asdict(report).values()):
            logger.info("sweep: %s", report)
        try:
            presence.record_sweep(self.redis, self.settings.sweeper_interval, asdict(report))
        except redis.RedisError as exc:
            # The sweep itself is done; GET /health shows both the stale sweep and Redis down.
            logger.warning("sweep not recorded: %s", exc)
        return report

    def _expire_queued(self, report: SweepReport, batch: int) -> None:
        """Queued jobs past their expires_at fail `expired`, a batch per statement, until none
        is left (or MAX_TIMED_BATCHES)."""
        for _ in range(MAX_TIMED_BATCHES):
            expired = self._expire_batch(batch)
            report.expired += expired
            if expired < batch:
                return

    def _expire_batch(self, batch: int) -> int:
        """One statement: up to `batch` expired jobs failed with their events, which are then
        published together."""
        at = now()
        message = "the job was still queued at its expires_at"
        template = FailedPayload(
            reason="expired", attempt=0, error=EventError(code=EXPIRED, message=message)
        )
        with self.db.engine.begin() as connection:
            rows = connection.execute(
                sql.EXPIRE,
                {
                    "batch": batch,
                    "code": EXPIRED,
                    "message": message,
                    "type": template.event_type.value,
                    "at": at,
                    "data": _json(template.as_data()),
                },
            ).all()
        for row in rows:
            metrics.job_finished(row.kind, JobStatus.FAILED.value, row.owner, row.started_at, at)
        events = [
            Event(
                row.id,
                row.owner,
                row.last_seq,
                template.model_copy(update={"attempt": row.attempt}),
                at,
                row.batch_id,
            )
            for row in rows
        ]
        self.bus.publish(events)
        return len(rows)

    def _dispatch_due(self, report: SweepReport, batch: int) -> None:
        """Held jobs (scheduled ones whose run_at has come, and jobs past their owner's window)
        that their owner's window has room for: marked published and published, owner by owner
        (app/jobs/fairness.py). The safety net of the releases at finish and cancel, which a
        crash or a race can miss."""
        with self.db.engine.begin() as connection:
            limit = {"limit": batch * MAX_TIMED_BATCHES}
            owners = connection.execute(fairness.HELD_OWNERS, limit).scalars().all()
        released = self.intake.release(owners, batch)
        report.scheduled += sum(1 for row in released if row.run_at is not None)
        report.released += sum(1 for row in released if row.run_at is None)

    def _recover_expired_leases(self, report: SweepReport, batch: int) -> None:
        events: list[Event] = []
        to_dispatch: list[tuple[uuid.UUID, int, float, str, int]] = []
        with self.db.transaction() as session:
            expired = session.scalars(
                select(Job)
                .where(Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < func.now())
                .order_by(Job.lease_expires_at)
                .limit(batch)
                .with_for_update(skip_locked=True)
            ).all()
            for job in expired:
                # The lost worker may have streamed deltas past the last seq it wrote here.
                job.last_seq = max(job.last_seq, self.bus.stream_tail_seq(job.id))
                event, retry_in = self._take_back(session, job, report)
                events.append(event)
                if retry_in is not None:
                    to_dispatch.append((job.id, job.priority, retry_in, job.kind, job.attempt))
        self.bus.publish(events)
        for job_id, priority, delay, kind, attempt in to_dispatch:
            self.dispatch(job_id, priority, countdown=delay, kind=kind, attempt=attempt)

    def _take_back(
        self, session: Session, job: Job, report: SweepReport
    ) -> tuple[Event, float | None]:
        """A job whose worker was lost (row locked): canceled if a cancel was pending, failed
        if its attempts are used up, else queued again. The event, and the delay before the
        next attempt when there is one."""
        if job.cancel_requested_at is not None:
            report.canceled += 1
            metrics.lease_recovered("canceled")
            canceled = CanceledPayload(reason="worker_lost", attempt=job.attempt, worker=job.worker)
            return _finish_unleased(session, job, canceled), None
        if job.attempt >= job.max_attempts:
            report.failed += 1
            metrics.lease_recovered("failed")
            message = f"the worker running attempt {job.attempt} stopped answering"
            failed = FailedPayload(
                reason="worker_lost",
                attempt=job.attempt,
                worker=job.worker,
                error=EventError(code=WORKER_LOST, message=message),
            )
            values = {"error_code": WORKER_LOST, "error_message": message}
            return _finish_unleased(session, job, failed, **values), None
        report.recovered += 1
        metrics.lease_recovered("requeued")
        metrics.job_retried(job.kind, WORKER_LOST)
        settings = self.settings
        delay = retry_delay(job.attempt, settings.retry_base_delay, settings.retry_max_delay)
        payload, values = _retry_transition(
            job.attempt, delay, WORKER_LOST, "the worker stopped answering", lost_worker=job.worker
        )
        return _transition_unleased(session, job, payload, **values), delay

    def _republish_unclaimed(self, report: SweepReport, batch: int) -> None:
        grace = timedelta(seconds=self.settings.dispatch_grace_seconds)
        with self.db.transaction() as session:
            stale = (
                select(Job.id)
                .where(
                    Job.status == JobStatus.QUEUED.value,
                    Job.dispatched_at < func.now() - grace,
                )
                .order_by(Job.dispatched_at)
                .limit(batch)
                .with_for_update(skip_locked=True)
                .scalar_subquery()
            )
            rows = session.execute(
                update(Job)
                .where(Job.id.in_(stale))
                .values(dispatched_at=func.now())
                .returning(Job.id, Job.priority, Job.kind, Job.attempt)
            ).all()
        for row in rows:
            if self.dispatch(row.id, row.priority, kind=row.kind, attempt=row.attempt):
                report.republished += 1
