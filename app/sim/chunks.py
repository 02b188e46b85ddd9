"""OpenAI wire objects: `chat.completion` bodies and pre-encoded `chat.completion.chunk` lines.

A stream's chunks differ only in their delta, so the constant JSON around the delta is encoded
once per stream and each token costs one small json.dumps of its text: this keeps 1,000
concurrent streams cheap on a small machine.
"""

from __future__ import annotations

import json
from typing import Any

SYSTEM_FINGERPRINT = "fp_conveyor_sim"
DONE = b"data: [DONE]\n\n"
# What the `malformed` fault injects into a stream: an SSE event whose data is not JSON.
MALFORMED_EVENT = b"data: {not json\n\n"


def compact_json(value: Any) -> str:
    """JSON without spaces, as OpenAI sends it."""
    return json.dumps(value, separators=(",", ":"))


# What the simulator says a call cost, in USD per million tokens, the way OpenRouter reports
# `usage.cost`: its own figures, deliberately not any price table's, so a test can tell the
# reported cost from one computed by the client.
PRICE_PER_MILLION_IN = 0.20
PRICE_PER_MILLION_OUT = 0.80


def reported_cost(prompt_tokens: int, completion_tokens: int) -> float:
    cost = prompt_tokens * PRICE_PER_MILLION_IN + completion_tokens * PRICE_PER_MILLION_OUT
    return round(cost / 1_000_000, 10)


def usage(prompt_tokens: int, completion_tokens: int, cost: float | None) -> dict[str, Any]:
    """The usage object; `cost` (USD) is left out when None, as OpenAI leaves it out."""
    body: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cost is not None:
        body["cost"] = cost
    return body


def completion_body(
    *,
    completion_id: str,
    created: int,
    model: str,
    content: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    cost: float | None,
) -> dict[str, Any]:
    """A non-streaming `chat.completion` object."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens, cost),
    }


class ChunkEncoder:
    """Encodes the `data: {...}\\n\\n` lines of one streamed completion."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        self.include_usage = include_usage
        header = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        # OpenAI sends "usage": null on every chunk but the last when usage was asked for.
        self._head = compact_json(header)[:-1]
        self._tail = ',"usage":null}\n\n' if include_usage else "}\n\n"
        self._content_prefix = (
            f'data: {self._head},"choices":[{{"index":0,"delta":{{"content":'
        ).encode()
        self._content_suffix = ('},"logprobs":null,"finish_reason":null}]' + self._tail).encode()

    def _choice_chunk(self, delta: dict[str, Any], finish_reason: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return f'data: {self._head},"choices":[{compact_json(choice)}]{self._tail}'.encode()

    def role(self) -> bytes:
        return self._choice_chunk({"role": "assistant", "content": "", "refusal": None}, None)

    def content(self, piece: str) -> bytes:
        return self._content_prefix + json.dumps(piece).encode() + self._content_suffix

    def finish(self, finish_reason: str) -> bytes:
        return self._choice_chunk({}, finish_reason)

    def usage(self, prompt_tokens: int, completion_tokens: int, cost: float | None) -> bytes:
        body = compact_json(usage(prompt_tokens, completion_tokens, cost))
        return f'data: {self._head},"choices":[],"usage":{body}}}\n\n'.encode()
