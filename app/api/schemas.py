"""The job's public shapes: what the API accepts and returns, and the event envelope."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
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
from sqlalchemy import Row

from app.config import MAX_RETENTION_DAYS
from app.jobs.batches import BatchSummary
from app.jobs.canvas_shapes import (
    MAX_CANVAS_SIDE,
    MAX_OBJECTS,
    CanvasObjectIn,
    CanvasObjectOut,
)
from app.jobs.events import MAX_SEQ
from app.jobs.listing import JobFilter
from app.jobs.payloads import EventEnvelope
from app.jobs.retention import retention_days
from app.jobs.states import DEFAULT_WEBHOOK_EVENTS, WEBHOOK_EVENTS, JobStatus
from app.models import Batch, Canvas, Job, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from app.webhooks.guard import MAX_URL_LENGTH

# Kind names as the registry spells them; anything else (a NUL byte, say) is refused here.
KIND_PATTERN = r"^[a-z][a-z0-9_-]{0,63}$"

# The bounds of a job's timing (docs/api.md, "Scheduling, expiry and timeouts"). A run_at a
# little in the past is due at once: the client's clock may be behind ours, and a request
# retried with its Idempotency-Key must still be accepted a little later. Further back it is
# more likely a mistake (a local time sent as UTC) than a wish to run now.
RUN_AT_PAST_TOLERANCE = timedelta(minutes=5)
RUN_AT_MAX_AHEAD = timedelta(days=365)
MAX_EXPIRES_AFTER = 30 * 86_400  # seconds: 30 days


def _rfc3339_text(value: object) -> object:
    # pydantic would also take a number (Unix time) for a datetime: the API takes text only.
    if not isinstance(value, str):
        raise PydanticCustomError(
            "run_at_type", "must be an RFC 3339 date-time with an offset, as a string"
        )
    return value


def _within_bounds(value: datetime) -> datetime:
    now = datetime.now(UTC)
    if value < now - RUN_AT_PAST_TOLERANCE:
        raise PydanticCustomError(
            "run_at_past",
            "must not be more than 5 minutes in the past (got {value})",
            {"value": value.isoformat()},
        )
    if value > now + RUN_AT_MAX_AHEAD:
        raise PydanticCustomError(
            "run_at_too_far",
            "must be at most 365 days ahead (got {value})",
            {"value": value.isoformat()},
        )
    return value.astimezone(UTC)


# When a job may start: RFC 3339 with an offset ("2030-01-01T09:00:00+02:00", "…Z").
RunAt = Annotated[AwareDatetime, BeforeValidator(_rfc3339_text), AfterValidator(_within_bounds)]


# The events a webhook may ask for: EventType values (app/jobs/states.py).
WebhookEvent = Literal[tuple(event.value for event in WEBHOOK_EVENTS)]  # type: ignore[valid-type]


def _distinct(events: list[str]) -> list[str]:
    return list(dict.fromkeys(events))


WebhookEvents = Annotated[
    list[WebhookEvent],
    AfterValidator(_distinct),
    Field(
        min_length=1,
        max_length=20,
        description="The event types to deliver; default: the terminal ones",
        examples=[["job.succeeded", "job.failed"]],
    ),
]
WebhookUrl = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_URL_LENGTH,
        description="http(s) URL of a public address (docs/webhooks.md: the SSRF rules)",
        examples=["https://example.com/hooks/conveyor"],
    ),
]


class JobWebhook(BaseModel):
    """The job's own webhook: each event named in `events` is POSTed to `url`, signed with
    the tenant's webhook secret (GET /webhook-secret)."""

    model_config = ConfigDict(extra="forbid")

    url: WebhookUrl
    events: WebhookEvents = Field(default_factory=lambda: [e.value for e in DEFAULT_WEBHOOK_EVENTS])


# Money in a request: a decimal string (or a JSON number) with at most 8 places, as stored.
UsdAmount = Annotated[Decimal, Field(ge=0, le=100_000, max_digits=14, decimal_places=8)]


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(pattern=KIND_PATTERN, examples=["chat"])
    input: dict[str, Any] = Field(description="The kind's input; see GET /kinds for its schema.")
    priority: int = Field(0, ge=0, le=9, description="0 (default) to 9 (most urgent)")
    max_attempts: int | None = Field(None, ge=1, le=10)
    model: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="The model of every call the job makes, instead of the configured one. "
        "Only a model the operator allows (CONVEYOR_ALLOWED_MODELS, or one the configuration "
        "already uses).",
        examples=["google/gemini-2.5-flash"],
    )
    models: dict[str, Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        None,
        max_length=20,
        description="Role -> model, for a kind whose steps name roles (GET /kinds): the model "
        "of each role named here, over `model`. The same models are allowed as for `model`.",
        examples=[{"creative": "anthropic/claude-sonnet-4"}],
    )
    run_at: RunAt | None = Field(
        None,
        description="Not before this instant (RFC 3339 with an offset; at most 365 days ahead, "
        "at most 5 minutes past): the job is stored now and published once due, within one "
        "sweeper interval (CONVEYOR_SWEEPER_INTERVAL).",
        examples=["2030-01-01T09:00:00Z"],
    )
    expires_after: int | None = Field(
        None,
        ge=1,
        le=MAX_EXPIRES_AFTER,
        description="Seconds (1 to 2,592,000: 30 days) after the job is due (its run_at, else "
        "its creation): a job still queued then fails with the error code `expired`.",
        examples=[600],
    )
    timeout_seconds: int | None = Field(
        None,
        ge=1,
        description="The time limit of each attempt, in seconds, from 1 to the deployment's "
        "CONVEYOR_JOB_SOFT_TIME_LIMIT (the default); past it the job fails with "
        "`time_limit_exceeded`.",
        examples=[120],
    )
    webhook: JobWebhook | None = Field(
        None, description="Deliver the job's events to this URL (docs/webhooks.md)"
    )
    max_cost_usd: UsdAmount | None = Field(
        None,
        gt=0,
        description="The most the job may cost, in US dollars (a decimal string, up to 8 "
        "places, at most 100000): refused at submit (402 `budget-exceeded`) when its estimate "
        "is more; past it while it runs, the job fails `budget_exceeded` with its partial "
        "output.",
        examples=["0.05"],
    )


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


class JobWaiting(BaseModel):
    reason: Literal[
        "provider_rate_limit", "provider_paused", "circuit_open", "tenant_concurrency", "scheduled"
    ] = Field(
        description="`provider_rate_limit`: the model endpoint's request or token limit is used "
        "up; `provider_paused`: the provider answered 429 and the endpoint is paused; "
        "`circuit_open`: its circuit breaker is open (docs/reliability.md#provider-limits); "
        "`tenant_concurrency`: held until its owner's dispatch window (concurrency cap, weight) "
        "has room; `scheduled`: its run_at has not come"
    )
    endpoint: str | None = Field(None, description="The model endpoint waited for, if any")
    until: datetime | None = Field(
        None, description="When it is expected to start (its turn, or its run_at), if known"
    )

    @classmethod
    def of(cls, job: Any) -> JobWaiting | None:
        """For a queued job, from its row alone: a provider's wait (wait_reason), else a job
        not yet published (dispatched_at NULL), scheduled or held by its owner's window."""
        if job.status != JobStatus.QUEUED:
            return None
        reason = getattr(job, "wait_reason", None)
        if reason is not None:
            endpoint = getattr(job, "wait_endpoint", None)
            return cls(reason=reason, endpoint=endpoint, until=job.run_at)
        if getattr(job, "dispatched_at", True) is not None:
            return None
        if job.run_at is not None and job.run_at > datetime.now(UTC):
            return cls(reason="scheduled", until=job.run_at)
        return cls(reason="tenant_concurrency")


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
    models: dict[str, str] | None = Field(
        description="Role -> model, pinned when the job was created, for a kind with roles"
    )
    error: JobError | None
    usage: Usage
    cached: bool = Field(
        description="Succeeded with its answer from the response cache (input.cache): it cost "
        "nothing"
    )
    cancel_requested: bool
    retry_of: uuid.UUID | None
    batch_id: uuid.UUID | None = Field(description="The batch the job was created in, if any")
    retry_at: datetime | None
    run_at: datetime | None = Field(description="A scheduled job's: not before this instant")
    expires_at: datetime | None = Field(
        description="Still queued at this instant, the job fails `expired` (from expires_after)"
    )
    timeout_seconds: int | None = Field(
        description="The job's own time limit per attempt; null: the deployment's"
    )
    max_cost_usd: Usd | None = Field(
        None, description="The job's own spend limit in US dollars; null: none"
    )
    waiting: JobWaiting | None = Field(
        None,
        description="Why a queued job is not published to the workers yet; null: it is (or "
        "it is not queued)",
    )
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    links: JobLinks

    @classmethod
    def of(cls, job: Job | Row[Any], prefix: str) -> JobOut:
        """From the job's row: an ORM `Job`, or a result row with the same column names (the
        export reads jobs as plain rows, without their large input and output)."""
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
            models=job.models,
            error=JobError(code=job.error_code, message=job.error_message)
            if job.error_code and job.status == JobStatus.FAILED
            else None,
            usage=Usage(tokens_in=job.tokens_in, tokens_out=job.tokens_out, cost_usd=job.cost_usd),
            cached=job.cached,
            cancel_requested=job.cancel_requested_at is not None,
            retry_of=job.retry_of,
            batch_id=job.batch_id,
            retry_at=job.retry_at,
            run_at=job.run_at,
            expires_at=job.expires_at,
            timeout_seconds=job.timeout_seconds,
            max_cost_usd=getattr(job, "max_cost_usd", None),
            waiting=JobWaiting.of(job),
            created_at=job.created_at,
            updated_at=job.updated_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            links=JobLinks(self=base, result=f"{base}/result", events=f"{base}/events"),
        )


class JobDetail(JobOut):
    input: dict[str, Any]
    webhook: JobWebhook | None = Field(None, description="The job's own webhook, if any")


class JobResult(BaseModel):
    id: uuid.UUID
    status: JobStatus
    output: dict[str, Any] | None
    error: JobError | None
    usage: Usage


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(description="Pass as `cursor` to get the next page")


def _utc_if_naive(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


# An instant in a query string: ISO 8601; one without an offset is taken as UTC.
Instant = Annotated[datetime, AfterValidator(_utc_if_naive)]


class JobFilters(BaseModel):
    """The filters of a job listing, paged or exported."""

    model_config = ConfigDict(extra="forbid")

    status: JobStatus | None = None
    kind: str | None = Field(None, pattern=KIND_PATTERN)
    created_after: Instant | None = Field(
        None, description="Jobs created after this instant (ISO 8601; no offset means UTC)"
    )
    created_before: Instant | None = Field(
        None, description="Jobs created before this instant; later than created_after"
    )

    def of_owner(self, owner: str) -> JobFilter:
        """The domain's filter: these, over `owner`'s jobs."""
        return JobFilter(
            owner=owner,
            status=self.status,
            kind=self.kind,
            created_after=self.created_after,
            created_before=self.created_before,
        )

    @field_validator("created_before")
    @classmethod
    def _a_range_that_is_not_empty(
        cls, value: datetime | None, info: ValidationInfo
    ) -> datetime | None:
        after = info.data.get("created_after")
        if value is not None and after is not None and value <= after:
            raise ValueError("must be later than created_after")
        return value


class JobListQuery(JobFilters):
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


# Exports ---------------------------------------------------------------------------------------


class JobExportQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["json", "yaml", "csv"] = Field(
        "json", description="json (the default), yaml, or csv (one row per record)"
    )


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class JobListExportQuery(JobFilters):
    format: Literal["csv", "jsonl"] = Field(
        "jsonl", description="jsonl (the default: one JSON object per line) or csv"
    )
    include: Annotated[list[Literal["input", "output"]], BeforeValidator(_split_commas)] = Field(
        default_factory=list,
        description="Large fields to add to every job, left out unless named: input, output "
        "(comma-separated, or the parameter repeated)",
    )


class TimelineEvent(BaseModel):
    seq: int
    type: str
    at: datetime
    data: dict[str, Any]


class JobExport(BaseModel):
    """A job's whole record. The YAML export is this document; the CSV export flattens it."""

    job: JobOut = Field(
        description="The job as `GET /jobs/{id}` shows it, without its input and webhook"
    )
    input: dict[str, Any]
    output: dict[str, Any] | None = Field(
        description="The result; null until the job has finished, and for a failed job"
    )
    events: list[TimelineEvent] = Field(
        description="The durable timeline (PostgreSQL), oldest first: every event but the "
        "token deltas, whose text is in the output"
    )
    model_calls: list[dict[str, Any]] = Field(
        description="One object per model call attempt with every column of the model_calls "
        "table; money as a plain decimal string"
    )


class KindStep(BaseModel):
    name: str
    role: str = Field(description="whose model the step calls: `CONVEYOR_MODELS`, or `models`")
    weight: float = Field(description="its share of the job's progress, out of the steps' sum")


class KindOut(BaseModel):
    name: str
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    steps: list[KindStep] = Field(
        description="Checkpointed steps, in order; a retry resumes at the first unfinished one. "
        "Empty for a kind that runs in one go."
    )
    roles: list[str] = Field(description="The roles its steps name: the keys `models` accepts")


class KindList(BaseModel):
    items: list[KindOut]


class ModelCallOut(BaseModel):
    id: int
    attempt: int
    step: str | None = Field(description="the kind's step that made the call; null outside steps")
    role: str | None = Field(description="the role its model was chosen for")
    provider: str
    model: str
    tokens_in: int
    tokens_out: int
    cost_usd: Usd = Field(
        description="what the call counts for in the job's total: `reported_cost_usd` when "
        "the provider reported one, else `table_cost_usd`"
    )
    table_cost_usd: Usd = Field(description="from Conveyor's price table")
    reported_cost_usd: str | None = Field(
        description="the cost the provider's response reported (OpenRouter's `usage.cost`), "
        "in US dollars with 8 places, or null",
        examples=["0.00002400"],
    )
    latency_ms: float
    ttft_ms: float | None = Field(description="time to the first token, or null if none came")
    outcome: str = Field(description="`ok`, `interrupted`, or the error code of the call")
    error_message: str | None
    started_at: datetime
    finished_at: datetime


class ModelCallPage(BaseModel):
    items: list[ModelCallOut] = Field(description="oldest first")


class BudgetOut(BaseModel):
    """An owner's spend limits (null: none), and its spend of the current UTC day and month."""

    daily_budget_usd: Usd | None = Field(description="Limit per UTC day; null: none")
    monthly_budget_usd: Usd | None = Field(description="Limit per UTC month; null: none")
    spent_today_usd: Usd = Field(description="Model calls recorded today (UTC)")
    spent_month_usd: Usd = Field(description="Model calls recorded this month (UTC)")
    remaining_today_usd: Usd | None = Field(description="Left of the daily limit; null: none")
    remaining_month_usd: Usd | None = Field(description="Left of the monthly limit; null: none")

    @classmethod
    def fields_of(cls, budget: Any) -> dict[str, Any]:
        """From the domain's `budgets.Budget`."""
        return {
            "daily_budget_usd": budget.daily_limit,
            "monthly_budget_usd": budget.monthly_limit,
            "spent_today_usd": budget.spent_today,
            "spent_month_usd": budget.spent_month,
            "remaining_today_usd": budget.remaining_today,
            "remaining_month_usd": budget.remaining_month,
        }


class TenantPut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    daily_budget_usd: UsdAmount | None = Field(
        None,
        description="The most the tenant's model calls may cost per UTC day, in US dollars (a "
        "decimal string, 0 to 100000, up to 8 places); null or left out: no limit",
        examples=["5.00"],
    )
    monthly_budget_usd: UsdAmount | None = Field(
        None,
        description="The same per UTC month; null or left out: no limit",
        examples=["100.00"],
    )
    weight: Decimal | None = Field(
        None,
        gt=0,
        le=100,
        max_digits=5,
        decimal_places=2,
        description="Scales the tenant's dispatch window: under contention, tenants share the "
        "worker slots in proportion to their weights (0.01 to 100); null or left out: 1",
        examples=[2],
    )
    max_concurrency: int | None = Field(
        None,
        ge=1,
        le=100_000,
        strict=True,
        description="The most jobs of the tenant running (or published to the workers) at once "
        "(1 to 100000); null or left out: the deployment's default cap, if any",
        examples=[10],
    )
    retention_days: int | None = Field(
        None,
        ge=0,
        le=MAX_RETENTION_DAYS,
        description="Days the tenant's finished jobs are kept (their events, model calls, "
        f"artifacts and webhook deliveries with them), 1 to {MAX_RETENTION_DAYS}; 0: forever; "
        "null or left out: the deployment's default (CONVEYOR_RETENTION_DAYS)",
        examples=[30],
    )


class TenantOut(BudgetOut):
    owner: str
    weight: float = Field(description="Its dispatch window's weight (1: the default)")
    max_concurrency: int | None = Field(
        description="Its own cap on jobs running at once; null: the deployment's default"
    )
    window: int | None = Field(
        description="Jobs it may have published and unfinished now: the deployment's window "
        "times its weight, under its cap; null: fair dispatch is off"
    )
    outstanding: int = Field(description="Its jobs published and not finished (running too)")
    held: int = Field(description="Its queued jobs held until its window has room")
    retention_days: int | None = Field(
        description="As set: days its finished jobs are kept, 0 forever, null the "
        "deployment's default"
    )
    effective_retention_days: int | None = Field(
        description="The retention that applies: `retention_days`, else the deployment's "
        "default; null: its jobs are kept forever"
    )
    created_at: datetime | None = Field(description="When its settings were first set")
    updated_at: datetime | None

    @classmethod
    def of(
        cls,
        owner: str,
        tenant: Any,
        budget: Any,
        dispatch: Any,
        default_retention: int | None,
    ) -> TenantOut:
        """`dispatch`: the domain's `fairness.TenantDispatch`."""
        days = tenant.retention_days if tenant is not None else None
        return cls(
            owner=owner,
            weight=float(dispatch.weight),
            max_concurrency=tenant.max_concurrency if tenant is not None else None,
            window=dispatch.window,
            outstanding=dispatch.outstanding,
            held=dispatch.held,
            retention_days=days,
            effective_retention_days=retention_days(days, default_retention),
            created_at=tenant.created_at if tenant is not None else None,
            updated_at=tenant.updated_at if tenant is not None else None,
            **BudgetOut.fields_of(budget),
        )


class CacheStats(BaseModel):
    requests: int = Field(description="Succeeded jobs that asked for the response cache")
    hits: int = Field(description="Of those, the ones answered from it (`cached: true`)")


class Stats(BaseModel):
    by_status: dict[str, int]
    by_kind: dict[str, dict[str, int]]
    tokens_in: int
    tokens_out: int
    cost_usd: Usd
    duration_seconds: dict[str, float | int | None]
    cache: CacheStats = Field(description="The response cache (input.cache)")
    as_of: datetime = Field(
        description="When the counts, totals and durations were read: at most "
        "CONVEYOR_STATS_MAX_AGE seconds ago"
    )
    budget: BudgetOut = Field(
        description="Your limits and spend today and this month (UTC), from every model call"
    )


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


class ArtifactStoreHealth(StoreHealth):
    store: str = Field(description="which store: `filesystem` or `s3` (CONVEYOR_ARTIFACT_STORE)")


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
        description="what the last sweep did: republished, recovered, failed, canceled, "
        "artifacts_swept, scheduled (due scheduled jobs published), expired, released (held jobs "
        "published: their owner's window had room)"
    )


class Components(BaseModel):
    database: StoreHealth
    redis: StoreHealth
    artifacts: ArtifactStoreHealth = Field(
        description="the artifact store answers (the directory is writable, the bucket exists)"
    )
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
        description="down: PostgreSQL or Redis unreachable; degraded: the artifact store "
        "unreachable, no live worker, or sweeps overdue; ok otherwise"
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


class BatchItem(JobCreate):
    """One job of a batch: exactly what POST /jobs takes."""


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


# Artifacts --------------------------------------------------------------------------------------


class ArtifactLinks(BaseModel):
    self: str = Field(description="the bytes, with the API key")
    job: str


class ArtifactOut(BaseModel):
    id: uuid.UUID
    job_id: uuid.UUID
    name: str
    content_type: str
    size: int = Field(description="bytes")
    sha256: str = Field(description="hex digest of the bytes; also the ETag")
    width: int | None = Field(description="pixels, for an image")
    height: int | None
    created_at: datetime
    url: str = Field(
        description="the bytes without an API key (for an <img>), until `url_expires_at`"
    )
    url_expires_at: datetime
    links: ArtifactLinks


class ArtifactList(BaseModel):
    items: list[ArtifactOut]


class SignedUrlQuery(BaseModel):
    """A signed URL's parameters; without them the request needs an API key."""

    model_config = ConfigDict(extra="forbid")

    expires: int | None = Field(None, ge=0, le=2**40, description="unix time the URL expires")
    signature: str | None = Field(None, max_length=200)


# Canvases ----------------------------------------------------------------------------------------


class CanvasCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("Untitled", min_length=1, max_length=200)
    width: int = Field(1920, ge=1, le=MAX_CANVAS_SIDE, description="pixels")
    height: int = Field(1080, ge=1, le=MAX_CANVAS_SIDE, description="pixels")
    objects: list[CanvasObjectIn] = Field(
        default_factory=list,
        max_length=MAX_OBJECTS,
        description=f"Its first objects, bottom to top (a canvas holds {MAX_OBJECTS} at most)",
    )


class CanvasLinks(BaseModel):
    self: str


class CanvasOut(BaseModel):
    id: uuid.UUID
    name: str
    width: int
    height: int
    object_count: int = Field(description=f"objects it holds, {MAX_OBJECTS} at most")
    created_at: datetime
    updated_at: datetime
    links: CanvasLinks

    @classmethod
    def of(cls, canvas: Canvas, prefix: str) -> CanvasOut:
        return cls(
            id=canvas.id,
            name=canvas.name,
            width=canvas.width,
            height=canvas.height,
            object_count=canvas.object_count,
            created_at=canvas.created_at,
            updated_at=canvas.updated_at,
            links=CanvasLinks(self=f"{prefix}/canvases/{canvas.id}"),
        )


class CanvasDetail(CanvasOut):
    objects: list[CanvasObjectOut] = Field(description="bottom to top (by z, then id)")


class CanvasPage(BaseModel):
    items: list[CanvasOut]
    next_cursor: str | None = Field(description="Pass as `cursor` to get the next page")


class CanvasListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(20, ge=1, le=100)
    cursor: str | None = Field(None, max_length=200)


class WebhookEndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: WebhookUrl
    events: WebhookEvents = Field(default_factory=lambda: [e.value for e in DEFAULT_WEBHOOK_EVENTS])
    description: str | None = Field(None, max_length=200)


class WebhookEndpointUpdate(BaseModel):
    """The fields to change; the others stay."""

    model_config = ConfigDict(extra="forbid")

    url: WebhookUrl | None = None
    events: WebhookEvents | None = None
    description: str | None = Field(None, max_length=200)
    enabled: bool | None = None


class WebhookEndpointLinks(BaseModel):
    self: str
    deliveries: str


class WebhookEndpointOut(BaseModel):
    id: uuid.UUID
    url: str
    events: list[str]
    description: str | None
    enabled: bool
    created_at: datetime
    updated_at: datetime
    links: WebhookEndpointLinks

    @classmethod
    def of(cls, endpoint: WebhookEndpoint, prefix: str) -> WebhookEndpointOut:
        base = f"{prefix}/webhooks/{endpoint.id}"
        return cls(
            id=endpoint.id,
            url=endpoint.url,
            events=endpoint.events,
            description=endpoint.description,
            enabled=endpoint.enabled,
            created_at=endpoint.created_at,
            updated_at=endpoint.updated_at,
            links=WebhookEndpointLinks(self=base, deliveries=f"{base}/deliveries"),
        )


class WebhookEndpointCreated(WebhookEndpointOut):
    secret: str = Field(
        description="The endpoint's signing secret (`whsec_…`), shown this once",
        examples=["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
    )


class WebhookEndpointList(BaseModel):
    items: list[WebhookEndpointOut]


class WebhookSecretOut(BaseModel):
    secret: str = Field(
        description="The signing secret of your jobs' own webhooks (`whsec_…`)",
        examples=["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
    )


class WebhookAttemptOut(BaseModel):
    attempt: int
    at: datetime
    address: str | None = Field(description="The address connected to (null: refused before)")
    status_code: int | None = Field(description="The receiver's status; null: no response")
    error: str | None
    response_body: str = Field(description="The start of the receiver's response")
    duration_ms: float

    @classmethod
    def of(cls, attempt: WebhookAttempt) -> WebhookAttemptOut:
        return cls(
            attempt=attempt.attempt,
            at=attempt.at,
            address=attempt.address,
            status_code=attempt.status_code,
            error=attempt.error,
            response_body=attempt.response_body,
            duration_ms=attempt.duration_ms,
        )


class WebhookDeliveryLinks(BaseModel):
    self: str
    redeliver: str
    job: str


class WebhookDeliveryOut(BaseModel):
    id: uuid.UUID
    message_id: str = Field(description="The `webhook-id` header of every attempt")
    job_id: uuid.UUID
    endpoint_id: uuid.UUID | None = Field(description="null: the job's own webhook")
    url: str
    event_type: str
    event_seq: int
    status: Literal["pending", "succeeded", "failed"]
    attempts: int
    next_attempt_at: datetime | None = Field(description="When the next attempt is due")
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    redelivered_at: datetime | None
    finished_at: datetime | None
    payload: dict[str, Any] = Field(description="The body every attempt sends")
    attempt_log: list[WebhookAttemptOut]
    links: WebhookDeliveryLinks

    @classmethod
    def of(
        cls, delivery: WebhookDelivery, attempts: list[WebhookAttempt], prefix: str, message: str
    ) -> WebhookDeliveryOut:
        base = f"{prefix}/webhook-deliveries/{delivery.id}"
        return cls(
            id=delivery.id,
            message_id=message,
            job_id=delivery.job_id,
            endpoint_id=delivery.endpoint_id,
            url=delivery.url,
            event_type=delivery.event_type,
            event_seq=delivery.event_seq,
            status=delivery.status,  # type: ignore[arg-type]
            attempts=delivery.attempts,
            next_attempt_at=delivery.next_attempt_at if delivery.status == "pending" else None,
            last_status_code=delivery.last_status_code,
            last_error=delivery.last_error,
            created_at=delivery.created_at,
            redelivered_at=delivery.redelivered_at,
            finished_at=delivery.finished_at,
            payload=delivery.payload,
            attempt_log=[WebhookAttemptOut.of(attempt) for attempt in attempts],
            links=WebhookDeliveryLinks(
                self=base, redeliver=f"{base}/redeliver", job=f"{prefix}/jobs/{delivery.job_id}"
            ),
        )


class WebhookDeliveryPage(BaseModel):
    items: list[WebhookDeliveryOut]
    next_cursor: str | None = Field(None, description="Pass as `cursor` to get the next page")


class WebhookDeliveriesQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(20, ge=1, le=100)
    cursor: str | None = Field(None, max_length=200)
