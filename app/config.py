"""Typed settings, read once from the environment (and an optional `.env` file).

Every setting is documented in docs/configuration.md; keep the two in step.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The longest retention a deployment or a tenant may set: 100 years.
MAX_RETENTION_DAYS = 36_500


def _alias(name: str) -> AliasChoices:
    """Accept the conventional unprefixed name as well as the CONVEYOR_ one."""
    return AliasChoices(name, f"CONVEYOR_{name}")


class EndpointLimits(BaseModel):
    """One model endpoint's entry of CONVEYOR_PROVIDER_LIMITS (docs/configuration.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpm: int | None = Field(None, ge=1, description="requests per period, pool-wide")
    tpm: int | None = Field(None, ge=1, description="tokens per period, pool-wide")
    period: float = Field(60.0, gt=0, le=3600, description="the window, seconds (60: a minute)")
    failures: int = Field(5, ge=1, description="consecutive 5xx or timeouts that open the breaker")
    cooldown: float = Field(30.0, gt=0, description="seconds the breaker stays open")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CONVEYOR_",
        env_file=".env",
        extra="ignore",
        frozen=True,
        populate_by_name=True,
    )

    # Services
    database_url: str = Field(
        "postgresql+psycopg://postgres@127.0.0.1:5432/conveyor",
        validation_alias=_alias("DATABASE_URL"),
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", validation_alias=_alias("REDIS_URL"))
    broker_url: str | None = Field(None, validation_alias=_alias("BROKER_URL"))
    db_pool_size: int = Field(10, ge=1)
    db_max_overflow: int = Field(20, ge=0)
    db_statement_timeout_ms: int = Field(15_000, ge=100)

    # Model endpoint
    openai_api_key: str | None = Field(None, validation_alias=_alias("OPENAI_API_KEY"))
    openai_base_url: str | None = Field(None, validation_alias=_alias("OPENAI_BASE_URL"))
    llm_timeout: float = Field(60.0, gt=0, description="read timeout of one model call, seconds")
    llm_connect_timeout: float = Field(5.0, gt=0)
    default_model: str = "gpt-4o-mini"
    models: dict[str, str | dict[str, str]] = Field(
        default_factory=dict,
        description="kind -> model, or kind -> {role -> model} (`default` for any other role)",
    )
    allowed_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="models a request may name (comma-separated), besides the configured ones",
    )
    pricing_file: Path | None = None
    budget_default_output_tokens: int = Field(
        1024,
        ge=1,
        description="output tokens a call is estimated at, at submit, when its input sets no "
        "max_tokens (docs/api.md#budgets)",
    )

    provider_limits: dict[str, EndpointLimits] = Field(
        default_factory=dict,
        description="model -> {rpm, tpm, period, failures, cooldown}, shared by the pool; "
        "`*` for every other model (docs/reliability.md#provider-limits)",
    )
    provider_short_wait: float = Field(
        2.0, ge=0, description="a wait for capacity this short is waited in the slot"
    )
    provider_max_requeues: int = Field(
        10, ge=0, le=100, description="attempts a provider's 429 may give back to one job"
    )

    # Images (the `image` kind; docs/images.md)
    image_provider: Literal["openai", "comfyui"] = Field(
        "openai", description="where an image job goes when its input names no provider"
    )
    image_model: str = Field(
        "gpt-image-1", description="the `image` kind's model (OpenAI provider) unless configured"
    )
    comfyui_url: str | None = Field(None, description="ComfyUI's base URL, e.g. http://gpu:8188")
    comfyui_workflows_dir: Path | None = Field(
        None, description="workflow files, searched before the packaged ones"
    )
    comfyui_default_workflow: str = "txt2img"
    comfyui_usd_per_gpu_second: float = Field(
        0.0004, ge=0, description="what a second of ComfyUI's execution costs (GPU rental)"
    )

    # Job lifecycle
    job_max_attempts: int = Field(3, ge=1, le=20)
    lease_seconds: float = Field(30.0, gt=0)
    heartbeat_seconds: float = Field(10.0, gt=0)
    sweeper_interval: float = Field(15.0, gt=0)
    dispatch_grace_seconds: float = Field(
        30.0, gt=0, description="a queued job unclaimed this long is published again"
    )
    retry_base_delay: float = Field(1.0, ge=0)
    retry_max_delay: float = Field(60.0, ge=0)
    job_soft_time_limit: float = Field(600.0, gt=0)
    job_time_limit: float = Field(660.0, gt=0)
    progress_write_interval: float = Field(
        5.0, ge=0, description="progress also rides on every token delta event"
    )
    delta_flush_interval: float = Field(
        0.05, ge=0, description="token deltas are coalesced for this long (tens of ms)"
    )

    # Events
    event_stream_maxlen: int = Field(10_000, ge=100)
    event_stream_ttl: int = Field(86_400, ge=60)

    # API
    max_request_bytes: int = Field(256 * 1024, ge=1024)
    card_max_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="largest body POST /cards/import accepts (a PNG)"
    )
    max_batch_request_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="the body limit of POST /batches"
    )
    ready_timeout: float = Field(
        1.0, gt=0, description="seconds /ready and /health wait for their checks"
    )
    health_max_age: float = Field(
        1.0, ge=0, description="seconds a process reuses a readiness or health check's result"
    )
    stats_max_age: float = Field(
        2.0, ge=0, description="seconds a web process reuses an owner's /stats figures (0: never)"
    )
    secret_key: str | None = Field(None, validation_alias=_alias("SECRET_KEY"))
    rate_limits_enabled: bool = Field(True, description="per-key request rate limits")
    rate_limit_create: str = Field(
        "300/minute", description="requests that create jobs, per key (`limits` notation)"
    )
    rate_limit_read: str = Field("1200/minute", description="other requests, per key")
    rate_limit_stream: str = Field(
        "3000/minute", description="event feeds (long-polls, SSE) and exports, per key"
    )
    export_max_streams: int = Field(
        4, ge=1, description="job-list exports one web process streams at once"
    )

    # Realtime (Socket.IO and the dashboard)
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="origins allowed to open a Socket.IO connection, comma-separated; "
        "empty: the server's own origin only",
    )
    realtime_token_ttl: int = Field(300, ge=10, le=86_400)

    @field_validator("rate_limit_create", "rate_limit_read", "rate_limit_stream")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        from limits import parse

        try:
            parse(value)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a rate limit like '300/minute': {exc}") from None
        return value

    @field_validator("allowed_origins", "allowed_models", "webhook_allowed_networks", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    # Worker
    worker_concurrency: int = Field(200, ge=1)

    # Metrics (docs/metrics.md)
    metrics_token: str | None = Field(
        None,
        description="the bearer token Prometheus sends to /metrics; unset: the web's /metrics "
        "answers 404 and a worker's serves its loopback address only",
    )
    metrics_tenant_label: bool = Field(
        False, description="label jobs, tokens and cost with the tenant (one series per tenant)"
    )
    metrics_pool_max_age: float = Field(
        5.0, ge=0, description="seconds a web process reuses the pool's gauges (queue depth...)"
    )
    worker_metrics_port: int = Field(
        0, ge=0, le=65_535, description="the port of a worker host's /metrics; 0: not served"
    )
    worker_metrics_host: str = Field(
        "127.0.0.1", description="the address a worker's /metrics binds to"
    )

    # Fair dispatch (docs/architecture.md#fair-dispatch)
    tenant_window: Literal["auto", "off"] | Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        "auto",
        description="jobs a tenant may have published and unfinished at once; `auto`: every "
        "live worker slot plus a quarter, at least tenant_window_min; `off`: no windows or caps",
    )
    tenant_window_min: int = Field(32, ge=1, le=1_000_000)
    tenant_max_concurrency: int | None = Field(
        None, ge=1, le=1_000_000, description="the cap of a tenant that sets none of its own"
    )
    broker_visibility_timeout: int | None = Field(
        None,
        ge=1,
        description="seconds before Redis redelivers an unacknowledged task; "
        "default: twice the hard time limit, at least an hour",
    )

    # Artifacts (binary outputs: images); docs/artifacts.md
    artifact_store: Literal["filesystem", "s3"] = "filesystem"
    artifact_dir: Path = Field(
        Path(".conveyor/artifacts"),
        description="the filesystem store's root; every web and worker process must see it",
    )
    s3_bucket: str | None = Field(None, description="the S3 store's bucket (must exist)")
    s3_prefix: str = Field("", description="a key prefix inside the bucket, e.g. `conveyor/`")
    s3_endpoint_url: str | None = Field(
        None, description="an S3-compatible endpoint (MinIO, R2, moto); AWS when unset"
    )
    s3_region: str | None = None
    s3_access_key_id: str | None = Field(None, validation_alias=_alias("AWS_ACCESS_KEY_ID"))
    s3_secret_access_key: str | None = Field(None, validation_alias=_alias("AWS_SECRET_ACCESS_KEY"))
    artifact_url_ttl: int = Field(
        300, ge=10, le=7 * 86_400, description="seconds a signed artifact URL stays valid"
    )
    artifact_orphan_grace: float = Field(
        60.0, ge=0, description="seconds before an unpublished artifact of a finished job is swept"
    )

    # Webhooks (docs/webhooks.md)
    webhook_allowed_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="networks (CIDR) and host names a webhook may reach although they are "
        "not public, comma-separated; empty: public addresses only",
    )
    webhook_connect_timeout: float = Field(5.0, gt=0, description="seconds to connect")
    webhook_timeout: float = Field(
        15.0, gt=0, description="seconds one delivery attempt may take, response included"
    )
    webhook_response_max_bytes: int = Field(
        4096,
        ge=0,
        description="bytes of a receiver's response read (and logged); the rest is not read",
    )
    webhook_retry_base_delay: float = Field(
        10.0, gt=0, description="seconds before the second attempt; doubles after each"
    )
    webhook_retry_max_delay: float = Field(
        7200.0, gt=0, description="the longest wait between two attempts, seconds"
    )
    webhook_retry_window: float = Field(
        86_400.0, gt=0, description="seconds after which a delivery still failing gives up"
    )
    webhook_dispatch_interval: float = Field(
        1.0, gt=0, description="seconds between two scans for deliveries that are due"
    )
    webhook_max_endpoints: int = Field(
        20, ge=1, description="webhook endpoints one tenant may have"
    )

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _networks_parse(cls, entries: list[str]) -> list[str]:
        # A host name is any entry without "/" or ":"; a network that does not parse is a typo
        # that would otherwise silently allow nothing.
        for entry in entries:
            if "/" in entry or ":" in entry:
                ipaddress.ip_network(entry, strict=False)
        return entries

    # The response cache (docs/api.md#response-cache)
    response_cache_ttl: int = Field(
        86_400,
        ge=0,
        le=30 * 86_400,
        description="seconds a cached answer is kept (input.cache); 0 turns the cache off",
    )
    response_cache_max_bytes: int = Field(
        1_048_576, ge=1, description="the largest answer the response cache stores, bytes"
    )

    # The provider's Batch API, for jobs of `service_tier: "batch"` (docs/reliability.md)
    provider_batch_window: float = Field(
        60.0,
        ge=0,
        description="seconds a batch-tier job waits for others of its model before a batch "
        "is sent without them",
    )
    provider_batch_max_size: int = Field(
        10_000, ge=1, le=50_000, description="requests in one provider batch at most"
    )
    provider_batch_interval: float = Field(
        15.0,
        gt=0,
        description="seconds between two runs of the beat task that collects, submits and "
        "polls provider batches",
    )
    provider_batch_price_factor: float = Field(
        0.5,
        gt=0,
        le=1,
        description="a batch-tier call's price as a share of the price table's (OpenAI: half)",
    )

    # Retention (docs/reliability.md#retention)
    retention_days: int | None = Field(
        None,
        ge=0,
        le=MAX_RETENTION_DAYS,
        description="days a finished job is kept, unless its tenant sets its own; "
        "unset or 0: forever",
    )
    retention_interval: float = Field(
        3600.0, gt=0, description="seconds between two retention runs (a beat task)"
    )
    retention_batch_size: int = Field(
        500, ge=1, le=10_000, description="jobs deleted per transaction"
    )
    retention_pause: float = Field(
        0.05, ge=0, le=60, description="the least a retention run waits between two batches, s"
    )
    retention_max_busy: float = Field(
        0.25,
        gt=0,
        le=1,
        description="the share of the time a retention run may keep the database busy: after "
        "a batch that took t seconds it waits t * (1 - share) / share",
    )
    retention_max_jobs: int = Field(
        200_000, ge=1, description="jobs one retention run deletes at most; the next goes on"
    )

    # Testing switches a test config may set; never set in production.
    testing: bool = False

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    def model_for(self, kind: str, role: str | None = None) -> str:
        """The configured model of a kind's role: `CONVEYOR_MODELS` maps a kind to one model
        for all its calls, or to a model per role with `default` for the roles it leaves out;
        what it does not name gets `CONVEYOR_DEFAULT_MODEL`."""
        entry = self.models.get(kind)
        if isinstance(entry, str):
            return entry
        if entry is None:
            # Image jobs need an image model, not the chat default.
            return self.image_model if kind == "image" else self.default_model
        return entry.get(role or "default") or entry.get("default") or self.default_model

    def requestable_models(self) -> frozenset[str]:
        """What a request may name: `CONVEYOR_ALLOWED_MODELS`, and every model the
        configuration already uses (naming the model a job would get anyway is no choice)."""
        configured = {self.default_model, self.image_model}
        for entry in self.models.values():
            configured.update([entry] if isinstance(entry, str) else entry.values())
        return frozenset(self.allowed_models) | configured


def testing_settings(**overrides: object) -> Settings:
    """Settings for the test suite: short leases and intervals so recovery is observable."""
    base: dict[str, object] = {
        "testing": True,
        "lease_seconds": 3.0,
        "heartbeat_seconds": 1.0,
        "sweeper_interval": 1.0,
        "dispatch_grace_seconds": 2.0,
        "retry_base_delay": 0.2,
        "retry_max_delay": 2.0,
        "progress_write_interval": 0.2,
        # Every token its own delta event, so a test can stream thousands of them quickly.
        "delta_flush_interval": 0.0,
        "llm_timeout": 10.0,
        "openai_api_key": "sim",
        "secret_key": "test-secret",
        "worker_concurrency": 8,
        "job_soft_time_limit": 10.0,
        "job_time_limit": 20.0,
        "artifact_orphan_grace": 0.5,
        # Each test's tenant has its own key; the limits' own tests lower them.
        "rate_limit_create": "100000/minute",
        "rate_limit_read": "100000/minute",
        "rate_limit_stream": "100000/minute",
        "webhook_timeout": 2.0,
        "webhook_connect_timeout": 1.0,
        "webhook_retry_base_delay": 0.2,
        "webhook_retry_max_delay": 0.5,
        "webhook_dispatch_interval": 0.1,
        "provider_batch_window": 0.3,
        "provider_batch_interval": 0.2,
        # Tests read /stats right after their jobs end.
        "stats_max_age": 0.0,
    }
    base.update(overrides)
    return Settings(**base)  # type: ignore[arg-type]
