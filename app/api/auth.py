"""HTTP authentication: a request's bearer key becomes its principal, which must hold the
operation's scope (keys themselves: app/keys/api_keys.py)."""

from __future__ import annotations

from flask import current_app, g, request

from app.api import ratelimits
from app.api.problems import ApiProblem
from app.keys.api_keys import Principal, principal_for_key
from app.runtime import runtime

REALM = 'Bearer realm="conveyor"'


def authenticate(scope: str | None = None) -> Principal:
    """The caller's principal: a 401 without a usable key, a 403 naming `scope` when the key
    lacks it."""
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise _unauthorized("Send an API key as 'Authorization: Bearer <key>'.")
    principal = principal_for_key(runtime().db, key.strip())
    if principal is None:
        raise _unauthorized("The API key is unknown, revoked or expired.")
    if scope is not None and scope not in principal.scopes:
        raise missing_scope(scope)
    g.principal = principal
    ratelimits.check_request(current_app, principal)
    return principal


def current_principal() -> Principal:
    return g.principal


def missing_scope(scope: str) -> ApiProblem:
    return ApiProblem(
        403,
        "insufficient-scope",
        "The API key lacks a scope",
        f"This operation needs an API key with the {scope!r} scope.",
        # RFC 6750's way of naming the scope a bearer token lacks.
        headers={"WWW-Authenticate": f'{REALM}, error="insufficient_scope", scope="{scope}"'},
        extra={"scope": scope},
    )


def revoked_while_waiting() -> ApiProblem:
    """The answer to a request whose key was revoked (or expired) while the request waited (a
    long-poll)."""
    return _unauthorized("The API key was revoked while this request waited, or it expired.")


def _unauthorized(detail: str) -> ApiProblem:
    return ApiProblem(
        401,
        "unauthorized",
        "Authentication required",
        detail,
        headers={"WWW-Authenticate": REALM},
    )
