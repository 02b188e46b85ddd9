"""Bearer API keys, stored as SHA-256 hashes (keys are 256-bit random, so a slow hash adds
nothing). A validated key is cached for a few seconds per process so that the hot path of
`POST /jobs` does not pay a query for it; revocation takes effect within that time."""

from __future__ import annotations

import hashlib
import secrets
import threading
import uuid
from dataclasses import dataclass

from cachetools import TTLCache
from flask import g, request
from sqlalchemy import func, insert, update

from app.api.problems import ApiProblem
from app.models import ApiKey
from app.runtime import runtime

KEY_PREFIX = "cvk_"
CACHE_SECONDS = 10
ROLES = ("user", "admin")

_cache: TTLCache[str, Principal] = TTLCache(maxsize=10_000, ttl=CACHE_SECONDS)
_cache_lock = threading.Lock()


@dataclass(frozen=True)
class Principal:
    owner: str
    role: str
    key_id: uuid.UUID


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(owner: str, name: str = "default", role: str = "user") -> str:
    """Stores a new key and returns it; only its hash is kept, so this is the one chance to
    see it."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with runtime().db.transaction() as session:
        session.execute(
            insert(ApiKey).values(
                id=uuid.uuid4(),
                name=name,
                owner=owner,
                role=role,
                prefix=key[:12],
                key_hash=hash_key(key),
            )
        )
    return key


def revoke_api_key(prefix: str) -> int:
    with runtime().db.transaction() as session:
        result = session.execute(
            update(ApiKey)
            .where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
            .values(revoked_at=func.now())
        )
    with _cache_lock:
        _cache.clear()
    return result.rowcount


def authenticate() -> Principal:
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise _unauthorized("Send an API key as 'Authorization: Bearer <key>'.")
    principal = principal_for_key(key.strip())
    if principal is None:
        raise _unauthorized("The API key is unknown or revoked.")
    g.principal = principal
    return principal


def principal_for_key(key: str) -> Principal | None:
    """The owner of a valid key (cached for CACHE_SECONDS), or None."""
    digest = hash_key(key)
    with _cache_lock:
        principal = _cache.get(digest)
    if principal is None:
        principal = _load(digest)
        if principal is None:
            return None
        with _cache_lock:
            _cache[digest] = principal
    return principal


def _load(digest: str) -> Principal | None:
    with runtime().db.transaction() as session:
        row = session.execute(
            update(ApiKey)
            .where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
            .values(last_used_at=func.now())
            .returning(ApiKey.owner, ApiKey.role, ApiKey.id)
        ).one_or_none()
    return None if row is None else Principal(row.owner, row.role, row.id)


def current_principal() -> Principal:
    return g.principal


def _unauthorized(detail: str) -> ApiProblem:
    return ApiProblem(
        401,
        "unauthorized",
        "Authentication required",
        detail,
        headers={"WWW-Authenticate": 'Bearer realm="conveyor"'},
    )
