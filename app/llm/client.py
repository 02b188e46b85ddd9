"""The model client: the official `openai` client against any OpenAI-compatible endpoint.

Created lazily (importing or starting a process never touches the network), with an explicit
timeout and `max_retries=0`, because Conveyor owns the retry budget: a retry is a new attempt
of the job, recorded and visible, not a hidden loop inside the client.

Streams are read as raw SSE lines and decoded with `json.loads`: building the client's typed
chunk objects costs about five times more CPU per chunk, and on two cores CPU per streamed
job, not the number of slots, is what caps a worker (docs/performance.md).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import openai

from app.config import Settings
from app.llm.cache import ResponseCache
from app.llm.errors import ModelError, classify_status_error, classify_transport_error
from app.llm.limits import CapacityWait, ProviderLimits, Ticket
from app.llm.pricing import PriceTable

if TYPE_CHECKING:
    import redis

    from app.llm.comfyui import ComfyUIClient

logger = logging.getLogger(__name__)

STEP_HEADER = "X-Conveyor-Step"

DEFAULT_PROVIDER = "api.openai.com"


@dataclass
class CallRecord:
    """What one model call cost and how it ended; becomes a `model_calls` row."""

    model: str
    provider: str
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    tokens_in: int = 0
    tokens_out: int = 0
    usage_reported: bool = False
    # What the response said the call cost (OpenRouter's `usage.cost`), when it said so.
    reported_cost: Decimal | None = None
    # The kind's step and the role the model was chosen for (None outside steps).
    step: str | None = None
    role: str | None = None
    # The provider answered with an error status: the request was refused, nothing was billed.
    refused: bool = False
    # A call priced otherwise than by tokens (an image by its size, ComfyUI by GPU time).
    fixed_cost: Decimal | None = None
    ttft_ms: float | None = None
    latency_ms: float = 0.0
    outcome: str = "ok"
    error_message: str | None = None

    def as_row(self, prices: PriceTable) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "model": self.model,
            "step": self.step,
            "role": self.role,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "cost_usd": self.fixed_cost
            if self.fixed_cost is not None
            else prices.cost(self.model, self.tokens_in, self.tokens_out),
            "reported_cost_usd": self.reported_cost,
            "latency_ms": round(self.latency_ms, 2),
            "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 2),
            "outcome": self.outcome,
            "error_message": self.error_message,
            "started_at": self.started_at,
        }


@dataclass
class Completion:
    text: str
    finish_reason: str | None
    record: CallRecord


class Interrupted(Exception):
    """The caller asked the stream to stop (cancellation, lost lease)."""


class ModelClient:
    def __init__(self, settings: Settings, redis_client: redis.Redis | None = None) -> None:
        self._settings = settings
        self._client: openai.OpenAI | None = None
        self._comfyui: ComfyUIClient | None = None
        self._lock = threading.Lock()
        self.prices = PriceTable.load(settings.pricing_file)
        self.provider = (
            urlsplit(settings.openai_base_url).netloc
            if settings.openai_base_url
            else DEFAULT_PROVIDER
        )
        # None unless CONVEYOR_PROVIDER_LIMITS names an endpoint: no Redis work per call then.
        self.limits = ProviderLimits.of(settings, redis_client, self.provider)
        # Answers of calls that asked for the cache (input.cache); None when it is off.
        self.cache = (
            ResponseCache(
                redis_client, settings.response_cache_ttl, settings.response_cache_max_bytes
            )
            if redis_client is not None and settings.response_cache_ttl > 0
            else None
        )

    @property
    def comfyui(self) -> ComfyUIClient:
        """ComfyUI's client (CONVEYOR_COMFYUI_URL), made at first use and shared."""
        if self._comfyui is None:
            from app.llm.comfyui import ComfyUIClient

            if not self._settings.comfyui_url:
                raise ModelError(
                    "model_not_configured",
                    "CONVEYOR_COMFYUI_URL is not set: no ComfyUI to send the workflow to",
                    retryable=False,
                )
            with self._lock:
                if self._comfyui is None:
                    self._comfyui = ComfyUIClient(
                        self._settings.comfyui_url,
                        timeout=self._settings.llm_timeout,
                        connect_timeout=self._settings.llm_connect_timeout,
                    )
        return self._comfyui

    @property
    def client(self) -> openai.OpenAI:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._create()
        return self._client

    def _create(self) -> openai.OpenAI:
        if not self._settings.openai_api_key:
            raise ModelError("model_auth_failed", "OPENAI_API_KEY is not set", retryable=False)
        return openai.OpenAI(
            api_key=self._settings.openai_api_key,
            base_url=self._settings.openai_base_url,
            max_retries=0,
            timeout=openai.Timeout(
                self._settings.llm_timeout, connect=self._settings.llm_connect_timeout
            ),
        )

    def stream_chat(
        self,
        *,
        model: str,
        messages: list[dict[str, Any]],
        interrupted: Callable[[], bool],
        max_tokens: int | None = None,
        ticket: Ticket | None = None,
        **options: Any,
    ) -> Completion:
        """One streamed chat completion, its `record` always filled in (`exc.record` if raised).

        Under the endpoint's provider limits (if it has any), the call is admitted first (or
        comes with the `ticket` admitted for it before the job was claimed) and settled after:
        CapacityWait when it must wait longer than a slot may, or when the provider answered
        429 (the endpoint is then paused for the whole pool)."""
        limits = self.limits
        if limits is None or limits.governs(model) is None:
            return self._stream_chat(
                model=model,
                messages=messages,
                interrupted=interrupted,
                max_tokens=max_tokens,
                **options,
            )
        if ticket is None:
            ticket = limits.acquire(model, limits.estimate(messages, max_tokens), interrupted)
        else:
            ticket = limits.stamp(ticket)
        try:
            completion = self._stream_chat(
                model=model,
                messages=messages,
                interrupted=interrupted,
                max_tokens=max_tokens,
                **options,
            )
        except (ModelError, Interrupted) as exc:
            record: CallRecord = exc.record  # type: ignore[attr-defined]
            paused = limits.settle(ticket, _tokens_of(record), exc)
            if paused is not None:
                wait = CapacityWait(paused, exc.message if isinstance(exc, ModelError) else None)
                wait.record = record  # type: ignore[attr-defined]
                raise wait from exc
            raise
        limits.settle(ticket, _tokens_of(completion.record), None)
        return completion

    def _stream_chat(
        self,
        *,
        model: str,
        messages: list[dict[str, Any]],
        on_delta: Callable[[str], None],
        interrupted: Callable[[], bool],
        register_closer: Callable[[Callable[[], None] | None], None],
        response_format: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
        step: str | None = None,
        role: str | None = None,
    ) -> Completion:
        record = CallRecord(model=model, provider=self.provider, step=step, role=role)
        started = time.perf_counter()
        request = _request(model, messages, response_format, max_tokens, temperature, seed, step)
        parts: list[str] = []
        try:
            with self._open_stream(request, register_closer) as lines:
                # Closed at `[DONE]`, one empty chunk before the body's end, so httpx drops the
                # connection rather than pooling it. Kept that way on purpose: with hundreds of
                # streams at once, a pool of as many kept connections cost the worker 2 ms of CPU
                # a job more (httpcore walks its pool at every request; docs/performance.md).
                finish_reason = _consume(lines, record, parts, on_delta, interrupted, started)
            if interrupted():
                raise Interrupted
            if finish_reason is None:
                raise ModelError(
                    "model_stream_dropped", "the stream ended without a finish", retryable=True
                )
            if finish_reason == "content_filter":
                raise ModelError(
                    "content_policy",
                    "the model's content filter stopped the answer",
                    retryable=False,
                )
        except (ModelError, Interrupted) as exc:
            _close_record(record, started, parts, messages, exc)
            exc.record = record  # type: ignore[attr-defined]
            raise
        except Exception as exc:
            if interrupted():
                # Closing the response from another thread is how a blocked read is stopped.
                error: Exception = Interrupted()
            else:
                error = classify_transport_error(exc)
            _close_record(record, started, parts, messages, error)
            error.record = record  # type: ignore[attr-defined]
            raise error from exc
        finally:
            register_closer(None)
        _close_record(record, started, parts, messages, None)
        return Completion("".join(parts), finish_reason, record)

    @contextmanager
    def _open_stream(
        self, request: dict[str, Any], register_closer: Callable[[Callable[[], None] | None], None]
    ) -> Iterator[Iterator[str]]:
        """The streamed response, unread, through the client's `post` (its auth, base URL,
        timeouts, headers and status errors), not `chat.completions.create`: `create` first
        runs the request through the client's typed-parameter transform, 0.36 ms of CPU per call
        for a plain JSON body it leaves as it is, a tenth of a short job's whole budget
        (docs/performance.md)."""
        body = {name: value for name, value in request.items() if name != "extra_headers"}
        options: dict[str, Any] = {"headers": request.get("extra_headers", {})}
        try:
            response = self.client.post(
                "/chat/completions",
                cast_to=httpx.Response,
                body=body,
                options=options,  # type: ignore[arg-type]
                stream=True,
            )
        except openai.APIStatusError as exc:
            error = classify_status_error(exc)
            error.refused = True  # type: ignore[attr-defined]
            raise error from exc
        try:
            register_closer(response.close)
            yield response.iter_lines()
        finally:
            response.close()


def _tokens_of(record: CallRecord) -> int | None:
    """The tokens a call used, as its usage reported them; None for a refused call."""
    return None if record.refused else record.tokens_in + record.tokens_out


def _consume(
    lines: Iterator[str],
    record: CallRecord,
    parts: list[str],
    on_delta: Callable[[str], None],
    interrupted: Callable[[], bool],
    started: float,
) -> str | None:
    """Reads the stream into `parts` and `record`; returns the finish reason, if one came."""
    finish_reason: str | None = None
    for chunk in _sse_chunks(lines):
        if interrupted():
            raise Interrupted
        if "error" in chunk:
            raise ModelError(
                "model_unavailable", f"error in stream: {chunk['error']}", retryable=True
            )
        if usage := chunk.get("usage"):
            record.tokens_in = int(usage.get("prompt_tokens") or 0)
            record.tokens_out = int(usage.get("completion_tokens") or 0)
            record.usage_reported = True
            record.reported_cost = reported_cost(usage)
        for choice in chunk.get("choices") or ():
            text = (choice.get("delta") or {}).get("content")
            if text:
                if record.ttft_ms is None:
                    record.ttft_ms = (time.perf_counter() - started) * 1000
                parts.append(text)
                on_delta(text)
            finish_reason = choice.get("finish_reason") or finish_reason
    return finish_reason


def reported_cost(usage: dict[str, Any]) -> Decimal | None:
    """OpenRouter (and the simulator) add the call's cost in USD to the usage; OpenAI does not.
    A figure that is not a finite number >= 0 is ignored rather than trusted."""
    cost = usage.get("cost")
    if isinstance(cost, bool) or not isinstance(cost, int | float | str):
        return None
    try:
        amount = Decimal(str(cost))
    except ArithmeticError:
        return None
    return amount if amount.is_finite() and amount >= 0 else None


def _sse_chunks(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise ModelError(
                "model_bad_response", f"malformed chunk from the model: {exc}", retryable=True
            ) from exc
        if not isinstance(chunk, dict):
            raise ModelError(
                "model_bad_response", "a stream chunk was not an object", retryable=True
            )
        yield chunk


def _close_record(
    record: CallRecord,
    started: float,
    parts: list[str],
    messages: list[dict[str, Any]],
    error: BaseException | None,
) -> None:
    record.latency_ms = (time.perf_counter() - started) * 1000
    record.refused = getattr(error, "refused", False)
    if not (record.usage_reported or record.refused):
        # The provider sends usage only at the end of a complete stream. For a call cut short
        # the tokens were still billed: estimate them (about 4 characters a token).
        record.tokens_in = sum(len(str(m.get("content", ""))) for m in messages) // 4 + 1
        record.tokens_out = len(parts)
    if isinstance(error, Interrupted):
        record.outcome = "interrupted"
    elif isinstance(error, ModelError):
        record.outcome = error.code
        record.error_message = error.message


def _request(
    model: str,
    messages: list[dict[str, Any]],
    response_format: dict[str, Any] | None,
    max_tokens: int | None,
    temperature: float | None,
    seed: int | None,
    step: str | None,
) -> dict[str, Any]:
    """The arguments of one streamed chat completion; options left unset are not sent."""
    request: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "response_format": response_format,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": seed,
    }
    request = {name: value for name, value in request.items() if value is not None}
    if step is not None:
        # Which step of a multi-step job this call is for: logs and proxies see it, and the
        # simulator's step-scoped directives use it. Providers ignore unknown headers.
        request["extra_headers"] = {STEP_HEADER: step}
    return request
