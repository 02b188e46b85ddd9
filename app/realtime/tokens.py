"""Short-lived signed subscription tokens, so that a browser never holds the API key.

A token names its owner and, optionally, the one job it may watch; it is signed with
`CONVEYOR_SECRET_KEY` (itsdangerous, as Flask's own sessions are) and expires after
`CONVEYOR_REALTIME_TOKEN_TTL` seconds. Expiry only matters at connect: an open connection
stays open.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from app.api.auth import Principal
from app.runtime import runtime

SALT = "conveyor.realtime"


class TokenError(Exception):
    """The token is malformed, forged, expired, or this server cannot check tokens."""


@dataclass(frozen=True)
class TokenClaims:
    principal: Principal
    job_id: uuid.UUID | None


def _serializer() -> URLSafeTimedSerializer:
    secret = runtime().settings.secret_key
    if not secret:
        raise TokenError("subscription tokens need CONVEYOR_SECRET_KEY on the server")
    return URLSafeTimedSerializer(secret, salt=SALT)


def mint_token(principal: Principal, job_id: uuid.UUID | None = None) -> str:
    return _serializer().dumps(
        {
            "owner": principal.owner,
            "role": principal.role,
            "key": str(principal.key_id),
            "job": str(job_id) if job_id else None,
        }
    )


def read_token(token: str) -> TokenClaims:
    try:
        claims = _serializer().loads(token, max_age=runtime().settings.realtime_token_ttl)
        principal = Principal(claims["owner"], claims["role"], uuid.UUID(claims["key"]))
        job = uuid.UUID(claims["job"]) if claims.get("job") else None
    except SignatureExpired:
        raise TokenError("the token has expired") from None
    except (BadSignature, KeyError, TypeError, ValueError):
        raise TokenError("the token is not valid") from None
    return TokenClaims(principal, job)
