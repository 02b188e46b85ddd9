"""The model client against a simulator of its own (so no other test's calls are counted):
streamed calls reuse the client's connections, and an answer read to its end is whole."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app import config
from app.llm.client import ModelClient
from devtools.simprocess import SimulatorProcess


@pytest.fixture(scope="module")
def own_simulator() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(ttft=0.0, tps=0) as sim:
        yield sim


def _call(client: ModelClient, prompt: str) -> str:
    deltas: list[str] = []
    completion = client.stream_chat(
        model="sim-1",
        messages=[{"role": "user", "content": prompt}],
        interrupted=lambda: False,
        on_delta=deltas.append,
        register_closer=lambda _: None,
    )
    assert completion.finish_reason == "stop"
    assert "".join(deltas) == completion.text
    assert completion.record.usage_reported and completion.record.tokens_out == 12
    return completion.text


def test_streamed_calls_reuse_the_clients_connections(own_simulator: SimulatorProcess) -> None:
    settings = config.testing_settings(openai_base_url=own_simulator.base_url, openai_api_key="sim")
    client = ModelClient(settings)
    own_simulator.reset()
    for n in range(10):
        assert _call(client, f"[[sim tokens=12]] call {n}")
    stats = own_simulator.stats()
    assert stats["requests"] == 10
    # One after another, every call after the first goes out on the same connection: a stream
    # closed before its end would have cost a new one each.
    assert stats["connections"] == 1, stats
