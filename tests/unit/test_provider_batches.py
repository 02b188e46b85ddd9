"""Pure parts of the provider batch path: the request a batch-tier input sends, a result line
read back (answer, refusal, request never run), the batch price, and the simulator's batches."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from app import config
from app.execution.provider_batches import worth_an_event
from app.jobs.provider_batches import BatchRow
from app.kinds import get_kind
from app.kinds.chat import ChatInput
from app.kinds.structured import StructuredInput
from app.llm.batch_api import RemoteBatch, batch_price, read_line
from app.llm.client import ModelClient
from app.llm.errors import ModelError
from app.sim.answer import InvalidRequest
from app.sim.batches import advance, batch_object, parse_lines
from app.sim.batches_store import SimBatch
from app.sim.config import SimConfig
from app.sim.state import SimState

STARTED = datetime(2026, 1, 1, tzinfo=UTC)


def answered(content: str, finish: str = "stop", usage: Any = None) -> dict[str, Any]:
    body = {
        "model": "gpt-4o-mini-2024",
        "choices": [{"index": 0, "message": {"content": content}, "finish_reason": finish}],
        "usage": usage if usage is not None else {"prompt_tokens": 10, "completion_tokens": 4},
    }
    return {"custom_id": "j:1", "response": {"status_code": 200, "body": body}, "error": None}


def test_a_batch_input_sends_its_messages_and_options_only() -> None:
    job_input = ChatInput(prompt="hi", system="be brief", max_tokens=5, service_tier="batch")
    assert job_input.batched
    assert job_input.batch_body() == {
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "max_tokens": 5,
    }
    structured = StructuredInput.model_validate(
        {"prompt": "x", "schema": {"type": "object"}, "service_tier": "batch"}
    )
    request = get_kind("structured").batch_request(structured)  # type: ignore[misc]
    assert request["response_format"]["json_schema"]["schema"] == {"type": "object"}


@pytest.mark.parametrize("tier", ["fast", 1, None, "BATCH"])
def test_only_the_two_tiers_are_accepted(tier: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        ChatInput.model_validate({"prompt": "x", "service_tier": tier})
    assert caught.value.errors()[0]["loc"] == ("service_tier",)


def test_an_answered_line_is_the_text_and_a_call_at_the_model_asked_for() -> None:
    result = read_line(answered("Hello there"), "gpt-4o-mini", "sim", STARTED, 1500.0)
    assert (result.text, result.finish_reason, result.error) == ("Hello there", "stop", None)
    record = result.record
    assert record is not None and record.model == "gpt-4o-mini"
    assert (record.tokens_in, record.tokens_out, record.latency_ms) == (10, 4, 1500.0)


def test_the_batch_price_is_the_tables_times_the_factor() -> None:
    models = ModelClient(config.testing_settings())
    record = read_line(answered("x"), "gpt-4o-mini", "sim", STARTED, 0).record
    assert record is not None
    batch_price(record, models, Decimal("0.5"))
    full = models.prices.cost("gpt-4o-mini", 10, 4)
    assert full > 0 and record.as_row(models.prices)["cost_usd"] == full / 2


@pytest.mark.parametrize(
    ("status", "code"),
    [(400, "model_bad_request"), (429, "model_rate_limited"), (500, "model_unavailable")],
)
def test_a_refused_line_fails_with_its_status_code_and_costs_nothing(
    status: int, code: str
) -> None:
    line = {
        "custom_id": "j:1",
        "response": {"status_code": status, "body": {"error": {"message": "no"}}},
        "error": None,
    }
    result = read_line(line, "m", "sim", STARTED, 0)
    assert result.error is not None and result.error.code == code and result.record is None
    assert "HTTP" in result.error.message


@pytest.mark.parametrize(
    ("provider_code", "code"),
    [
        ("batch_expired", "batch_expired"),
        ("batch_cancelled", "batch_canceled"),
        ("x", "batch_request_failed"),
    ],
)
def test_a_request_never_run_fails_with_a_batch_code(provider_code: str, code: str) -> None:
    line = {"custom_id": "j:1", "response": None, "error": {"code": provider_code, "message": "m"}}
    result = read_line(line, "m", "sim", STARTED, 0)
    assert result.error is not None and result.error.code == code


def test_a_filtered_answer_is_content_policy_but_still_billed() -> None:
    result = read_line(answered("", finish="content_filter"), "m", "sim", STARTED, 0)
    assert result.error is not None and result.error.code == "content_policy"
    assert result.record is not None and result.record.tokens_in == 10


def test_a_structured_batch_answer_that_misses_its_schema_is_output_invalid() -> None:
    kind = get_kind("structured")
    schema = {"type": "object", "required": ["a"], "properties": {"a": {"type": "string"}}}
    job_input = StructuredInput.model_validate({"prompt": "x", "schema": schema})
    assert kind.batch_result is not None
    assert kind.batch_result(job_input, '{"a": "b"}', "stop").data == {"a": "b"}  # type: ignore[attr-defined]
    with pytest.raises(ModelError) as caught:
        kind.batch_result(job_input, '{"b": 1}', "stop")
    assert caught.value.code == "output_invalid"


# The simulator ------------------------------------------------------------------------------


def jsonl(*texts: str) -> bytes:
    rows = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "sim-small", "messages": [{"role": "user", "content": text}]},
        }
        for i, text in enumerate(texts)
    ]
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def sim_batch(data: bytes, created: float = 0.0) -> SimBatch:
    lines, mode = parse_lines(data)
    return SimBatch("b", "f", "/v1/chat/completions", "24h", None, lines, mode, created, 1, 10, 1)


def test_a_sim_batch_moves_through_its_statuses_by_its_age() -> None:
    state = SimState(SimConfig())
    batch = sim_batch(jsonl("a", "b", "c", "d"))
    seen = []
    for now in (0.5, 3.5, 11.5, 13.0):
        advance(batch, state, now)
        seen.append((batch.status, batch_object(batch)["request_counts"]["completed"]))
    assert seen == [("validating", 0), ("in_progress", 1), ("finalizing", 4), ("completed", 4)]
    assert batch.output_file_id is not None and batch.error_file_id is None


def test_the_batch_directives_and_bad_files() -> None:
    _, mode = parse_lines(jsonl("plain", "[[sim batch=expire]] late"))
    assert mode == "expire"
    for bad in (b"", b"not json\n", jsonl("x").replace(b"/v1/chat/completions", b"/v1/embeddings")):
        with pytest.raises(InvalidRequest):
            parse_lines(bad)
    with pytest.raises(InvalidRequest):
        parse_lines(jsonl("a") + jsonl("b"))  # r0 twice


def test_a_batchs_jobs_hear_of_a_new_phase_and_of_each_tenth_done() -> None:
    row = BatchRow(
        id=uuid.uuid4(),
        model="m",
        state="submitted",
        provider_batch_id="b",
        provider_status="in_progress",
        request_count=100,
        completed=10,
        failed=0,
        created_at=STARTED,
        submitted_at=STARTED,
        cancel_requested_at=None,
    )

    def remote(status: str, completed: int, failed: int = 0) -> RemoteBatch:
        return RemoteBatch("b", status, 100, completed, failed, 0)

    assert not worth_an_event(row, remote("in_progress", 15))
    assert worth_an_event(row, remote("in_progress", 15, 5))  # 20 done: the next tenth
    assert worth_an_event(row, remote("finalizing", 10))
