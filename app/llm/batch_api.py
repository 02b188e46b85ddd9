"""The provider's Batch API through the `openai` client's `files` and `batches` resources, on
the endpoint and key of the chat calls, and the reading of its result files.

Every call raises ModelError (classified as a chat call's, app/llm/errors.py) on failure.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import openai

from app.llm.client import CallRecord, ModelClient, reported_cost
from app.llm.errors import (
    ModelError,
    classify_status_error,
    classify_transport_error,
    error_for_status,
    is_content_policy_code,
)

logger = logging.getLogger(__name__)

CHAT_ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOW = "24h"
# The batch's metadata key that carries our id: how a submission cut short is found again.
METADATA_KEY = "conveyor_batch_id"
# A recovery lists the provider's batches newest first, at most this many pages of 100, back
# to a little before our row was made: the provider's clock is not ours.
MAX_LIST_PAGES = 20
CLOCK_SLACK_SECONDS = 600
ENDED = frozenset({"completed", "failed", "expired", "cancelled"})


@dataclass(frozen=True)
class RemoteBatch:
    """A provider batch as its last read said."""

    id: str
    status: str
    total: int
    completed: int
    failed: int
    created_at: int
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: str | None = None  # what a `failed` batch's validation said
    ours: str | None = None  # our id, from its metadata

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    @classmethod
    def of(cls, batch: Any) -> RemoteBatch:
        counts = batch.request_counts
        errors = None
        if batch.errors is not None and batch.errors.data:
            errors = "; ".join(
                f"{error.code or 'error'}: {error.message}" for error in batch.errors.data[:5]
            )
        return cls(
            id=batch.id,
            status=batch.status,
            total=counts.total if counts is not None else 0,
            completed=counts.completed if counts is not None else 0,
            failed=counts.failed if counts is not None else 0,
            created_at=batch.created_at,
            output_file_id=batch.output_file_id,
            error_file_id=batch.error_file_id,
            errors=errors,
            ours=(batch.metadata or {}).get(METADATA_KEY),
        )


@contextmanager
def _provider_call() -> Iterator[None]:
    try:
        yield
    except openai.APIStatusError as exc:
        raise classify_status_error(exc) from exc
    except ModelError:
        raise
    except Exception as exc:
        raise classify_transport_error(exc) from exc


class BatchAPI:
    def __init__(self, models: ModelClient) -> None:
        self._models = models

    @property
    def _client(self) -> openai.OpenAI:
        return self._models.client

    def upload(self, name: str, requests: list[dict[str, Any]]) -> str:
        """The JSONL input file of `requests` ({custom_id, method, url, body}); its id."""
        data = b"".join(
            json.dumps(line, separators=(",", ":")).encode() + b"\n" for line in requests
        )
        with _provider_call():
            return self._client.files.create(file=(name, io.BytesIO(data)), purpose="batch").id

    def create(self, input_file_id: str, ours: str) -> RemoteBatch:
        with _provider_call():
            batch = self._client.batches.create(
                input_file_id=input_file_id,
                endpoint=CHAT_ENDPOINT,
                completion_window=COMPLETION_WINDOW,
                metadata={METADATA_KEY: ours},
            )
        return RemoteBatch.of(batch)

    def retrieve(self, batch_id: str) -> RemoteBatch:
        with _provider_call():
            return RemoteBatch.of(self._client.batches.retrieve(batch_id))

    def cancel(self, batch_id: str) -> RemoteBatch:
        with _provider_call():
            return RemoteBatch.of(self._client.batches.cancel(batch_id))

    def find(self, ours: str, since: datetime) -> RemoteBatch | None:
        """The provider's batch whose metadata carries our id `ours`, among those created
        since `since` (the list is newest first, so the scan stops at older ones)."""
        oldest = since.timestamp() - CLOCK_SLACK_SECONDS
        with _provider_call():
            page = self._client.batches.list(limit=100)
            for _ in range(MAX_LIST_PAGES):
                for batch in page.data:
                    remote = RemoteBatch.of(batch)
                    if remote.ours == ours:
                        return remote
                    if remote.created_at < oldest:
                        return None
                if not page.has_next_page():
                    return None
                page = page.get_next_page()
        logger.warning(
            "batch %s not found in %d pages of the provider's list", ours, MAX_LIST_PAGES
        )
        return None

    def lines(self, file_id: str | None) -> dict[str, dict[str, Any]]:
        """A result file's lines by custom_id ({} for no file)."""
        if file_id is None:
            return {}
        with _provider_call():
            text = self._client.files.content(file_id).text
        found: dict[str, dict[str, Any]] = {}
        for raw in text.splitlines():
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                logger.warning("a line of batch result file %s is not JSON", file_id)
                continue
            if isinstance(line, dict) and isinstance(line.get("custom_id"), str):
                found[line["custom_id"]] = line
        return found


@dataclass(frozen=True)
class LineResult:
    """One request's result: its answer, or the error it failed with; and its call, when the
    provider ran it (and billed it)."""

    text: str | None
    finish_reason: str | None
    error: ModelError | None
    record: CallRecord | None


def read_line(
    line: dict[str, Any], model: str, provider: str, started_at: datetime, latency_ms: float
) -> LineResult:
    """A result line ({custom_id, response: {status_code, body}, error}) read into a
    LineResult; its call's record is priced by the caller."""
    error = line.get("error")
    response = line.get("response") or {}
    if error:
        code = str(error.get("code") or "batch_request_failed")
        message = str(error.get("message") or "the provider did not run the request")
        return LineResult(None, None, ModelError(_batch_code(code), message, retryable=False), None)
    status = response.get("status_code")
    body = response.get("body") or {}
    if status != 200:
        detail = (body.get("error") or {}) if isinstance(body, dict) else {}
        message = f"HTTP {status} from the model: {detail.get('message') or 'no message'}"
        if status in (400, 422) and is_content_policy_code(detail.get("code")):
            failure = ModelError("content_policy", message, retryable=False)
        else:
            failure = error_for_status(int(status or 500), message)
        return LineResult(None, None, failure, None)
    usage = body.get("usage") or {}
    record = CallRecord(
        # Recorded and priced under the model the job asked for, as a chat call is.
        model=model,
        provider=provider,
        started_at=started_at,
        tokens_in=int(usage.get("prompt_tokens") or 0),
        tokens_out=int(usage.get("completion_tokens") or 0),
        usage_reported=bool(usage),
        reported_cost=reported_cost(usage),
    )
    record.latency_ms = latency_ms
    choices = body.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    text = str((choice.get("message") or {}).get("content") or "")
    finish_reason = choice.get("finish_reason")
    if finish_reason == "content_filter":
        record.outcome = "content_policy"
        failure = ModelError(
            "content_policy", "the model's content filter stopped the answer", retryable=False
        )
        return LineResult(None, finish_reason, failure, record)
    return LineResult(text, finish_reason, None, record)


def _batch_code(provider_code: str) -> str:
    """The job's error code for a request the provider did not run."""
    return {"batch_expired": "batch_expired", "batch_cancelled": "batch_canceled"}.get(
        provider_code, "batch_request_failed"
    )


def batch_price(record: CallRecord, models: ModelClient, factor: Decimal) -> None:
    """Prices a batch call at the batch price: the price table's times `factor`."""
    full = models.prices.cost(record.model, record.tokens_in, record.tokens_out)
    record.fixed_cost = full * factor
