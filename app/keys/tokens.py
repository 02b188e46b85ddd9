"""Short-lived signed subscription tokens, so that a browser never holds the API key.

A token names its owner and, optionally, the one job or the one batch it may watch; it is
signed with
`CONVEYOR_SECRET_KEY` (itsdangerous, as Flask's own sessions are) and expires after
`CONVEYOR_REALTIME_TOKEN_TTL` seconds. Expiry only matters at connect: an open connection
stays open.

A token is bound to the API key that minted it (it carries the key's id): it is refused once
that key is revoked, deleted or expired, and a connection it opened is closed then
(app/keys/watch.py). It never grants more than its key: it carries the key's `jobs:read`
(reading events is all a token does), and a key without it mints none (the API refuses).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from app.keys.api_keys import JOBS_READ, Principal, key_is_active

if TYPE_CHECKING:
    from app.config import Settings
    from app.db import Database

SALT = "conveyor.realtime"
# What a token may be used for: subscribing to events.
TOKEN_SCOPES = frozenset({JOBS_READ})


class TokenError(Exception):
    """The token is malformed, forged, expired, its key is revoked, or this server cannot check
    tokens."""


@dataclass(frozen=True)
class TokenClaims:
    principal: Principal
    job_id: uuid.UUID | None
    batch_id: uuid.UUID | None = None


def _serializer(settings: Settings) -> URLSafeTimedSerializer:
    secret = settings.secret_key
    if not secret:
        raise TokenError("subscription tokens need CONVEYOR_SECRET_KEY on the server")
    return URLSafeTimedSerializer(secret, salt=SALT)


def mint_token(
    settings: Settings,
    principal: Principal,
    job_id: uuid.UUID | None = None,
    batch_id: uuid.UUID | None = None,
) -> str:
    claims = {
        "owner": principal.owner,
        "scopes": sorted(principal.scopes & TOKEN_SCOPES),
        "key": str(principal.key_id),
        "job": str(job_id) if job_id else None,
    }
    if batch_id is not None:
        # Only when set: a token without it reads as before, in servers old and new.
        claims["batch"] = str(batch_id)
    return _serializer(settings).dumps(claims)


def token_lifetime(settings: Settings, principal: Principal) -> int:
    """Seconds a token minted now is good for: the configured TTL, or less when its key
    expires sooner (a token never outlives its key)."""
    ttl = settings.realtime_token_ttl
    if principal.expires_at is None:
        return ttl
    left = (principal.expires_at - datetime.now(UTC)).total_seconds()
    return max(0, min(ttl, int(left)))


def read_token(settings: Settings, db: Database, token: str) -> TokenClaims:
    try:
        claims = _serializer(settings).loads(token, max_age=settings.realtime_token_ttl)
        # A token of the release before scopes has none: its key read jobs (every key did).
        scopes = frozenset(claims.get("scopes", [JOBS_READ])) & TOKEN_SCOPES
        principal = Principal(claims["owner"], scopes, uuid.UUID(claims["key"]))
        job = uuid.UUID(claims["job"]) if claims.get("job") else None
        batch = uuid.UUID(claims["batch"]) if claims.get("batch") else None
    except SignatureExpired:
        raise TokenError("the token has expired") from None
    except (BadSignature, KeyError, TypeError, ValueError):
        raise TokenError("the token is not valid") from None
    if not key_is_active(db, principal.key_id):
        raise TokenError("the API key that minted the token has been revoked or has expired")
    return TokenClaims(principal, job, batch)
