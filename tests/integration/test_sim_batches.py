"""The simulator's Batch API through the real `openai` client: upload, create, progress,
output and error files, expiry, failure, cancel, and the list a client recovers from."""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from devtools.simprocess import SimulatorProcess


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(ttft=0.01, tps=1000) as process:
        process.configure(batch_validating=0.05, batch_seconds=0.4, batch_finalizing=0.05)
        yield process


@pytest.fixture
def client(sim: SimulatorProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=sim.base_url, api_key="sim", max_retries=0, timeout=10) as c:
        yield c


def request_line(custom_id: str, text: str) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "sim-small",
            "messages": [{"role": "user", "content": f"{text} {uuid.uuid4().hex[:8]}"}],
            "max_tokens": 20,
        },
    }


def submit(client: openai.OpenAI, lines: list[dict[str, Any]], **metadata: str) -> Any:
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    upload = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    return client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata=metadata or None,
    )


def until_ended(client: openai.OpenAI, batch_id: str, timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        batch = client.batches.retrieve(batch_id)
        seen.append(batch.status)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch, seen
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.03)


def lines_of(client: openai.OpenAI, file_id: str | None) -> dict[str, Any]:
    if file_id is None:
        return {}
    text = client.files.content(file_id).text
    return {row["custom_id"]: row for row in map(json.loads, text.splitlines())}


def test_a_batch_progresses_and_answers_each_line(client: openai.OpenAI, sim: Any) -> None:
    before = sim.stats()["batches_created"]
    lines = [request_line(f"r{i}", "hello") for i in range(4)]
    lines.append(request_line("bad", "[[sim fault=400]] refused"))
    batch = submit(client, lines, conveyor_batch_id="ours")
    assert batch.status == "validating" and batch.metadata == {"conveyor_batch_id": "ours"}

    ended, seen = until_ended(client, batch.id)
    assert "in_progress" in seen
    assert ended.status == "completed"
    assert ended.request_counts.total == 5
    assert (ended.request_counts.completed, ended.request_counts.failed) == (4, 1)
    outputs = lines_of(client, ended.output_file_id)
    errors = lines_of(client, ended.error_file_id)
    assert sorted(outputs) == ["r0", "r1", "r2", "r3"]
    body = outputs["r0"]["response"]["body"]
    assert outputs["r0"]["response"]["status_code"] == 200
    assert body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] <= 20 and "cost" not in body["usage"]
    assert errors["bad"]["response"]["status_code"] == 400
    assert sim.stats()["batches_created"] == before + 1


def test_an_expired_batch_answers_half_and_errs_the_rest(client: openai.OpenAI) -> None:
    lines = [request_line(f"r{i}", "[[sim batch=expire]] late") for i in range(4)]
    ended, _ = until_ended(client, submit(client, lines).id)
    assert ended.status == "expired"
    assert len(lines_of(client, ended.output_file_id)) == 2
    errors = lines_of(client, ended.error_file_id)
    assert {row["error"]["code"] for row in errors.values()} == {"batch_expired"}


def test_a_failed_batch_has_errors_and_no_files(client: openai.OpenAI) -> None:
    ended, _ = until_ended(client, submit(client, [request_line("a", "[[sim batch=fail]]")]).id)
    assert ended.status == "failed"
    assert ended.errors is not None and ended.errors.data
    assert ended.output_file_id is None and ended.error_file_id is None


def test_cancel_and_list(client: openai.OpenAI, sim: SimulatorProcess) -> None:
    sim.configure(batch_seconds=5)
    try:
        batch = submit(client, [request_line("a", "slow")], conveyor_batch_id="listed")
        canceled = client.batches.cancel(batch.id)
        assert canceled.status == "cancelling"
        ended, _ = until_ended(client, batch.id)
        assert ended.status == "cancelled"
        assert lines_of(client, ended.error_file_id)["a"]["error"]["code"] == "batch_cancelled"
    finally:
        sim.configure(batch_seconds=0.4)
    listed = client.batches.list(limit=100)
    assert listed.data[0].id == batch.id  # newest first
    assert any(b.metadata == {"conveyor_batch_id": "listed"} for b in listed.data)
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)


def test_bad_input_files_are_refused(client: openai.OpenAI) -> None:
    upload = client.files.create(file=("x.jsonl", io.BytesIO(b"not json\n")), purpose="batch")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
