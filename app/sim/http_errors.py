"""OpenAI-shaped error responses: real request errors and injected HTTP faults."""

from __future__ import annotations

import math

from aiohttp import web

from app.sim.directives import Directives
from app.sim.faults import HTTP_FAULTS, error_body
from app.sim.state import SimState


def error_response(
    status: int,
    message: str,
    error_type: str,
    code: str | None,
    headers: dict[str, str] | None = None,
    param: str | None = None,
) -> web.Response:
    return web.json_response(
        error_body(message, error_type, code, param), status=status, headers=headers
    )


def invalid_request(
    message: str, param: str | None = None, code: str | None = None
) -> web.Response:
    return error_response(400, message, "invalid_request_error", code, param=param)


def fault_response(fault: str, knobs: Directives, state: SimState) -> web.Response:
    """The error an HTTP fault (one of HTTP_FAULTS) answers with; a 429 says when to retry."""
    status, error_type, code, message = HTTP_FAULTS[fault]
    headers = None
    if status == 429:
        headers = {"Retry-After": f"{state.retry_after(knobs):g}"}
    return error_response(status, message, error_type, code, headers)


def rate_limited(retry_after: float) -> web.Response:
    """The run's rate limit (SimConfig.rate_limits) is used up: a 429 as OpenAI's."""
    status, error_type, code, message = HTTP_FAULTS["429"]
    seconds = max(1, math.ceil(retry_after))
    return error_response(status, message, error_type, code, {"Retry-After": str(seconds)})
