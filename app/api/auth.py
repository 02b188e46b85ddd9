"""HTTP authentication: a request's bearer key becomes its principal (keys themselves:
app/keys/api_keys.py)."""

from __future__ import annotations

from flask import current_app, g, request

from app.api import ratelimits
from app.api.problems import ApiProblem
from app.keys.api_keys import Principal, principal_for_key
from app.runtime import runtime


def authenticate() -> Principal:
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise _unauthorized("Send an API key as 'Authorization: Bearer <key>'.")
    principal = principal_for_key(runtime().db, key.strip())
    if principal is None:
        raise _unauthorized("The API key is unknown or revoked.")
    g.principal = principal
    ratelimits.check_request(current_app, principal)
    return principal


def current_principal() -> Principal:
    return g.principal


def revoked_while_waiting() -> ApiProblem:
    """The answer to a request whose key was revoked while the request waited (a long-poll)."""
    return _unauthorized("The API key was revoked while this request waited.")


def _unauthorized(detail: str) -> ApiProblem:
    return ApiProblem(
        401,
        "unauthorized",
        "Authentication required",
        detail,
        headers={"WWW-Authenticate": 'Bearer realm="conveyor"'},
    )
