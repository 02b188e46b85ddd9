"""The simulator over real HTTP, driven by the real `openai` client (and aiohttp for load)."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import httpx2
import jsonschema
import openai
import pytest

from app.sim.text import prompt_token_count
from devtools.simprocess import SimulatorProcess

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"enum": ["news", "sport", "tech"]}, "minItems": 1},
        "author": {"$ref": "#/$defs/author"},
    },
    "required": ["title", "rating", "tags", "author"],
    "additionalProperties": False,
    "$defs": {
        "author": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "verified": {"type": "boolean"}},
            "required": ["name", "verified"],
            "additionalProperties": False,
        }
    },
}
JSON_SCHEMA_FORMAT: Any = {
    "type": "json_schema",
    "json_schema": {"name": "review", "schema": SCHEMA, "strict": True},
}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(ttft=0.01, tps=1000) as process:
        yield process


@pytest.fixture(autouse=True)
def fresh_counters(sim: SimulatorProcess) -> None:
    sim.reset()


@pytest.fixture
def client(sim: SimulatorProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=sim.base_url, api_key="sim", max_retries=0, timeout=10) as c:
        yield c


def ask(text: str) -> list[Any]:
    """Messages unique to this call, so `times` counters never leak between tests."""
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": f"{text} ({uuid.uuid4().hex[:8]})"},
    ]


def collect(stream: Any) -> tuple[str, list[Any]]:
    text, chunks = "", []
    for chunk in stream:
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    return text, chunks


def eventually(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# --- normal answers -----------------------------------------------------------------------


def test_models_are_listed(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    assert {"sim-small", "sim-large", "gpt-4o-mini", "gpt-4o"} <= set(ids)


def test_plain_completion_has_text_and_usage(client: openai.OpenAI) -> None:
    messages = ask("Say something.")
    completion = client.chat.completions.create(model="any-model-name", messages=messages)
    assert completion.object == "chat.completion"
    assert completion.model == "any-model-name"
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert choice.message.content
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == prompt_token_count(messages)
    assert 24 <= usage.completion_tokens <= 96
    assert usage.completion_tokens == len(choice.message.content.split())
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_stream_matches_the_plain_answer_and_ends_with_usage(client: openai.OpenAI) -> None:
    messages = ask("Stream it.")
    whole = client.chat.completions.create(model="sim-small", messages=messages)
    stream = client.chat.completions.create(
        model="sim-small",
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, chunks = collect(stream)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage == whole.usage
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_max_tokens_cuts_with_finish_reason_length(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="sim-small", messages=ask("Long answer please."), max_completion_tokens=5
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5


def test_json_schema_output_validates_streamed_or_not(client: openai.OpenAI) -> None:
    messages = ask("Review this article.")
    completion = client.chat.completions.create(
        model="sim-small", messages=messages, response_format=JSON_SCHEMA_FORMAT
    )
    content = completion.choices[0].message.content
    assert content is not None
    jsonschema.validate(json.loads(content), SCHEMA)
    stream = client.chat.completions.create(
        model="sim-small", messages=messages, response_format=JSON_SCHEMA_FORMAT, stream=True
    )
    text, chunks = collect(stream)
    assert text == content
    assert len(chunks) > 5  # streamed in token-sized pieces


def test_json_object_output_is_an_object(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="sim-small", messages=ask("JSON please."), response_format={"type": "json_object"}
    )
    content = completion.choices[0].message.content
    assert content is not None
    assert isinstance(json.loads(content)["text"], str)


# --- faults -------------------------------------------------------------------------------


def test_rate_limit_once_then_success(client: openai.OpenAI, sim: SimulatorProcess) -> None:
    messages = ask("[[sim fault=429 times=1 retry_after=1]] Hello.")
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="sim-small", messages=messages)
    assert caught.value.response.headers["Retry-After"] == "1"
    assert caught.value.code == "rate_limit_exceeded"
    completion = client.chat.completions.create(model="sim-small", messages=messages)
    assert completion.choices[0].message.content
    assert sim.stats()["by_outcome"] == {"429": 1, "ok": 1}


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("400", openai.BadRequestError),
        ("401", openai.AuthenticationError),
        ("500", openai.InternalServerError),
    ],
)
def test_status_faults_raise_the_matching_error(
    client: openai.OpenAI, fault: str, error: type[Exception]
) -> None:
    with pytest.raises(error):
        client.chat.completions.create(model="sim-small", messages=ask(f"[[sim fault={fault}]]"))


def test_faults_can_come_as_headers(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(
            model="sim-small", messages=ask("Hi."), extra_headers={"X-Sim-Fault": "500"}
        )


def test_drop_breaks_the_stream_midway(client: openai.OpenAI, sim: SimulatorProcess) -> None:
    messages = ask("Tell me a story.")
    full = client.chat.completions.create(model="sim-small", messages=messages)
    full_text = full.choices[0].message.content
    assert full_text is not None
    received = ""
    # The fault comes as a header so the messages (and so the text) stay the same.
    stream = client.chat.completions.create(
        model="sim-small", messages=messages, stream=True, extra_headers={"X-Sim-Fault": "drop"}
    )
    with pytest.raises(openai.APIConnectionError) as caught:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received += chunk.choices[0].delta.content
    assert isinstance(caught.value.__cause__, httpx2.RemoteProtocolError)
    assert "incomplete chunked read" in str(caught.value.__cause__)
    assert received
    assert full_text.startswith(received)
    assert len(received) < len(full_text)
    assert sim.stats()["by_outcome"]["drop"] == 1


def test_drop_without_stream_gets_no_response(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIConnectionError) as caught:
        client.chat.completions.create(model="sim-small", messages=ask("[[sim fault=drop]]"))
    assert isinstance(caught.value.__cause__, httpx2.RemoteProtocolError)


def test_malformed_chunk_makes_the_client_fail_to_parse(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="sim-small", messages=ask("[[sim fault=malformed tokens=20]]"), stream=True
    )
    received = []
    # The openai client does not wrap this: the raw JSON error escapes the iteration.
    with pytest.raises(json.JSONDecodeError):
        for chunk in stream:
            received.append(chunk)
    assert 1 < len(received) < 20


@pytest.mark.parametrize("streamed", [False, True])
def test_hang_times_out(sim: SimulatorProcess, streamed: bool) -> None:
    with openai.OpenAI(base_url=sim.base_url, api_key="sim", max_retries=0, timeout=1) as client:
        started = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            response = client.chat.completions.create(
                model="sim-small", messages=ask("[[sim fault=hang]]"), stream=streamed
            )
            for _ in response:  # type: ignore[union-attr]
                pass
        assert 0.9 < time.monotonic() - started < 3
    eventually(lambda: sim.stats()["canceled_by_client"] == 1)
    assert sim.stats()["streams_active"] == 0


def test_content_faults_on_structured_output(client: openai.OpenAI) -> None:
    broken = client.chat.completions.create(
        model="sim-small",
        messages=ask("[[sim fault=invalid_json]]"),
        response_format=JSON_SCHEMA_FORMAT,
    )
    with pytest.raises(json.JSONDecodeError):
        json.loads(broken.choices[0].message.content or "")
    mismatch = client.chat.completions.create(
        model="sim-small",
        messages=ask("[[sim fault=schema_mismatch]]"),
        response_format=JSON_SCHEMA_FORMAT,
    )
    document = json.loads(mismatch.choices[0].message.content or "")
    assert not jsonschema.Draft202012Validator(SCHEMA).is_valid(document)


def test_bad_directive_is_a_loud_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="unknown sim fault"):
        client.chat.completions.create(model="sim-small", messages=ask("[[sim fault=teapot]]"))


def test_run_faults_set_at_runtime(client: openai.OpenAI, sim: SimulatorProcess) -> None:
    sim.configure(faults="500=1")
    try:
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="sim-small", messages=ask("Hi."))
        # A request can opt out of the run's random faults.
        client.chat.completions.create(model="sim-small", messages=ask("[[sim fault=none]] Hi."))
    finally:
        assert sim.configure(faults="")["faults"] == ""
    client.chat.completions.create(model="sim-small", messages=ask("Hi."))


# --- timing, counters, load ---------------------------------------------------------------


def test_duration_sets_the_total_time_of_a_stream(client: openai.OpenAI) -> None:
    started = time.monotonic()
    stream = client.chat.completions.create(
        model="sim-small", messages=ask("[[sim duration=1 tokens=10]]"), stream=True
    )
    text, _ = collect(stream)
    elapsed = time.monotonic() - started
    assert len(text.split()) == 10
    assert 0.9 <= elapsed <= 1.5


def test_stats_count_what_happened(client: openai.OpenAI, sim: SimulatorProcess) -> None:
    client.chat.completions.create(model="sim-small", messages=ask("[[sim tokens=7]]"))
    collect(
        client.chat.completions.create(
            model="sim-small", messages=ask("[[sim tokens=5]]"), stream=True
        )
    )
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="sim-small", messages=ask("[[sim fault=429]]"))
    stats = sim.stats()
    assert stats["requests"] == 3
    assert stats["by_outcome"] == {"ok": 2, "429": 1}
    assert stats["completion_tokens_sent"] == 12
    assert stats["streams_max"] == 1
    assert stats["streams_active"] == 0
    assert stats["canceled_by_client"] == 0


def test_a_stream_closed_early_is_counted(client: openai.OpenAI, sim: SimulatorProcess) -> None:
    stream = client.chat.completions.create(
        model="sim-small", messages=ask("[[sim tokens=50 tps=20]]"), stream=True
    )
    next(iter(stream))
    stream.close()
    eventually(lambda: sim.stats()["canceled_by_client"] == 1)
    assert sim.stats()["streams_active"] == 0


STREAMS = 1000
STREAM_TOKENS = 20
STREAM_SECONDS = 2


async def _count_stream_tokens(session: aiohttp.ClientSession, url: str, index: int) -> int:
    body = {
        "model": "sim-small",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [
            {
                "role": "user",
                "content": f"load {index} [[sim duration={STREAM_SECONDS} tokens={STREAM_TOKENS}]]",
            }
        ],
    }
    tokens, usage, done = 0, None, False
    async with session.post(url, json=body) as response:
        assert response.status == 200
        async for line in response.content:
            if not line.startswith(b"data: "):
                continue
            data = line[len(b"data: ") :].strip()
            if data == b"[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                tokens += 1
            usage = chunk.get("usage") or usage
    assert done
    assert usage is not None
    assert usage["completion_tokens"] == tokens
    return tokens


async def _run_streams(url: str) -> list[int]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        return await asyncio.gather(
            *(_count_stream_tokens(session, url, index) for index in range(STREAMS))
        )


def test_a_thousand_concurrent_streams(sim: SimulatorProcess) -> None:
    started = time.monotonic()
    counts = asyncio.run(_run_streams(f"{sim.base_url}/chat/completions"))
    elapsed = time.monotonic() - started
    assert counts == [STREAM_TOKENS] * STREAMS
    assert elapsed < 6, f"{STREAMS} streams of {STREAM_SECONDS} s took {elapsed:.2f} s"
    stats = sim.stats()
    assert stats["streams_max"] >= 900
    assert stats["by_outcome"] == {"ok": STREAMS}
    assert stats["completion_tokens_sent"] == STREAMS * STREAM_TOKENS
    assert stats["canceled_by_client"] == 0


# --- the process helper -------------------------------------------------------------------


def test_stop_leaves_no_process_behind() -> None:
    process = SimulatorProcess(tps=0).start()
    pid = process.pid
    assert pid is not None
    assert process.running
    process.stop()
    process.stop()  # idempotent
    assert not process.running
    assert process.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_usage_reports_a_cost_from_the_tokens_as_openrouter_does(
    client: openai.OpenAI, sim: SimulatorProcess
) -> None:
    tag = f"cost-{uuid.uuid4().hex[:6]}"
    whole = client.chat.completions.create(
        model="sim-small", messages=ask(f"What does it cost? [[sim tag={tag}]]")
    )
    usage = whole.usage.model_dump()
    expected = (usage["prompt_tokens"] * 0.20 + usage["completion_tokens"] * 0.80) / 1_000_000
    assert usage["cost"] == pytest.approx(expected, rel=1e-6)
    fixed = client.chat.completions.create(
        model="sim-small", messages=ask("Fixed [[sim cost=0.25]]")
    ).usage.model_dump()
    assert fixed["cost"] == 0.25
    none = client.chat.completions.create(
        model="sim-small", messages=ask("None [[sim cost=none]]")
    ).usage.model_dump()
    assert "cost" not in none
    (logged,) = sim.requests(tag)
    assert time.time() - 60 < logged.pop("at") <= time.time()
    assert logged == {"model": "sim-small", "tag": tag, "system": "You are terse.", "outcome": "ok"}
