"""From a chat completion request body to the answer's pieces (one piece = one token)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.sim import text


class InvalidRequest(ValueError):
    """The request itself is wrong (not a simulated fault); answered with a real 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[Any]
    stream: bool
    include_usage: bool
    max_tokens: int | None
    response_format: Mapping[str, Any] | None

    @classmethod
    def from_body(cls, body: Any) -> ChatRequest:
        if not isinstance(body, Mapping):
            raise InvalidRequest("The request body must be a JSON object.")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("you must provide a model parameter", "model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("'messages' must be a non-empty array", "messages")
        stream_options = body.get("stream_options") or {}
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise InvalidRequest("max_tokens must be a positive integer", "max_tokens")
        response_format = body.get("response_format")
        if response_format is not None and not isinstance(response_format, Mapping):
            raise InvalidRequest("response_format must be an object", "response_format")
        return cls(
            model=model,
            messages=messages,
            stream=bool(body.get("stream")),
            include_usage=bool(
                isinstance(stream_options, Mapping) and stream_options.get("include_usage")
            ),
            max_tokens=max_tokens,
            response_format=response_format,
        )

    @property
    def format_type(self) -> str:
        return str((self.response_format or {}).get("type", "text"))


@dataclass(frozen=True)
class Answer:
    pieces: tuple[str, ...]
    finish_reason: str
    prompt_tokens: int

    @property
    def content(self) -> str:
        return "".join(self.pieces)


def compose_answer(
    request: ChatRequest, seed: int, tokens: int | None, fault: str | None
) -> Answer:
    """The answer for a request; `tokens` overrides the natural length of prose answers."""
    kind = request.format_type
    if kind == "text":
        pieces = text.text_tokens(seed, tokens if tokens is not None else text.answer_length(seed))
    elif kind == "json_object":
        prose = "".join(text.text_tokens(seed, tokens or text.answer_length(seed)))
        pieces = text.split_pieces(_json_text({"text": prose}, {"type": "object"}, fault))
    elif kind == "json_schema":
        schema = _schema_of(request)
        pieces = text.split_pieces(_json_text(_instance(schema, seed), schema, fault))
    else:
        raise InvalidRequest(
            f"Invalid value: '{kind}'. Supported values are: 'json_object', 'json_schema', "
            "and 'text'.",
            "response_format.type",
        )
    finish_reason = "stop"
    if request.max_tokens is not None and len(pieces) > request.max_tokens:
        # Like a real model: cut mid-answer, even if that leaves JSON unfinished.
        pieces = pieces[: request.max_tokens]
        finish_reason = "length"
    return Answer(tuple(pieces), finish_reason, text.prompt_token_count(request.messages))


def _schema_of(request: ChatRequest) -> Any:
    spec = (request.response_format or {}).get("json_schema")
    if not isinstance(spec, Mapping) or "schema" not in spec:
        raise InvalidRequest(
            "Missing required parameter: 'response_format.json_schema.schema'.",
            "response_format.json_schema",
        )
    return spec["schema"]


def _instance(schema: Any, seed: int) -> Any:
    try:
        return text.json_instance(schema, seed)
    except (TypeError, ValueError, AttributeError, KeyError, RecursionError) as error:
        # A malformed or unsatisfiable schema: OpenAI rejects those with a 400 as well.
        raise InvalidRequest(
            f"Invalid schema for response_format: {error}", "response_format"
        ) from error


def _json_text(value: Any, schema: Any, fault: str | None) -> str:
    """The JSON document to answer with, damaged as the content fault asks."""
    if fault == "schema_mismatch":
        return _dumps(text.schema_mismatch_instance(schema))
    document = _dumps(value)
    if fault == "invalid_json":
        return text.broken_json(document)
    return document


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
