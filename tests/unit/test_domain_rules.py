"""Pure rules of the job domain: backoff, cursors, kinds' input validation, progress."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from app.api.schemas import BadCursor, decode_cursor, encode_cursor
from app.jobs.states import TERMINAL, JobStatus
from app.jobs.transitions import request_fingerprint, retry_delay
from app.kinds import KINDS, KindError, get_kind
from app.kinds.context import token_progress
from app.kinds.structured import InvalidOutput, parse_and_validate


def test_backoff_grows_exponentially_within_jitter_and_cap() -> None:
    for attempt, ceiling in ((1, 1.0), (2, 2.0), (3, 4.0), (10, 30.0)):
        delays = [retry_delay(attempt, base=1.0, cap=30.0) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1, "jittered"


def test_retry_after_is_a_floor() -> None:
    assert retry_delay(1, base=0.1, cap=1.0, retry_after=5.0) == 5.0
    assert retry_delay(5, base=1.0, cap=8.0, retry_after=0.5) >= 4.0


def test_cursor_round_trip_and_garbage() -> None:
    when, job_id = datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=UTC), uuid.uuid4()
    assert decode_cursor(encode_cursor(when, job_id)) == (when, job_id)
    for garbage in ("", "abc", "%%%", encode_cursor(when, job_id)[:-4]):
        with pytest.raises(BadCursor):
            decode_cursor(garbage)


def test_fingerprint_ignores_key_order() -> None:
    assert request_fingerprint({"a": 1, "b": {"c": 2, "d": 3}}) == request_fingerprint(
        {"b": {"d": 3, "c": 2}, "a": 1}
    )
    assert request_fingerprint({"a": 1}) != request_fingerprint({"a": 2})


def test_status_enum_is_the_single_vocabulary() -> None:
    assert [s.value for s in JobStatus] == ["queued", "running", "succeeded", "failed", "canceled"]
    assert {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED} == TERMINAL


def test_registry() -> None:
    assert set(KINDS) == {"chat", "structured", "article", "character_card", "image", "canvas"}
    assert KINDS["chat"].steps == () and KINDS["structured"].steps == ()
    assert [step.name for step in KINDS["article"].steps] == ["outline", "draft", "edit"]
    assert KINDS["article"].roles == ("analysis", "creative")
    card_steps = [step.name for step in KINDS["character_card"].steps]
    assert card_steps == ["profile", "greetings", "lorebook", "review"]
    assert KINDS["character_card"].roles == ("creative", "analysis")
    with pytest.raises(KindError, match="known kinds"):
        get_kind("paint")


def test_chat_input_needs_exactly_one_of_prompt_or_messages() -> None:
    chat = get_kind("chat").Input
    assert chat.model_validate({"prompt": "hi"}).as_messages() == [
        {"role": "user", "content": "hi"}
    ]
    messages = [{"role": "user", "content": "a"}]
    with_system = chat.model_validate({"messages": messages, "system": "be brief"})
    assert with_system.as_messages()[0] == {"role": "system", "content": "be brief"}
    for bad in ({}, {"prompt": "a", "messages": messages}):
        with pytest.raises(ValidationError):
            chat.model_validate(bad)


def test_structured_output_validation() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert parse_and_validate('{"n": 3}', schema) == {"n": 3}
    with pytest.raises(InvalidOutput, match="not JSON"):
        parse_and_validate('{"n": ', schema)
    with pytest.raises(InvalidOutput, match="n"):
        parse_and_validate('{"n": "three"}', schema)
    with pytest.raises(InvalidOutput, match="required"):
        parse_and_validate("{}", schema)


def test_token_progress_never_claims_done_early() -> None:
    bounded, open_ended = token_progress(100), token_progress(None)
    assert bounded(50) == 50 and bounded(500) == 99
    values = [open_ended(n) for n in (0, 10, 100, 1000, 100_000)]
    assert values == sorted(values) and values[0] == 0 and values[-1] <= 95
