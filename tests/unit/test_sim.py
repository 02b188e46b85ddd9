"""Pure tests of the simulator's building blocks: text, JSON instances, directives, faults."""

from __future__ import annotations

import json
import random
from typing import Any

import jsonschema
import pytest

from app.sim.answer import ChatRequest, InvalidRequest, compose_answer
from app.sim.chunks import ChunkEncoder
from app.sim.directives import (
    DirectiveError,
    Directives,
    FaultCounter,
    parse_directive_text,
    parse_headers,
    request_directives,
)
from app.sim.faults import FaultRates, FaultSpecError
from app.sim.pacing import group_end, schedule, write_window
from app.sim.text import (
    MAX_ANSWER_TOKENS,
    MIN_ANSWER_TOKENS,
    answer_length,
    broken_json,
    json_instance,
    prompt_token_count,
    schema_mismatch_instance,
    seed_for,
    split_pieces,
    text_tokens,
)


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


# --- text ---------------------------------------------------------------------------------


def test_same_messages_give_the_same_seed_and_text() -> None:
    seed = seed_for(user("hello"))
    assert seed == seed_for(user("hello"))
    assert text_tokens(seed, 40) == text_tokens(seed_for(user("hello")), 40)


def test_seed_ignores_key_order() -> None:
    assert seed_for([{"role": "user", "content": "x"}]) == seed_for(
        [{"content": "x", "role": "user"}]
    )


def test_different_messages_give_different_text() -> None:
    first = "".join(text_tokens(seed_for(user("hello")), 40))
    second = "".join(text_tokens(seed_for(user("hello!")), 40))
    assert first != second


def test_tokens_are_words_with_leading_space_and_end_a_sentence() -> None:
    tokens = text_tokens(seed_for(user("words")), 60)
    assert len(tokens) == 60
    assert not tokens[0].startswith(" ")
    assert tokens[0][0].isupper()
    assert all(token.startswith(" ") and " " not in token[1:] for token in tokens[1:])
    assert tokens[-1].endswith(".")


def test_a_shorter_answer_is_generated_independently_of_the_longer_one() -> None:
    seed = seed_for(user("prefix"))
    assert text_tokens(seed, 10)[:9] == text_tokens(seed, 30)[:9]


def test_answer_length_is_within_bounds_and_varies() -> None:
    lengths = {answer_length(seed_for(user(f"q{i}"))) for i in range(200)}
    assert min(lengths) >= MIN_ANSWER_TOKENS
    assert max(lengths) <= MAX_ANSWER_TOKENS
    assert len(lengths) > 20


def test_prompt_tokens_count_words_plus_four_per_message() -> None:
    messages = [
        {"role": "system", "content": "one two"},
        {"role": "user", "content": [{"type": "text", "text": "three four five"}]},
    ]
    assert prompt_token_count(messages) == 2 + 4 + 3 + 4


@pytest.mark.parametrize("text", ['{"a":[1,2.5,"x y"],"b":{"c":null}}', "Hello, world.", " a  b "])
def test_pieces_join_back_to_the_text(text: str) -> None:
    pieces = split_pieces(text)
    assert "".join(pieces) == text
    assert len(pieces) > 1


# --- JSON instances -----------------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 3, "maxLength": 20},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "active": {"type": "boolean"},
        "nickname": {"type": ["string", "null"]},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "kind": {"const": "person"},
        "email": {"type": "string", "format": "email"},
    },
    "required": ["name", "age", "score", "active", "nickname", "role", "kind", "email"],
    "additionalProperties": False,
}

SCHEMAS: dict[str, Any] = {
    "flat object": PERSON,
    "nested arrays": {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "sections": {
                "type": "array",
                "minItems": 2,
                "maxItems": 4,
                "items": {
                    "type": "object",
                    "properties": {
                        "heading": {"type": "string", "maxLength": 10},
                        "tags": {
                            "type": "array",
                            "items": {"enum": ["a", "b", "c"]},
                            "uniqueItems": True,
                            "maxItems": 3,
                        },
                        "weights": {
                            "type": "array",
                            "items": {"type": "number", "multipleOf": 0.5, "minimum": -2},
                        },
                    },
                    "required": ["heading", "tags", "weights"],
                },
            },
        },
        "required": ["title", "sections"],
    },
    "defs and refs": {
        "$defs": {
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"],
            },
            "person": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "home": {"$ref": "#/$defs/address"}},
                "required": ["name", "home"],
            },
        },
        "type": "object",
        "properties": {"people": {"type": "array", "items": {"$ref": "#/$defs/person"}}},
        "required": ["people"],
    },
    "draft-7 definitions": {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "definitions": {"id": {"type": "integer", "minimum": 1, "multipleOf": 7}},
        "type": "array",
        "items": {"$ref": "#/definitions/id"},
        "minItems": 1,
    },
    "recursive tree": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "label": {"type": "string"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                },
                "required": ["label", "children"],
            }
        },
        "$ref": "#/$defs/node",
    },
    "anyOf and oneOf": {
        "type": "object",
        "properties": {
            "value": {"anyOf": [{"type": "integer", "maximum": -5}, {"type": "string"}]},
            "shape": {
                "oneOf": [
                    {"type": "object", "properties": {"r": {"type": "number"}}, "required": ["r"]},
                    {"type": "string", "enum": ["square"]},
                ]
            },
        },
        "required": ["value", "shape"],
    },
    "allOf": {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
            {"properties": {"b": {"type": "integer"}}, "required": ["b"]},
        ]
    },
    "scalars": {"type": "string", "minLength": 50},
    "null": {"type": "null"},
}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_instance_validates(name: str) -> None:
    schema = SCHEMAS[name]
    for seed in range(25):
        instance = json_instance(schema, seed)
        jsonschema.validate(instance, schema)


def test_json_instance_is_deterministic_and_seed_dependent() -> None:
    assert json_instance(PERSON, 7) == json_instance(PERSON, 7)
    assert len({json.dumps(json_instance(PERSON, seed)) for seed in range(10)}) > 1


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_schema_mismatch_instance_does_not_validate(name: str) -> None:
    schema = SCHEMAS[name]
    instance = schema_mismatch_instance(schema)
    json.dumps(instance)  # still valid JSON
    assert not jsonschema.Draft202012Validator(schema).is_valid(instance)


@pytest.mark.parametrize("document", ['{"a":1,"b":[1,2,3]}', "12345", '"text"'])
def test_broken_json_does_not_parse(document: str) -> None:
    with pytest.raises(ValueError):
        json.loads(broken_json(document))


# --- answers ------------------------------------------------------------------------------


def chat(**fields: Any) -> ChatRequest:
    return ChatRequest.from_body({"model": "sim-small", "messages": user("answer me"), **fields})


def test_max_tokens_cuts_the_answer_with_finish_reason_length() -> None:
    seed = seed_for(user("answer me"))
    full = compose_answer(chat(), seed, None, None)
    cut = compose_answer(chat(max_tokens=5), seed, None, None)
    assert full.finish_reason == "stop"
    assert cut.finish_reason == "length"
    assert cut.pieces == full.pieces[:5]


def test_tokens_knob_sets_the_length() -> None:
    answer = compose_answer(chat(), 1, 7, None)
    assert len(answer.pieces) == 7


def test_json_schema_answer_and_its_faults() -> None:
    request = chat(
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    )
    jsonschema.validate(json.loads(compose_answer(request, 3, None, None).content), PERSON)
    mismatch = json.loads(compose_answer(request, 3, None, "schema_mismatch").content)
    assert not jsonschema.Draft202012Validator(PERSON).is_valid(mismatch)
    with pytest.raises(ValueError):
        json.loads(compose_answer(request, 3, None, "invalid_json").content)


def test_json_object_answer_is_an_object_with_text() -> None:
    answer = compose_answer(chat(response_format={"type": "json_object"}), 3, 10, None)
    document = json.loads(answer.content)
    assert list(document) == ["text"]
    assert len(document["text"].split()) == 10


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"messages": user("x")},
        {"model": "m", "messages": []},
        {"model": "m", "messages": user("x"), "max_tokens": 0},
    ],
)
def test_invalid_requests_are_rejected(body: Any) -> None:
    with pytest.raises(InvalidRequest):
        ChatRequest.from_body(body)


def test_unknown_response_format_is_rejected() -> None:
    with pytest.raises(InvalidRequest):
        compose_answer(chat(response_format={"type": "yaml"}), 1, None, None)


# --- directives ---------------------------------------------------------------------------


def test_directive_is_parsed_and_removed_from_text() -> None:
    knobs, cleaned = parse_directive_text(
        "Summarize this. "
        "[[sim fault=429 times=2 retry_after=1 ttft=0.5 tps=50 tokens=40 duration=2]]"
    )
    assert knobs == Directives(
        fault="429", times=2, retry_after=1.0, ttft=0.5, tps=50.0, tokens=40, duration=2.0
    )
    assert cleaned == "Summarize this."


def test_text_without_directive_gives_no_knobs() -> None:
    assert parse_directive_text("plain [[not sim]] text") == (
        Directives(),
        "plain [[not sim]] text",
    )


def test_later_directive_block_wins() -> None:
    knobs, _ = parse_directive_text("[[sim fault=500 tps=10]] hi [[sim fault=drop]]")
    assert knobs == Directives(fault="drop", tps=10.0)


def test_a_block_naming_a_step_steers_only_that_steps_requests() -> None:
    text = (
        "[[sim tps=10]] concept [[sim step=lorebook fault=500 times=1]] [[sim step=profile ttft=2]]"
    )
    assert parse_directive_text(text) == (Directives(tps=10.0), "concept")
    assert parse_directive_text(text, "lorebook")[0] == Directives(fault="500", times=1, tps=10.0)
    assert parse_directive_text(text, "profile")[0] == Directives(tps=10.0, ttft=2.0)
    messages = [{"role": "user", "content": text}]
    assert request_directives(messages, {"X-Conveyor-Step": "lorebook"}).fault == "500"
    assert request_directives(messages, {"X-Conveyor-Step": "review"}).fault is None


def test_headers_are_parsed() -> None:
    headers = {"X-Sim-Fault": "hang", "X-Sim-Retry-After": "3", "x-sim-tokens": "12", "Other": "1"}
    assert parse_headers(headers) == Directives(fault="hang", retry_after=3.0, tokens=12)


def test_message_directive_wins_over_headers_and_only_the_last_user_message_counts() -> None:
    messages = [
        {"role": "user", "content": "[[sim fault=500]] earlier turn"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "now [[sim tps=5]]"}]},
    ]
    knobs = request_directives(messages, {"X-Sim-Fault": "429", "X-Sim-Tps": "99"})
    assert knobs == Directives(fault="429", tps=5.0)


@pytest.mark.parametrize(
    "text", ["[[sim fault=teapot]]", "[[sim tps=fast]]", "[[sim color=red]]", "[[sim times=-1]]"]
)
def test_bad_directives_raise(text: str) -> None:
    with pytest.raises(DirectiveError):
        parse_directive_text(text)


def test_times_faults_only_the_first_n_requests_per_hash() -> None:
    counter = FaultCounter()
    assert [counter.should_fault(1, 2) for _ in range(4)] == [True, True, False, False]
    assert counter.should_fault(2, 2) is True  # another hash counts on its own
    assert all(counter.should_fault(3, None) for _ in range(5))  # no times: always
    counter.reset()
    assert counter.should_fault(1, 2) is True


def test_fault_counter_forgets_the_oldest_hashes() -> None:
    counter = FaultCounter(max_keys=2)
    counter.should_fault(1, 1)
    counter.should_fault(2, 1)
    counter.should_fault(3, 1)
    assert counter.should_fault(1, 1) is True  # forgotten, so it counts from one again


# --- run-wide faults, pacing, chunks ------------------------------------------------------


def test_fault_rates_parse_and_draw() -> None:
    rates = FaultRates.parse("429=0.25, 500=0.25,drop=0")
    assert str(rates) == "429=0.25,500=0.25,drop=0"
    rng = random.Random(1)
    draws = [rates.pick(rng) for _ in range(4000)]
    assert 800 < draws.count("429") < 1200
    assert 800 < draws.count("500") < 1200
    assert "drop" not in draws
    assert FaultRates.parse("").pick(rng) is None


@pytest.mark.parametrize("spec", ["teapot=0.1", "429", "429=2", "429=0.6,500=0.6", "500=x"])
def test_bad_fault_rates_raise(spec: str) -> None:
    with pytest.raises(FaultSpecError):
        FaultRates.parse(spec)


def test_schedule_without_duration_uses_ttft_and_tps() -> None:
    timing = schedule(3, ttft=0.5, tps=10, duration=None)
    assert timing.token_offsets == pytest.approx((0.5, 0.6, 0.7))
    assert timing.end == pytest.approx(0.7)
    assert schedule(3, ttft=0.5, tps=0, duration=None).token_offsets == (0.5, 0.5, 0.5)


def test_schedule_with_duration_ends_exactly_at_it() -> None:
    timing = schedule(5, ttft=0.2, tps=1, duration=2.0)
    assert timing.token_offsets[0] == pytest.approx(0.2)
    assert timing.token_offsets[-1] == pytest.approx(2.0)
    assert timing.end == 2.0
    assert schedule(0, ttft=0.2, tps=1, duration=1.0).first == 1.0


def test_tokens_close_together_are_grouped_into_one_write() -> None:
    offsets = schedule(10, ttft=0, tps=1000, duration=None).token_offsets
    assert group_end(offsets, 0, 0.0045) == 5
    assert write_window(1) < write_window(1000)


def test_chunk_encoder_emits_openai_chunks() -> None:
    encoder = ChunkEncoder("chatcmpl-1", 123, "sim-small", include_usage=True)
    lines = [
        encoder.role(),
        encoder.content(' "quoted"'),
        encoder.finish("stop"),
        encoder.usage(3, 1, 0.0000014),
    ]
    chunks = [json.loads(line.decode().removeprefix("data: ")) for line in lines]
    assert all(line.startswith(b"data: ") and line.endswith(b"\n\n") for line in lines)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[1]["choices"][0]["delta"] == {"content": ' "quoted"'}
    assert chunks[1]["object"] == "chat.completion.chunk"
    assert chunks[1]["usage"] is None
    assert chunks[2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[3]["choices"] == []
    assert chunks[3]["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 1,
        "total_tokens": 4,
        "cost": 0.0000014,
    }
    assert "cost" not in json.loads(encoder.usage(3, 1, None).decode()[6:])["usage"]
    without_usage = ChunkEncoder("chatcmpl-1", 123, "m", include_usage=False).content("x")
    assert "usage" not in json.loads(without_usage.decode().removeprefix("data: "))


def test_unusable_schema_is_an_invalid_request() -> None:
    endless = {"type": "object", "properties": {"me": {"$ref": "#"}}, "required": ["me"]}
    request = chat(
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": endless}}
    )
    with pytest.raises(InvalidRequest):
        compose_answer(request, 1, None, None)


def test_the_simulators_rate_limit_counts_admitted_requests_per_model() -> None:
    from app.sim.config import SimConfig
    from app.sim.state import SimState

    state = SimState(SimConfig(rate_limits={"limited": (2, 10.0)}))
    assert state.over_rate_limit("limited", 100.0) is None
    assert state.over_rate_limit("limited", 101.0) is None
    # The third within 10 s waits for the first to leave the window.
    assert state.over_rate_limit("limited", 105.0) == pytest.approx(5.0)
    assert state.over_rate_limit("other", 105.0) is None
    assert state.over_rate_limit("limited", 110.5) is None
