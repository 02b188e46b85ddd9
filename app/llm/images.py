"""Image generation through OpenAI's Images API (`images.generate`, with the same official client
and endpoint as chat; any OpenAI-compatible endpoint that serves `/v1/images/generations`).

Images come back as base64 in the response (never a URL the worker would have to fetch). The
call is one request, not a stream: a cancel takes effect when it returns, bounded by
`CONVEYOR_LLM_TIMEOUT`.
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass

import openai

from app.llm.client import CallRecord, ModelClient
from app.llm.errors import ModelError, classify_status_error, classify_transport_error

# The sizes OpenAI's own image models accept; any other model (an OpenAI-compatible server) is
# given the size asked for and answers for itself.
OPENAI_SIZES: dict[str, frozenset[str]] = {
    "gpt-image-1": frozenset({"1024x1024", "1536x1024", "1024x1536"}),
    "dall-e-3": frozenset({"1024x1024", "1792x1024", "1024x1792"}),
    "dall-e-2": frozenset({"256x256", "512x512", "1024x1024"}),
}
# dall-e-3 makes one image a request.
ONE_PER_REQUEST = frozenset({"dall-e-3"})
# gpt-image-1 always answers base64 and refuses the parameter; the DALL-E models need it.
NO_RESPONSE_FORMAT = frozenset({"gpt-image-1"})


@dataclass
class GeneratedImages:
    images: list[bytes]
    records: list[CallRecord]


def size_error(model: str, size: str) -> str | None:
    """Why `model` cannot make images of `size`, or None."""
    allowed = OPENAI_SIZES.get(model.split("/", 1)[-1])
    if allowed is not None and size not in allowed:
        return f"{model} makes images of {', '.join(sorted(allowed))}"
    return None


def generate_openai(
    models: ModelClient, *, model: str, prompt: str, size: str, count: int
) -> GeneratedImages:
    """`count` images, in as few requests as the model allows; every request is recorded
    (`exc.records` when it raises) with its cost from the per-image price table."""
    per_request = 1 if model in ONE_PER_REQUEST else count
    images: list[bytes] = []
    records: list[CallRecord] = []
    try:
        while len(images) < count:
            n = min(per_request, count - len(images))
            record = CallRecord(model=model, provider=models.provider)
            records.append(record)
            images += _one_request(models, record, model=model, prompt=prompt, size=size, n=n)
    except ModelError as exc:
        exc.records = records  # type: ignore[attr-defined]
        raise
    return GeneratedImages(images, records)


def _one_request(
    models: ModelClient, record: CallRecord, *, model: str, prompt: str, size: str, n: int
) -> list[bytes]:
    started = time.perf_counter()
    options = {} if model in NO_RESPONSE_FORMAT else {"response_format": "b64_json"}
    try:
        answer = models.client.images.generate(
            model=model, prompt=prompt, size=size, n=n, **options
        )
        images = [_decode(item.b64_json) for item in answer.data or ()]
        if len(images) != n:
            raise ModelError(
                "model_bad_response", f"asked for {n} images, got {len(images)}", retryable=True
            )
    except openai.APIStatusError as exc:
        refused = classify_status_error(exc)
        _close(record, started, refused.code, refused.message)
        record.refused = True
        raise refused from exc
    except ModelError as exc:
        _close(record, started, exc.code, exc.message)
        raise
    except Exception as exc:
        error = classify_transport_error(exc)
        _close(record, started, error.code, error.message)
        raise error from exc
    usage = getattr(answer, "usage", None)
    if usage is not None:
        record.tokens_in = getattr(usage, "input_tokens", 0) or 0
        record.tokens_out = getattr(usage, "output_tokens", 0) or 0
        record.usage_reported = True
    record.fixed_cost = models.prices.image_cost(model, size, n)
    _close(record, started, "ok", None)
    return images


def _decode(b64: str | None) -> bytes:
    if not b64:
        raise ModelError("model_bad_response", "an image came without b64_json", retryable=True)
    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ModelError(
            "model_bad_response", f"an image's base64 is invalid: {exc}", retryable=True
        ) from exc


def _close(record: CallRecord, started: float, outcome: str, message: str | None) -> None:
    record.latency_ms = (time.perf_counter() - started) * 1000
    record.outcome = outcome
    record.error_message = message
