"""Pure tests of the model layer: retry classification, Retry-After, pricing."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import httpx2
import openai
import pytest

from app.llm.errors import classify_status_error, classify_transport_error, parse_retry_after
from app.llm.pricing import PriceTable, PricingError


def status_error(
    status: int, headers: dict[str, str] | None = None, body: dict | None = None
) -> openai.APIStatusError:
    request = httpx2.Request("POST", "http://model/v1/chat/completions")
    response = httpx2.Response(
        status, headers=headers or {}, request=request, json=body or {"error": {"message": "nope"}}
    )
    client = openai.OpenAI(api_key="x", base_url="http://model/v1", max_retries=0)
    return client._make_status_error_from_response(response)


@pytest.mark.parametrize(
    ("status", "code", "retryable"),
    [
        (429, "model_rate_limited", True),
        (500, "model_unavailable", True),
        (502, "model_unavailable", True),
        (503, "model_unavailable", True),
        (408, "model_unavailable", True),
        (409, "model_unavailable", True),
        (400, "model_bad_request", False),
        (422, "model_bad_request", False),
        (401, "model_auth_failed", False),
        (403, "model_permission_denied", False),
        (404, "model_not_found", False),
        (418, "model_rejected", False),
    ],
)
def test_status_classification(status: int, code: str, retryable: bool) -> None:
    error = classify_status_error(status_error(status))
    assert (error.code, error.retryable) == (code, retryable)
    assert str(status) in error.message


def test_content_policy_is_permanent_with_its_own_code() -> None:
    body = {"error": {"message": "flagged", "code": "content_policy_violation"}}
    error = classify_status_error(status_error(400, body=body))
    assert error.code == "content_policy" and not error.retryable


def test_rate_limit_carries_retry_after() -> None:
    error = classify_status_error(status_error(429, {"retry-after": "7"}))
    assert error.retry_after == 7.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "3"}, 3.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after": "soon"}, None),
        ({}, None),
        ({"retry-after": "-4"}, 0.0),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(httpx2.Headers(headers)) == expected


def test_retry_after_as_an_http_date_is_seconds_from_now() -> None:
    value = parse_retry_after(httpx2.Headers({"retry-after": "Wed, 21 Oct 2099 07:28:00 GMT"}))
    assert value is not None and value > 1_000_000


def test_transport_errors_are_retryable() -> None:
    request = httpx2.Request("POST", "http://model")
    assert classify_transport_error(openai.APITimeoutError(request)).code == "model_timeout"
    assert classify_transport_error(httpx2.ReadTimeout("slow")).code == "model_timeout"
    dropped = classify_transport_error(httpx2.RemoteProtocolError("incomplete chunked read"))
    assert dropped.code == "model_stream_dropped" and dropped.retryable
    refused = classify_transport_error(openai.APIConnectionError(request=request))
    assert refused.code == "model_connection_error" and refused.retryable


def test_pricing_defaults_and_cost() -> None:
    prices = PriceTable.load(None)
    assert prices.cost("gpt-4o-mini", 1_000_000, 1_000_000) == Decimal("0.75")
    assert prices.cost("gpt-4o", 1000, 500) == Decimal("0.0075")


def test_unknown_model_costs_zero(caplog: pytest.LogCaptureFixture) -> None:
    prices = PriceTable.load(None)
    assert prices.cost("mystery-model", 10, 10) == 0
    assert prices.cost("mystery-model", 10, 10) == 0
    assert sum("mystery-model" in r.message for r in caplog.records) == 1, "logged once"


def test_price_file_overrides_and_adds(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(
        json.dumps(
            {"gpt-4o-mini": {"input": 1, "output": 2}, "local-llama": {"input": 0, "output": 0.1}}
        )
    )
    prices = PriceTable.load(path)
    assert prices.cost("gpt-4o-mini", 1_000_000, 0) == Decimal(1)
    assert prices.cost("local-llama", 0, 1_000_000) == Decimal("0.1")


@pytest.mark.parametrize(
    "content", ["not json", "[]", '{"m": {"input": 1}}', '{"m": {"input": "x", "output": 1}}']
)
def test_bad_price_files_fail_clearly(tmp_path: Path, content: str) -> None:
    path = tmp_path / "prices.json"
    path.write_text(content)
    with pytest.raises(PricingError, match=r"prices\.json"):
        PriceTable.load(path)
