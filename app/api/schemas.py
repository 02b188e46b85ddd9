"""The job's public shapes: what the API accepts and returns, and the event envelope."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ValidationInfo,
    field_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

from app.jobs.batches import BatchSummary
from app.jobs.events import MAX_SEQ
from app.jobs.payloads import EventEnvelope
from app.jobs.states import JobStatus
from app.models import Batch, Job

# Kind names as the registry spells them; anything else (a NUL byte, say) is refused here.
KIND_PATTERN = r"^[a-z][a-z0-9_-]{0,63}$"


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(pattern=KIND_PATTERN, examples=["chat"])
    input: dict[str, Any] = Field(description="The kind's input; see GET /kinds for its schema.")
    priority: int = Field(0, ge=0, le=9, description="0 (default) to 9 (most urgent)")
    max_attempts: int | None = Field(None, ge=1, le=10)


# Money is NUMERIC(16, 8) in PostgreSQL; `str(Decimal)` would say "0E-8" for a zero there.
USD_QUANTUM = Decimal("0.00000001")


def usd(amount: Decimal | int) -> str:
    """US dollars as a plain decimal string with the database's 8 places: "0.00000000"."""
    return f"{Decimal(amount).quantize(USD_QUANTUM):f}"


# Money in a response: the domain's Decimal, formatted by `usd`.
Usd = Annotated[
    str,
    BeforeValidator(usd),
    Field(
        description="US dollars as a plain decimal string with 8 places", examples=["0.00003150"]
    ),
]


class JobError(BaseModel):
    code: str
    message: str | None


class Usage(BaseModel):
    tokens_in: int
    tokens_out: int
    cost_usd: Usd


class JobLinks(BaseModel):
    self: str
    result: str
    events: str


class JobOut(BaseModel):
    id: uuid.UUID
    kind: str
    status: JobStatus
    progress: float = Field(ge=0, le=100)
    attempt: int
    max_attempts: int
    priority: int
    model: str | None
    error: JobError | None
    usage: Usage
    cancel_requested: bool
    retry_of: uuid.UUID | None
    batch_id: uuid.UUID | None = Field(description="The batch the job was created in, if any")
    retry_at: datetime | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    links: JobLinks

    @classmethod
    def of(cls, job: Job, prefix: str) -> JobOut:
        base = f"{prefix}/jobs/{job.id}"
        return cls(
            id=job.id,
            kind=job.kind,
            status=JobStatus(job.status),
            progress=job.progress,
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            priority=job.priority,
            model=job.model,
            error=JobError(code=job.error_code, message=job.error_message)
            if job.error_code and job.status == JobStatus.FAILED
            else None,
            usage=Usage(tokens_in=job.tokens_in, tokens_out=job.tokens_out, cost_usd=job.cost_usd),
            cancel_requested=job.cancel_requested_at is not None,
            retry_of=job.retry_of,
            batch_id=job.batch_id,
            retry_at=job.retry_at,
            created_at=job.created_at,
            updated_at=job.updated_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            links=JobLinks(self=base, result=f"{base}/result", events=f"{base}/events"),
        )


class JobDetail(JobOut):
    input: dict[str, Any]


class JobResult(BaseModel):
    id: uuid.UUID
    status: JobStatus
    output: dict[str, Any] | None
    error: JobError | None
    usage: Usage


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(description="Pass as `cursor` to get the next page")


class JobListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: JobStatus | None = None
    kind: str | None = Field(None, pattern=KIND_PATTERN)
    limit: int = Field(20, ge=1, le=100)
    cursor: str | None = Field(None, max_length=200)


class EventOut(BaseModel):
    """One event as the API serves it. Its schema is `EventEnvelope` (app/jobs/payloads.py),
    through whose payload models every publisher writes (tests/integration/test_event_payloads.py
    holds them to it). Reading checks the envelope only: a stored event stays readable after its
    payload model changes, rather than failing the page."""

    job_id: uuid.UUID
    seq: int
    prev: int | None = None
    type: str
    at: datetime
    data: dict[str, Any]

    @classmethod
    def __get_pydantic_json_schema__(
        cls, _core_schema: CoreSchema, _handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"$ref": f"#/components/schemas/{EventEnvelope.__name__}"}


class EventsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    after: int = Field(
        0, ge=0, le=MAX_SEQ, description="Return events with a seq greater than this"
    )
    wait: float = Field(0, ge=0, le=30, description="Seconds to wait for a new event (long poll)")
    limit: int = Field(500, ge=1, le=1000)


class EventPage(BaseModel):
    items: list[EventOut]
    source: str = Field(description="`stream` (every event) or `database` (no token deltas)")
    last_seq: int
    status: JobStatus


class LogEntry(BaseModel):
    seq: int
    at: datetime
    level: str
    message: str
    fields: dict[str, Any]


class LogPage(BaseModel):
    items: list[LogEntry]


class KindOut(BaseModel):
    name: str
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]


class KindList(BaseModel):
    items: list[KindOut]


class Stats(BaseModel):
    by_status: dict[str, int]
    by_kind: dict[str, dict[str, int]]
    tokens_in: int
    tokens_out: int
    cost_usd: Usd
    duration_seconds: dict[str, float | int | None]


class Live(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyCheck(BaseModel):
    ok: bool
    detail: str | None = None
    latency_ms: float | None = None
    checked_at: datetime | None = Field(
        None,
        description="When the check ran. Each process runs a check at most once per "
        "`CONVEYOR_HEALTH_MAX_AGE` seconds and every caller meanwhile shares its result.",
    )


class Ready(BaseModel):
    status: Literal["healthy", "unhealthy"] = Field(
        description="healthy: this process reaches PostgreSQL and Redis; unhealthy (503): not"
    )
    checks: dict[str, ReadyCheck] = Field(description="database, redis")


Condition = Literal["ok", "degraded", "down"]


class Component(BaseModel):
    status: Condition
    detail: str | None = None


class StoreHealth(Component):
    latency_ms: float | None = None


class WorkersHealth(Component):
    count: int | None = Field(
        description="worker processes whose heartbeat is younger than 3 of their intervals"
    )
    slots: int | None = Field(description="jobs those processes can run at once")
    running: int | None = Field(description="jobs they were running at their last heartbeat")
    pools: dict[str, int] = Field(description="processes by Celery pool")
    last_heartbeat_age_s: float | None = Field(
        description="age of the newest heartbeat of any worker seen in the last hour"
    )


class SweeperHealth(Component):
    interval_s: float | None
    last_sweep_at: datetime | None
    last_sweep_age_s: float | None
    last_sweep: dict[str, int] | None = Field(
        description="what the last sweep did: republished, recovered, failed, canceled"
    )


class Components(BaseModel):
    database: StoreHealth
    redis: StoreHealth
    workers: WorkersHealth
    sweeper: SweeperHealth


class QueueDepth(BaseModel):
    queued: int | None = Field(description="queued jobs in PostgreSQL (due and awaiting retry)")
    running: int | None = Field(description="running jobs in PostgreSQL")
    broker: int | None = Field(
        description="messages waiting in the broker's Redis lists; null when the broker is "
        "not the Redis of CONVEYOR_REDIS_URL"
    )
    detail: str | None = Field(None, description="why queued and running are null")


class Failures(BaseModel):
    window_s: int
    total: int | None
    by_code: dict[str, int] = Field(description="failed jobs by error code, most frequent first")
    detail: str | None = Field(None, description="why total is null")


class Health(BaseModel):
    status: Condition = Field(
        description="down: PostgreSQL or Redis unreachable; degraded: no live worker, or sweeps "
        "overdue; ok otherwise"
    )
    checked_at: datetime = Field(description="when the oldest figure here was gathered")
    components: Components
    queue: QueueDepth
    failures: Failures


# Keyset cursors ---------------------------------------------------------------------------------


class BadCursor(ValueError):
    pass


def encode_cursor(created_at: datetime, job_id: uuid.UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(job_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        return datetime.fromisoformat(created), uuid.UUID(job_id)
    except (ValueError, TypeError) as exc:
        raise BadCursor("not a cursor this API returned") from exc


# Batches -----------------------------------------------------------------------------------------

MAX_BATCH_ITEMS = 10_000
# A model name as providers spell them ("gpt-4o-mini", "meta-llama/Llama-3.1-8B-Instruct").
MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}$"


class BatchItem(BaseModel):
    """One job of a batch: what POST /jobs takes, plus the model to run it with."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(pattern=KIND_PATTERN, examples=["chat"])
    input: dict[str, Any] = Field(description="The kind's input; see GET /kinds for its schema.")
    priority: int = Field(0, ge=0, le=9, description="0 (default) to 9 (most urgent)")
    max_attempts: int | None = Field(None, ge=1, le=10)
    model: str | None = Field(
        None,
        pattern=MODEL_PATTERN,
        description="The model to call; default: the deployment's model for the kind",
    )


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[BatchItem] = Field(
        min_length=1,
        max_length=MAX_BATCH_ITEMS,
        description=f"1 to {MAX_BATCH_ITEMS:,} jobs, each of any kind",
    )


class BatchCounts(BaseModel):
    queued: int
    running: int
    succeeded: int
    failed: int
    canceled: int


class BatchProgress(BaseModel):
    finished: int = Field(description="jobs that succeeded, failed or were canceled")
    total: int = Field(description="jobs in the batch (a deleted job leaves it)")
    percent: float = Field(
        ge=0, le=100, description="mean progress of the jobs, a finished job counting as 100"
    )


class BatchLinks(BaseModel):
    self: str
    results: str
    cancel: str


class BatchOut(BaseModel):
    id: uuid.UUID
    item_count: int = Field(description="items the batch was created with")
    done: bool = Field(description="every job has finished")
    counts: BatchCounts
    progress: BatchProgress
    usage: Usage = Field(description="the jobs' tokens and cost so far")
    created_at: datetime
    canceled_at: datetime | None = Field(description="when the batch was first canceled")
    links: BatchLinks

    @classmethod
    def of(cls, batch: Batch, summary: BatchSummary, prefix: str) -> BatchOut:
        base = f"{prefix}/batches/{batch.id}"
        return cls(
            id=batch.id,
            item_count=batch.item_count,
            done=summary.finished == summary.total,
            counts=BatchCounts(**{status.value: n for status, n in summary.counts.items()}),
            progress=BatchProgress(
                finished=summary.finished, total=summary.total, percent=summary.percent
            ),
            usage=Usage(
                tokens_in=summary.tokens_in,
                tokens_out=summary.tokens_out,
                cost_usd=summary.cost_usd,
            ),
            created_at=batch.created_at,
            canceled_at=batch.canceled_at,
            links=BatchLinks(self=base, results=f"{base}/results", cancel=f"{base}/cancel"),
        )


class BatchPage(BaseModel):
    items: list[BatchOut]
    next_cursor: str | None = Field(description="Pass as `cursor` to get the next page")


class BatchListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(20, ge=1, le=100)
    cursor: str | None = Field(None, max_length=200)


class BatchResultLine(BaseModel):
    """One line of a batch's results download: one job, in the order of the batch's items."""

    item: int = Field(description="the job's position in the batch, from 0")
    id: uuid.UUID
    status: JobStatus
    output: dict[str, Any] | None = Field(description="once succeeded; partial when canceled")
    error: JobError | None = Field(description="once failed")


class RealtimeTokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: uuid.UUID | None = Field(None, description="Limit the token to this one job")
    batch_id: uuid.UUID | None = Field(
        None, description="Limit the token to this one batch (not with `job_id`)"
    )

    @field_validator("batch_id")
    @classmethod
    def _one_scope(cls, batch_id: uuid.UUID | None, info: ValidationInfo) -> uuid.UUID | None:
        if batch_id is not None and info.data.get("job_id") is not None:
            raise PydanticCustomError("one_scope", "give job_id or batch_id, not both")
        return batch_id


class RealtimeToken(BaseModel):
    token: str = Field(description="Send as `auth: {token}` when connecting to Socket.IO")
    expires_in: int = Field(description="Seconds during which a connection may be opened with it")
    job_id: uuid.UUID | None
    batch_id: uuid.UUID | None = None
