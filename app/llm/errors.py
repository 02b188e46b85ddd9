"""Retry classification: which model failures are worth another attempt.

| failure                                   | code                    | retried |
|-------------------------------------------|-------------------------|---------|
| HTTP 429 (honours Retry-After)            | model_rate_limited      | yes     |
| HTTP 408, 409, 5xx                        | model_unavailable       | yes     |
| connect error, connection reset           | model_connection_error  | yes     |
| timeout (connect or between two chunks)   | model_timeout           | yes     |
| stream cut before its end                 | model_stream_dropped    | yes     |
| a chunk that is not valid JSON            | model_bad_response      | yes     |
| HTTP 400, 422                             | model_bad_request       | no      |
| HTTP 400 for content policy, or a         | content_policy          | no      |
| `content_filter` finish reason            |                         |         |
| HTTP 401                                  | model_auth_failed       | no      |
| HTTP 403                                  | model_permission_denied | no      |
| HTTP 404 (unknown model)                  | model_not_found         | no      |
| any other HTTP 4xx                        | model_rejected          | no      |

docs/architecture.md repeats this table for operators; keep the two in step.
"""

from __future__ import annotations

import email.utils
import time

import openai

RETRYABLE_STATUS = {408, 409}


class ModelError(Exception):
    def __init__(
        self, code: str, message: str, *, retryable: bool, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after


def classify_status_error(exc: openai.APIStatusError) -> ModelError:
    status = exc.status_code
    message = _provider_message(exc)
    if status in (400, 422) and _is_content_policy(exc):
        return ModelError("content_policy", message, retryable=False)
    return error_for_status(status, message, exc.response.headers)


def error_for_status(status: int, message: str, headers: object = None) -> ModelError:
    """The error an HTTP `status` from the model is, by the table above (a content-policy 400
    is told apart by the caller, who has the body)."""
    if status == 429:
        return ModelError(
            "model_rate_limited",
            message,
            retryable=True,
            retry_after=parse_retry_after(headers),
        )
    if status >= 500 or status in RETRYABLE_STATUS:
        return ModelError(
            "model_unavailable", message, retryable=True, retry_after=parse_retry_after(headers)
        )
    if status in (400, 422):
        return ModelError("model_bad_request", message, retryable=False)
    permanent = {401: "model_auth_failed", 403: "model_permission_denied", 404: "model_not_found"}
    return ModelError(permanent.get(status, "model_rejected"), message, retryable=False)


def classify_transport_error(exc: BaseException) -> ModelError:
    """Errors raised while connecting or while reading a stream (openai's or httpx2's)."""
    name = type(exc).__name__
    if isinstance(exc, openai.APITimeoutError) or "Timeout" in name:
        return ModelError(
            "model_timeout", f"the model did not answer in time ({name})", retryable=True
        )
    if isinstance(exc, openai.APIConnectionError) or "Connect" in name:
        return ModelError(
            "model_connection_error", f"could not reach the model ({exc})", retryable=True
        )
    return ModelError(
        "model_stream_dropped", f"the model's stream broke off ({name}: {exc})", retryable=True
    )


def parse_retry_after(headers: object) -> float | None:
    """Seconds from `retry-after-ms`, `retry-after` as seconds, or `retry-after` as a date."""
    get = getattr(headers, "get", None)
    if get is None:
        return None
    if (millis := get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        return max(0.0, email.utils.mktime_tz(parsed) - time.time())


def _provider_message(exc: openai.APIStatusError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    detail = body.get("message") or body.get("error", {}).get("message") if body else None
    return f"HTTP {exc.status_code} from the model: {detail or exc.message}"


def _is_content_policy(exc: openai.APIStatusError) -> bool:
    return is_content_policy_code(getattr(exc, "code", None))


def is_content_policy_code(code: object) -> bool:
    return "content_policy" in str(code or "") or "content_filter" in str(code or "")
