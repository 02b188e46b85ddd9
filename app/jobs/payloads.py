"""The payload of every event type, one pydantic model each, and the envelope they travel in.

This module is the event schema: every publisher builds its event's `data` from one of these
models (see `Event` in events.py), the OpenAPI document publishes `EventEnvelope`, and
docs/events.md and the dashboard's app/web/static/events.js are generated from it
(devtools/event_docs.py). A payload's fields are its wire format, in their wire order:

- a required field is always sent, `null` included (`retry_of` of a first attempt);
- a field declared with `absent_unless_given` is sent only when it has a value: the sweeper's
  `reason` and `worker` on `job.retrying`, say, which a worker's own retry has not. Such a
  field is never `null` on the wire.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    PlainSerializer,
    RootModel,
    create_model,
)

from app.jobs.states import EventType

# Timestamps inside a payload are written by `datetime.isoformat()` ("…+00:00"), as they always
# were, not in pydantic's own format ("…Z").
IsoDatetime = Annotated[AwareDatetime, PlainSerializer(datetime.isoformat, return_type=str)]
Progress = Annotated[float, Field(ge=0, le=100)]


def _is_absent(value: object) -> bool:
    return value is None


def _drop_null(schema: dict[str, Any]) -> None:
    # The field is left out rather than sent as null: its schema does not allow null.
    options = [option for option in schema.pop("anyOf", []) if option != {"type": "null"}]
    if len(options) == 1:
        schema.update(options[0])
    elif options:
        schema["anyOf"] = options
    schema.pop("default", None)


def absent_unless_given(description: str) -> Any:
    """A field left out of the payload, not sent as null, when it has no value."""
    return Field(None, exclude_if=_is_absent, json_schema_extra=_drop_null, description=description)


class EventPayload(BaseModel):
    """The `data` of one event type. Unknown fields are refused, so a publisher cannot send
    what the schema does not say."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        # One schema in the OpenAPI document for reading and writing alike.
        json_schema_mode_override="validation",
    )

    event_type: ClassVar[EventType]

    def as_data(self) -> dict[str, Any]:
        """The payload as the envelope's `data`: JSON values in the wire's key order."""
        return self.model_dump(mode="json")


class EventError(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    code: str = Field(description="a stable error code, e.g. `model_rate_limited`")
    message: str = Field(description="what happened, for people")


class QueuedPayload(EventPayload):
    """The job was stored (POST /jobs, or a retry of a finished job)."""

    event_type = EventType.QUEUED

    kind: str = Field(description="the job's kind")
    retry_of: uuid.UUID | None = Field(description="the job this one retries, or null")
    run_at: IsoDatetime | None = absent_unless_given(
        "only for a scheduled job: no attempt starts before this instant"
    )
    expires_at: IsoDatetime | None = absent_unless_given(
        "only for a job with `expires_after`: still queued then, it fails `expired`"
    )


class StartedPayload(EventPayload):
    """A worker claimed the job: an attempt begins. Text shown so far belongs to an earlier
    attempt and is never the result."""

    event_type = EventType.STARTED

    attempt: int = Field(ge=1, description="this attempt's number, from 1")
    worker: str = Field(description="the worker process (host:pid)")


class ProgressPayload(EventPayload):
    """Progress, sent at most every `CONVEYOR_PROGRESS_WRITE_INTERVAL` seconds. Live at once;
    stored with the worker's next heartbeat (within `CONVEYOR_HEARTBEAT_SECONDS`) or the job's
    next stored event, whichever comes first."""

    event_type = EventType.PROGRESS

    progress: Progress = Field(description="percent done, rounded to 2 places")


class OutputDeltaPayload(EventPayload):
    """Streamed output (coalesced tokens). Never stored in PostgreSQL: the full text is stored
    with the result."""

    event_type = EventType.OUTPUT_DELTA

    text: str = Field(description="the next piece of the output")
    progress: Progress = Field(description="percent done, rounded to 2 places")

    def as_data(self) -> dict[str, Any]:
        # The hot path (one per coalesced delta): a third of model_dump's cost. A unit test
        # holds it equal to model_dump.
        return {"text": self.text, "progress": self.progress}


class LogPayload(EventPayload):
    """A line of the job's log (also served by GET /jobs/{id}/logs). Any further fields are
    the kind's own, each a JSON value."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, JsonValue] = Field(init=False)

    event_type = EventType.LOG

    level: str = Field(description="a logging level name: debug, info, warning, error")
    message: str = Field(description="the line, for people")


class StepPayload(EventPayload):
    """A step of a multi-step kind started, finished (its output is now a checkpoint), or was
    reused: an earlier attempt finished it, so this attempt skips it and pays nothing again."""

    event_type = EventType.STEP

    step: str = Field(description="the step's name, as its kind declares it")
    status: Literal["started", "finished", "reused"] = Field(
        description="`reused`: an earlier attempt's checkpoint stands in for the step"
    )
    role: str = Field(description="the role whose model the step calls, e.g. `creative`")
    attempt: int = Field(
        ge=1, description="the attempt that runs it or, when `reused`, the one that finished it"
    )
    progress: Progress = Field(
        description="the job's progress: where the step starts, or where it ends once done"
    )
    tokens_in: int | None = absent_unless_given("finished or reused: the step's input tokens")
    tokens_out: int | None = absent_unless_given("finished or reused: its output tokens")
    cost_usd: str | None = absent_unless_given(
        "finished or reused: what its model calls cost, US dollars as a decimal string with "
        "8 places (the providers' reported costs where they sent them)"
    )


class ProviderBatchPayload(EventPayload):
    """A job of `service_tier: "batch"` moved on in the provider's Batch API: handed over by
    its worker (`pending`), sent in a provider batch (`submitted`), being run
    (`in_progress`, with the batch's counts), or its results being written (`finalizing`)."""

    event_type = EventType.PROVIDER_BATCH

    phase: Literal["pending", "submitted", "in_progress", "finalizing"] = Field(
        description="`pending`: waiting to be sent with others of its model; `submitted`: "
        "the provider has the batch; `in_progress` and `finalizing` as the provider reports"
    )
    progress: Progress = Field(description="percent of the batch's requests done")
    provider_batch_id: str | None = absent_unless_given(
        "from `submitted` on: the provider's id of the batch the job is in"
    )
    total: int | None = absent_unless_given("from `submitted` on: requests in the batch")
    completed: int | None = absent_unless_given("requests of the batch answered so far")
    failed: int | None = absent_unless_given("requests of the batch that failed so far")


class RetryingPayload(EventPayload):
    """The attempt failed and the job will be tried again; another `job.started` follows."""

    event_type = EventType.RETRYING

    reason: Literal["worker_lost"] | None = absent_unless_given(
        "only when the sweeper took the job back from a worker that stopped answering"
    )
    attempt: int = Field(ge=1, description="the attempt that failed")
    worker: str | None = absent_unless_given("with `reason`: the worker that stopped answering")
    delay: float = Field(ge=0, description="seconds until the next attempt")
    retry_at: IsoDatetime = Field(description="when the next attempt may start")
    error: EventError = Field(description="why the attempt failed")


def replayed_output() -> Any:
    # Added by a replay from PostgreSQL (events.replay), after the publisher's own fields.
    return absent_unless_given(
        "only when replayed from PostgreSQL: the stored output, which stands in for the token "
        "deltas that expired with the job's stream"
    )


class SucceededPayload(EventPayload):
    """The job's result is stored. Nothing follows."""

    event_type = EventType.SUCCEEDED

    attempt: int = Field(ge=1, description="the attempt that succeeded")
    output: dict[str, Any] | None = replayed_output()


class FailedPayload(EventPayload):
    """The job failed for good. Nothing follows."""

    event_type = EventType.FAILED

    reason: Literal["worker_lost", "expired"] | None = absent_unless_given(
        "only when the sweeper failed the job: `worker_lost`, its last attempt's worker "
        "stopped answering; `expired`, it was still queued at its `expires_at`"
    )
    attempt: int = Field(ge=0, description="the last attempt; 0 when none started (`expired`)")
    worker: str | None = absent_unless_given("with `reason`: the worker that stopped answering")
    error: EventError = Field(description="why the job failed")
    output: dict[str, Any] | None = replayed_output()


class CanceledPayload(EventPayload):
    """The job was canceled. Nothing follows."""

    event_type = EventType.CANCELED

    reason: Literal["requested", "worker_lost"] = Field(
        description="`requested` by its owner; `worker_lost` when a cancel was pending as its "
        "worker stopped answering"
    )
    attempt: int | None = absent_unless_given("the attempt that was running; none when queued")
    worker: str | None = absent_unless_given("with `worker_lost`: the worker that stopped")
    output: dict[str, Any] | None = replayed_output()


TerminalPayload = SucceededPayload | FailedPayload | CanceledPayload

PAYLOADS: Mapping[EventType, type[EventPayload]] = {
    model.event_type: model
    for model in (
        QueuedPayload,
        StartedPayload,
        ProgressPayload,
        OutputDeltaPayload,
        LogPayload,
        StepPayload,
        ProviderBatchPayload,
        RetryingPayload,
        SucceededPayload,
        FailedPayload,
        CanceledPayload,
    )
}


# The envelope ------------------------------------------------------------------------------


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_mode_override="validation")

    job_id: uuid.UUID
    seq: int = Field(ge=1, description="rises by exactly one per event of the job")
    prev: int | None = Field(
        None,
        description="Only on events served from PostgreSQL, which has no token deltas: the "
        "seq of the event before this one, so a client can tell a hole from a missing event",
    )


def _envelope_of(payload: type[EventPayload]) -> type[_Envelope]:
    name = payload.__name__.removesuffix("Payload") + "Event"
    return create_model(  # type: ignore[call-overload, no-any-return]
        name,
        __base__=_Envelope,
        __doc__=f"A `{payload.event_type}` event.",
        type=(Literal[payload.event_type.value], ...),
        at=(datetime, Field(description="when it happened")),
        data=(payload, ...),
    )


ENVELOPES: Mapping[EventType, type[_Envelope]] = {
    event_type: _envelope_of(payload) for event_type, payload in PAYLOADS.items()
}


class EventEnvelope(RootModel[Any]):
    """One job event, as every transport delivers it: `{job_id, seq, type, at, data}`, and
    `prev` on an event replayed from PostgreSQL. `data` is the payload of its `type`."""

    root: Annotated[
        Union[tuple(ENVELOPES.values())],  # type: ignore[valid-type]  # noqa: UP007
        Field(discriminator="type"),
    ]
