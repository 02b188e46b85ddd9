"""The event payload models: each is the exact wire format of its event type."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from app.jobs.events import Event
from app.jobs.payloads import (
    PAYLOADS,
    CanceledPayload,
    EventEnvelope,
    EventError,
    FailedPayload,
    LogPayload,
    OutputDeltaPayload,
    QueuedPayload,
    RetryingPayload,
    StartedPayload,
)
from app.jobs.states import EventType

RETRY_AT = "2026-11-24T12:00:03.500000+00:00"
ERROR = {"code": "model_rate_limited", "message": "429 from the provider"}

# Every shape each publisher sends, written out as it appears on the wire (key order included),
# as it was before the models existed: the models must reproduce these byte for byte.
WIRE: dict[EventType, list[dict[str, Any]]] = {
    EventType.QUEUED: [
        {"kind": "chat", "retry_of": None},
        {"kind": "structured", "retry_of": "6c1f5ad2-7ba4-4a4e-9d0f-3bb1b9f0a2c1"},
    ],
    EventType.STARTED: [{"attempt": 1, "worker": "host:4242"}],
    EventType.PROGRESS: [{"progress": 42.5}, {"progress": 0.0}, {"progress": 100.0}],
    EventType.OUTPUT_DELTA: [{"text": "Conveyors move", "progress": 23.5}],
    EventType.LOG: [
        {"level": "info", "message": "hello"},
        {"level": "warning", "message": "repairing", "error": "at (root): not an object"},
    ],
    EventType.PROVIDER_BATCH: [
        {"phase": "pending", "progress": 0.0},
        {
            "phase": "in_progress",
            "progress": 40.0,
            "provider_batch_id": "batch_abc",
            "total": 5,
            "completed": 1,
            "failed": 1,
        },
    ],
    EventType.STEP: [
        {"step": "outline", "status": "started", "role": "analysis", "attempt": 1, "progress": 0.0},
        {
            "step": "outline",
            "status": "finished",
            "role": "analysis",
            "attempt": 1,
            "progress": 20.0,
            "tokens_in": 12,
            "tokens_out": 40,
            "cost_usd": "0.00003440",
        },
        {
            "step": "draft",
            "status": "reused",
            "role": "creative",
            "attempt": 1,
            "progress": 70.0,
            "tokens_in": 60,
            "tokens_out": 300,
            "cost_usd": "0.00025200",
        },
    ],
    EventType.RETRYING: [
        # The worker's own retry (schedule_retry).
        {"attempt": 1, "delay": 1.25, "retry_at": RETRY_AT, "error": ERROR},
        # The sweeper's, for a worker that stopped answering.
        {
            "reason": "worker_lost",
            "attempt": 2,
            "worker": "host:4242",
            "delay": 3.0,
            "retry_at": RETRY_AT,
            "error": {"code": "worker_lost", "message": "the worker stopped answering"},
        },
    ],
    EventType.SUCCEEDED: [
        {"attempt": 1},
        {"attempt": 2, "output": {"text": "replayed from PostgreSQL"}},
    ],
    EventType.FAILED: [
        {"attempt": 1, "error": ERROR},
        {
            "reason": "worker_lost",
            "attempt": 3,
            "worker": "host:4242",
            "error": {"code": "worker_lost", "message": "the worker running attempt 3 stopped"},
        },
    ],
    EventType.CANCELED: [
        {"reason": "requested"},
        {"reason": "requested", "attempt": 1},
        {"reason": "requested", "attempt": 1, "output": {"partial_text": "Once upon"}},
        {"reason": "worker_lost", "attempt": 2, "worker": "host:4242"},
    ],
}
EXAMPLES = [
    pytest.param(event_type, data, id=f"{event_type}-{i}")
    for event_type, shapes in WIRE.items()
    for i, data in enumerate(shapes)
]


def test_every_event_type_has_one_payload_model_and_examples() -> None:
    assert set(PAYLOADS) == set(EventType)
    assert all(model.event_type is event_type for event_type, model in PAYLOADS.items())
    assert len(set(PAYLOADS.values())) == len(EventType)
    assert set(WIRE) == set(EventType)


@pytest.mark.parametrize(("event_type", "data"), EXAMPLES)
def test_a_payload_round_trips_byte_for_byte(event_type: EventType, data: dict[str, Any]) -> None:
    payload = PAYLOADS[event_type].model_validate(data)
    assert json.dumps(payload.as_data()) == json.dumps(data)
    again = PAYLOADS[event_type].model_validate_json(json.dumps(payload.as_data()))
    assert again == payload


@pytest.mark.parametrize(("event_type", "data"), EXAMPLES)
def test_an_unknown_field_is_refused(event_type: EventType, data: dict[str, Any]) -> None:
    model = PAYLOADS[event_type]
    if model is LogPayload:
        pytest.skip("job.log carries the kind's own fields; see the log test")
    with pytest.raises(ValidationError, match="extra_forbidden"):
        model.model_validate({**data, "surprise": 1})


@pytest.mark.parametrize(("event_type", "data"), EXAMPLES)
def test_a_missing_field_is_refused(event_type: EventType, data: dict[str, Any]) -> None:
    model = PAYLOADS[event_type]
    required = [name for name, field in model.model_fields.items() if field.is_required()]
    assert required, f"{event_type} has no required field"
    for name in required:
        with pytest.raises(ValidationError, match="missing"):
            model.model_validate({k: v for k, v in data.items() if k != name})


def test_a_log_line_keeps_the_kinds_fields_but_only_json_values() -> None:
    line = LogPayload(level="warning", message="repairing", error="bad", tries=[1, 2])
    assert line.as_data() == {
        "level": "warning",
        "message": "repairing",
        "error": "bad",
        "tries": [1, 2],
    }
    with pytest.raises(ValidationError):
        LogPayload(level="info", message="x", when=object())


def test_optional_fields_are_left_out_never_sent_as_null() -> None:
    canceled = CanceledPayload(reason="requested", attempt=None, worker=None)
    assert canceled.as_data() == {"reason": "requested"}
    assert "null" not in json.dumps(CanceledPayload.model_json_schema()["properties"])
    # A required field may be null, and is then sent as null.
    assert QueuedPayload(kind="chat", retry_of=None).as_data() == {"kind": "chat", "retry_of": None}


def test_the_retry_time_keeps_isoformat_and_the_error_its_shape() -> None:
    at = datetime(2026, 11, 24, 12, 0, 3, 500000, tzinfo=UTC)
    payload = RetryingPayload(
        attempt=1, delay=1.25, retry_at=at, error=EventError(code="c", message="m")
    )
    assert payload.as_data()["retry_at"] == at.isoformat() == RETRY_AT
    with pytest.raises(ValidationError):  # a naive time says nothing about its zone
        RetryingPayload.model_validate({**WIRE[EventType.RETRYING][0], "retry_at": "2026-11-24"})


def test_values_out_of_range_are_refused() -> None:
    with pytest.raises(ValidationError):
        OutputDeltaPayload(text="x", progress=100.5)
    with pytest.raises(ValidationError):
        StartedPayload(attempt=0, worker="w")
    with pytest.raises(ValidationError):
        FailedPayload.model_validate({"reason": "bored", "attempt": 1, "error": ERROR})


@pytest.mark.parametrize(("event_type", "data"), EXAMPLES)
def test_an_events_envelope_matches_the_published_schema(
    event_type: EventType, data: dict[str, Any]
) -> None:
    event = Event(uuid.uuid4(), "owner", 7, PAYLOADS[event_type].model_validate(data))
    envelope = event.envelope()
    assert envelope["type"] == event_type.value and envelope["data"] == data
    parsed = EventEnvelope.model_validate_json(json.dumps(envelope)).root
    assert parsed.type == event_type.value
    assert parsed.data == PAYLOADS[event_type].model_validate(data)


def test_an_envelope_whose_data_is_not_its_types_payload_is_refused() -> None:
    envelope = Event(uuid.uuid4(), "owner", 2, StartedPayload(attempt=1, worker="w")).envelope()
    with pytest.raises(ValidationError):
        EventEnvelope.model_validate({**envelope, "type": EventType.PROGRESS.value})
    with pytest.raises(ValidationError):
        EventEnvelope.model_validate({**envelope, "type": "job.unheard_of"})


def test_the_envelope_schema_is_one_of_the_types_by_discriminator() -> None:
    schema = EventEnvelope.model_json_schema()
    assert set(schema["discriminator"]["mapping"]) == {t.value for t in EventType}
    assert len(schema["oneOf"]) == len(EventType)


@pytest.mark.parametrize(
    "delta",
    [
        OutputDeltaPayload(text="x", progress=0.0),
        OutputDeltaPayload(text="ünïcode \n", progress=99.99),
        OutputDeltaPayload.model_validate({"text": "", "progress": 50}),
    ],
)
def test_the_deltas_light_path_writes_what_the_model_would(delta: OutputDeltaPayload) -> None:
    assert json.dumps(delta.as_data()) == json.dumps(delta.model_dump(mode="json"))
