"""SQLAlchemy models. The migration in migrations/versions creates exactly these tables."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from app.jobs.states import JobStatus

STATUS_VALUES = ", ".join(f"'{status.value}'" for status in JobStatus)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSONB, datetime: DateTime(timezone=True)}


# A job that holds a place in its tenant's dispatch window: published and not finished. A
# running job without a lease is owned by a provider batch (app/jobs/provider_batches.py): it
# holds no worker slot, so it holds no place either (migration 0016).
OUTSTANDING = (
    "(status = 'running' AND lease_expires_at IS NOT NULL)"
    " OR (status = 'queued' AND dispatched_at IS NOT NULL)"
)
# A job that asked for the response cache. `input.cache` is a strict boolean (app/kinds/base.py),
# so comparing the JSON value is the same as casting it, and unlike the cast it cannot raise
# (an index predicate that raises would fail the INSERT).
CACHE_REQUESTED = "(input -> 'cache') = 'true'::jsonb"


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(f"status IN ({STATUS_VALUES})", name="jobs_status_valid"),
        CheckConstraint("progress >= 0 AND progress <= 100", name="jobs_progress_range"),
        CheckConstraint("attempt >= 0 AND attempt <= max_attempts", name="jobs_attempt_range"),
        UniqueConstraint("owner", "idempotency_key", name="jobs_owner_idempotency_key"),
        Index("jobs_owner_created", "owner", text("created_at DESC"), text("id DESC")),
        # The listing filtered by status or by kind (migration 0015). The status one also
        # carries what /stats aggregates, so that its scans never read the table.
        Index(
            "jobs_owner_status_created",
            "owner",
            "status",
            text("created_at DESC"),
            text("id DESC"),
            postgresql_include=[
                "kind",
                "tokens_in",
                "tokens_out",
                "cost_usd",
                "cached",
                "started_at",
                "finished_at",
            ],
        ),
        Index("jobs_owner_kind_created", "owner", "kind", text("created_at DESC"), text("id DESC")),
        # The succeeded jobs that asked for the response cache: /stats counts them.
        Index(
            "jobs_owner_cache_requests",
            "owner",
            postgresql_where=text(f"status = 'succeeded' AND {CACHE_REQUESTED}"),
        ),
        # Every owner's jobs, newest first: the admin's listing (GET /admin/jobs).
        Index("jobs_created", text("created_at DESC"), text("id DESC")),
        Index(
            "jobs_queued_dispatch",
            "dispatched_at",
            postgresql_where=text("status = 'queued'"),
        ),
        Index("jobs_retry_of", "retry_of", postgresql_where=text("retry_of IS NOT NULL")),
        Index(
            "jobs_running_lease",
            "lease_expires_at",
            postgresql_where=text("status = 'running'"),
        ),
        Index(
            "jobs_failed_finished",
            "finished_at",
            postgresql_where=text("status = 'failed'"),
        ),
        Index(
            "jobs_batch_item",
            "batch_id",
            "batch_item",
            unique=True,
            postgresql_where=text("batch_id IS NOT NULL"),
        ),
        # Scheduled jobs the sweeper has not published yet, by when they are due.
        Index(
            "jobs_scheduled_due",
            "run_at",
            postgresql_where=text("status = 'queued' AND dispatched_at IS NULL"),
        ),
        Index(
            "jobs_queued_expiry",
            "expires_at",
            postgresql_where=text("status = 'queued' AND expires_at IS NOT NULL"),
        ),
        # Fair dispatch (app/jobs/fairness.py): a tenant's published and unfinished jobs,
        # counted against its window, and its held jobs, in the order they are released.
        Index("jobs_owner_outstanding", "owner", postgresql_where=text(OUTSTANDING)),
        Index(
            "jobs_owner_held",
            "owner",
            text("priority DESC"),
            "created_at",
            postgresql_where=text("status = 'queued' AND dispatched_at IS NULL"),
        ),
        # The retention purge's scan: an owner's finished jobs, oldest first.
        Index(
            "jobs_owner_finished",
            "owner",
            "finished_at",
            postgresql_where=text("status IN ('succeeded', 'failed', 'canceled')"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    progress: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    input: Mapped[dict[str, Any]]
    output: Mapped[dict[str, Any] | None]
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    max_attempts: Mapped[int] = mapped_column(Integer)
    priority: Mapped[int] = mapped_column(SmallInteger, default=0, server_default="0")
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(200))
    # The model of each role the kind's steps name, pinned when the job was created.
    models: Mapped[dict[str, Any] | None]
    worker: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None]
    retry_at: Mapped[datetime | None]
    cancel_requested_at: Mapped[datetime | None]
    # NULL while a scheduled job waits for its run_at: the sweeper publishes it when it is due.
    dispatched_at: Mapped[datetime | None]
    # Not before (a scheduled job); the deadline to start an attempt (the job fails `expired`
    # if it is still queued then); the attempt's own time limit, under the deployment's.
    run_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]
    timeout_seconds: Mapped[int | None] = mapped_column(Integer)
    # The most the job may cost, in USD (docs/api.md#budgets); NULL: no limit of its own.
    max_cost_usd: Mapped[Decimal | None] = mapped_column(Numeric(16, 8))
    # Why a queued job waits for its run_at (a provider's limit, pause or open breaker) and on
    # which model endpoint (app/jobs/waiting.py); cleared by the claim.
    wait_reason: Mapped[str | None] = mapped_column(String(32))
    wait_endpoint: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    retry_of: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="SET NULL")
    )
    # The batch the job was created in, and its position among the batch's items (from 0).
    batch_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("batches.id", ondelete="SET NULL")
    )
    batch_item: Mapped[int | None] = mapped_column(Integer)
    # The job's own webhook, {"url", "events"}: a `webhook_deliveries` row is made for each of
    # its events that `events` names (docs/webhooks.md).
    webhook: Mapped[dict[str, Any] | None]
    last_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    tokens_in: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    tokens_out: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    cost_usd: Mapped[Decimal] = mapped_column(
        Numeric(16, 8), default=Decimal(0), server_default="0"
    )
    # Succeeded with every model call answered from the response cache (input.cache).
    cached: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))


class Batch(Base):
    """Jobs created together by one POST /batches; its counts and cost are its jobs'."""

    __tablename__ = "batches"
    __table_args__ = (
        CheckConstraint("item_count > 0", name="batches_item_count_positive"),
        UniqueConstraint("owner", "idempotency_key", name="batches_owner_idempotency_key"),
        Index("batches_owner_created", "owner", text("created_at DESC"), text("id DESC")),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    item_count: Mapped[int] = mapped_column(Integer)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    canceled_at: Mapped[datetime | None]


class ProviderBatch(Base):
    """One batch of the provider's Batch API. The row, with our `id`, is committed before
    anything is sent; `id` travels in the batch's metadata, so a submission cut short is
    adopted, not repeated (app/execution/provider_batches.py).

    `state`: `creating` (not known to be at the provider), `submitted` (its
    `provider_batch_id` stored; `provider_status` as last polled), `ended` (its jobs' results
    recorded)."""

    __tablename__ = "provider_batches"
    __table_args__ = (
        CheckConstraint(
            "state IN ('creating', 'submitted', 'ended')", name="provider_batches_state_valid"
        ),
        CheckConstraint("request_count > 0", name="provider_batches_request_count_positive"),
        Index("provider_batches_open", "created_at", postgresql_where=text("state <> 'ended'")),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    model: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16))
    provider_batch_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    input_file_id: Mapped[str | None] = mapped_column(String(255))
    provider_status: Mapped[str | None] = mapped_column(String(32))
    request_count: Mapped[int] = mapped_column(Integer)
    completed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    failed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    error: Mapped[str | None] = mapped_column(Text)
    # Every job of the batch was canceled: the provider batch is to be canceled.
    cancel_requested_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    submitted_at: Mapped[datetime | None]
    polled_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]


class ProviderBatchItem(Base):
    """A batch-tier job's request (`body`, a chat completion) from its hand-over by the worker
    until the job ends (`ended_at`); `provider_batch` once it is collected into a batch."""

    __tablename__ = "provider_batch_items"
    __table_args__ = (
        Index(
            "provider_batch_items_pending",
            "model",
            "created_at",
            postgresql_where=text("provider_batch IS NULL AND ended_at IS NULL"),
        ),
        Index("provider_batch_items_open", "job_id", postgresql_where=text("ended_at IS NULL")),
        Index(
            "provider_batch_items_batch",
            "provider_batch",
            postgresql_where=text("provider_batch IS NOT NULL"),
        ),
    )

    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(200))
    body: Mapped[dict[str, Any]]
    provider_batch: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("provider_batches.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    ended_at: Mapped[datetime | None]


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq", name="job_events_job_seq"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE")
    )
    seq: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(server_default=func.now())
    data: Mapped[dict[str, Any]]


class ApiKey(Base):
    """The table also keeps `role`, which no code reads any more: migration 0007 says why."""

    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint(
            "cardinality(scopes) > 0"
            " AND scopes <@ ARRAY['jobs:read', 'jobs:write', 'admin']::text[]",
            name="api_keys_scopes_known",
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    owner: Mapped[str] = mapped_column(String(200), index=True)
    scopes: Mapped[list[str]] = mapped_column(ARRAY(Text))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    expires_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    # The admin key that created it through the API; NULL for `flask keys create`.
    created_by: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("api_keys.id", ondelete="SET NULL")
    )


class ModelCall(Base):
    __tablename__ = "model_calls"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    attempt: Mapped[int] = mapped_column(Integer)
    provider: Mapped[str] = mapped_column(String(200))
    model: Mapped[str] = mapped_column(String(200))
    tokens_in: Mapped[int] = mapped_column(Integer, default=0)
    tokens_out: Mapped[int] = mapped_column(Integer, default=0)
    # From the price table (app/llm/pricing.py); the provider's own figure, when its response
    # reported one (OpenRouter's `usage.cost`), is `reported_cost_usd`, and that is the one
    # the job's total counts.
    cost_usd: Mapped[Decimal] = mapped_column(Numeric(16, 8), default=Decimal(0))
    reported_cost_usd: Mapped[Decimal | None] = mapped_column(Numeric(16, 8))
    step: Mapped[str | None] = mapped_column(String(64))
    role: Mapped[str | None] = mapped_column(String(64))
    latency_ms: Mapped[float] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    outcome: Mapped[str] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime] = mapped_column(server_default=func.now())


class JobStep(Base):
    """A finished step's checkpoint: a later attempt of the job reuses `output` instead of
    running the step (and paying for its model calls) again."""

    __tablename__ = "job_steps"

    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer)  # the attempt that finished it
    output: Mapped[Any] = mapped_column(JSONB)  # any JSON value the step returned
    tokens_in: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    tokens_out: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    cost_usd: Mapped[Decimal] = mapped_column(
        Numeric(16, 8), default=Decimal(0), server_default="0"
    )
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Artifact(Base):
    """A binary output of a job (an image), its bytes in the artifact store under
    `storage_key`. Written by a running attempt before its blob, and visible to users only once
    `published_at` is set, which the attempt's successful finish does in its own statement:
    an artifact of a stale or failed attempt is never published, and the sweeper removes it.
    Deleting the job sets `job_id` NULL: the row and its blob are then swept too."""

    __tablename__ = "artifacts"
    __table_args__ = (
        CheckConstraint("size >= 0", name="artifacts_size_nonnegative"),
        Index("artifacts_job", "job_id", "position"),
        Index(
            "artifacts_unpublished",
            "created_at",
            postgresql_where=text("published_at IS NULL OR job_id IS NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    job_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="SET NULL")
    )
    owner: Mapped[str] = mapped_column(String(200))
    attempt: Mapped[int] = mapped_column(Integer)
    position: Mapped[int] = mapped_column(Integer)  # its order among the job's artifacts
    name: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    storage_key: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    published_at: Mapped[datetime | None]


CANVAS_OBJECT_TYPES = ("rectangle", "ellipse", "line", "arrow", "text", "sticky_note", "image")


class Canvas(Base):
    """A tenant's drawing surface. `object_count` and `top_z` are its objects' number and
    highest z, kept on the row so that a canvas job's save, which locks the row, reads them
    current (a count of the objects would read the statement's older snapshot)."""

    __tablename__ = "canvases"
    __table_args__ = (
        CheckConstraint("object_count >= 0", name="canvases_object_count_nonnegative"),
        Index("canvases_owner_created", "owner", text("created_at DESC"), text("id DESC")),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    name: Mapped[str] = mapped_column(String(200))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    object_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    top_z: Mapped[int] = mapped_column(Integer, default=-1, server_default="-1")
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())


class CanvasObject(Base):
    """One object of a canvas; `job_id` is the canvas job that made it (NULL: the API did, or
    the job was deleted since). An image's `artifact_id` goes NULL if its artifact is deleted."""

    __tablename__ = "canvas_objects"
    __table_args__ = (
        CheckConstraint(
            "type IN (" + ", ".join(f"'{t}'" for t in CANVAS_OBJECT_TYPES) + ")",
            name="canvas_objects_type_valid",
        ),
        Index("canvas_objects_canvas_z", "canvas_id", "z", "id"),
        Index("canvas_objects_job", "job_id", postgresql_where=text("job_id IS NOT NULL")),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    canvas_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("canvases.id", ondelete="CASCADE")
    )
    job_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="SET NULL")
    )
    type: Mapped[str] = mapped_column(String(16))
    x: Mapped[float] = mapped_column(Float)
    y: Mapped[float] = mapped_column(Float)
    width: Mapped[float] = mapped_column(Float)
    height: Mapped[float] = mapped_column(Float)
    rotation: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    z: Mapped[int] = mapped_column(Integer)
    fill: Mapped[str | None] = mapped_column(String(9))
    stroke: Mapped[str | None] = mapped_column(String(9))
    stroke_width: Mapped[float] = mapped_column(Float, default=1.0, server_default="1")
    text: Mapped[str | None] = mapped_column(Text)
    artifact_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("artifacts.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


WEBHOOK_DELIVERY_STATUSES = ("pending", "succeeded", "failed")


class WebhookEndpoint(Base):
    """A tenant's webhook: every event of the tenant's jobs that `events` names is delivered
    to `url`, signed with `secret` (shown once, when the endpoint is created)."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index("webhook_endpoints_owner", "owner", "created_at"),)

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    url: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(String(200))
    events: Mapped[list[str]] = mapped_column(JSONB)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    secret: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())


class WebhookSecret(Base):
    """A tenant's signing secret for the webhooks of single jobs (`webhook` on a job)."""

    __tablename__ = "webhook_secrets"

    owner: Mapped[str] = mapped_column(String(200), primary_key=True)
    secret: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class WebhookDelivery(Base):
    """One event for one destination: the outbox. The row is made by a trigger on `job_events`
    in the transaction that records the event (migrations/versions/0008_webhooks.py), so no
    state change can happen without its deliveries. `payload` is the body, fixed then, and the
    row's id is the message's `webhook-id`; `next_attempt_at` is when it is due (the dispatcher
    also pushes it ahead while an attempt is in flight)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint(
            "status IN (" + ", ".join(f"'{s}'" for s in WEBHOOK_DELIVERY_STATUSES) + ")",
            name="webhook_deliveries_status_valid",
        ),
        Index(
            "webhook_deliveries_due",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
        ),
        Index("webhook_deliveries_job", "job_id", "created_at"),
        Index(
            "webhook_deliveries_endpoint",
            "endpoint_id",
            text("created_at DESC"),
            text("id DESC"),
            postgresql_where=text("endpoint_id IS NOT NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), primary_key=True, server_default=text("gen_random_uuid()")
    )
    owner: Mapped[str] = mapped_column(String(200))
    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE")
    )
    # NULL: the job's own webhook, signed with the tenant's secret.
    endpoint_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("webhook_endpoints.id", ondelete="CASCADE")
    )
    url: Mapped[str] = mapped_column(Text)
    event_type: Mapped[str] = mapped_column(String(64))
    event_seq: Mapped[int] = mapped_column(Integer)
    payload: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    next_attempt_at: Mapped[datetime | None] = mapped_column(server_default=func.now())
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    # Redelivery starts the retry window again from here.
    redelivered_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class WebhookAttempt(Base):
    """The log of one attempt of a delivery."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (Index("webhook_attempts_delivery", "delivery_id", "attempt"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    delivery_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("webhook_deliveries.id", ondelete="CASCADE")
    )
    attempt: Mapped[int] = mapped_column(Integer)
    address: Mapped[str | None] = mapped_column(String(64))
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    response_body: Mapped[str] = mapped_column(Text, server_default="")
    duration_ms: Mapped[float] = mapped_column(Float)
    at: Mapped[datetime] = mapped_column(server_default=func.now())


class Tenant(Base):
    """An owner's settings: spend limits in USD per UTC day and month (NULL: no limit), and
    how many days its finished jobs are kept (NULL: the deployment's CONVEYOR_RETENTION_DAYS;
    0: forever). An owner without a row has no limits and the deployment's retention."""

    __tablename__ = "tenants"
    __table_args__ = (
        CheckConstraint(
            "daily_budget_usd IS NULL OR daily_budget_usd >= 0", name="tenants_daily_budget"
        ),
        CheckConstraint(
            "monthly_budget_usd IS NULL OR monthly_budget_usd >= 0",
            name="tenants_monthly_budget",
        ),
        CheckConstraint("weight IS NULL OR weight > 0", name="tenants_weight"),
        CheckConstraint(
            "max_concurrency IS NULL OR max_concurrency >= 1", name="tenants_max_concurrency"
        ),
        CheckConstraint(
            "retention_days IS NULL OR retention_days BETWEEN 0 AND 36500",
            name="tenants_retention_days",
        ),
    )

    owner: Mapped[str] = mapped_column(String(200), primary_key=True)
    daily_budget_usd: Mapped[Decimal | None] = mapped_column(Numeric(16, 8))
    monthly_budget_usd: Mapped[Decimal | None] = mapped_column(Numeric(16, 8))
    # Fair dispatch: the window is scaled by `weight` (NULL: 1) and never passes
    # `max_concurrency` (NULL: the deployment's default cap, if any).
    weight: Mapped[Decimal | None] = mapped_column(Numeric(6, 2))
    max_concurrency: Mapped[int | None] = mapped_column(Integer)
    # Days its finished jobs are kept (app/jobs/retention.py): NULL the default, 0 forever.
    retention_days: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())


class TenantSpend(Base):
    """What an owner's model calls cost on one UTC day: incremented by the statement that
    records the calls (app/jobs/sql.py), so a budget check reads at most 31 rows."""

    __tablename__ = "tenant_spend"

    owner: Mapped[str] = mapped_column(String(200), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    cost_usd: Mapped[Decimal] = mapped_column(Numeric(16, 8), server_default="0")
