"""Bearer API keys, stored as SHA-256 hashes (keys are 256-bit random, so a slow hash adds
nothing). A validated key is cached for a few seconds per process so that the hot path of
`POST /jobs` does not pay a query for it; revocation takes effect within that time, for what a
key opened before it too (Socket.IO connections, event streams, long-polls:
app/keys/watch.py)."""

from __future__ import annotations

import hashlib
import secrets
import threading
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cachetools import TTLCache
from sqlalchemy import func, insert, select, update

from app.models import ApiKey

if TYPE_CHECKING:
    from app.db import Database

KEY_PREFIX = "cvk_"
CACHE_SECONDS = 10
ROLES = ("user", "admin")

_cache: TTLCache[str, Principal] = TTLCache(maxsize=10_000, ttl=CACHE_SECONDS)
# Key ids known to be active, for the subscription tokens that name their key by id.
_active: TTLCache[uuid.UUID, bool] = TTLCache(maxsize=10_000, ttl=CACHE_SECONDS)
_cache_lock = threading.Lock()


@dataclass(frozen=True)
class Principal:
    owner: str
    role: str
    key_id: uuid.UUID


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(db: Database, owner: str, name: str = "default", role: str = "user") -> str:
    """Stores a new key and returns it; only its hash is kept, so this is the one chance to
    see it."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with db.transaction() as session:
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


def revoke_api_key(db: Database, prefix: str) -> int:
    with db.transaction() as session:
        result = session.execute(
            update(ApiKey)
            .where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
            .values(revoked_at=func.now())
        )
    with _cache_lock:
        _cache.clear()
        _active.clear()
    return result.rowcount


def principal_for_key(db: Database, key: str) -> Principal | None:
    """The owner of a valid key (cached for CACHE_SECONDS), or None."""
    digest = hash_key(key)
    with _cache_lock:
        principal = _cache.get(digest)
    if principal is None:
        principal = _load(db, digest)
        if principal is None:
            return None
        with _cache_lock:
            _cache[digest] = principal
    return principal


def _load(db: Database, digest: str) -> Principal | None:
    with db.transaction() as session:
        row = session.execute(
            update(ApiKey)
            .where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
            .values(last_used_at=func.now())
            .returning(ApiKey.owner, ApiKey.role, ApiKey.id)
        ).one_or_none()
    if row is None:
        return None
    with _cache_lock:
        # Seen active just now: a subscription token it mints is good for the same window.
        _active[row.id] = True
    return Principal(row.owner, row.role, row.id)


def key_is_active(db: Database, key_id: uuid.UUID) -> bool:
    """Whether the key exists and is not revoked (an answer cached for CACHE_SECONDS)."""
    with _cache_lock:
        if _active.get(key_id):
            return True
    with db.transaction() as session:
        active = session.scalar(
            select(ApiKey.id).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        )
    if active is None:
        return False
    with _cache_lock:
        _active[key_id] = True
    return True


def revoked_among(db: Database, key_ids: Collection[uuid.UUID]) -> set[uuid.UUID]:
    """Those of `key_ids` that are revoked or deleted, in one query and never from the cache:
    for checks that must see a revocation made by another process.

    This process's cache forgets the ones found at once, so that a client cut off because of
    them cannot reconnect with the key for the rest of the cache's window."""
    if not key_ids:
        return set()
    with db.transaction() as session:
        active = set(
            session.scalars(
                select(ApiKey.id).where(ApiKey.id.in_(key_ids), ApiKey.revoked_at.is_(None))
            )
        )
    revoked = set(key_ids) - active
    if revoked:
        _forget(revoked)
    return revoked


def _forget(key_ids: set[uuid.UUID]) -> None:
    with _cache_lock:
        for digest in list(_cache.keys()):
            principal = _cache.get(digest)  # None once expired
            if principal is not None and principal.key_id in key_ids:
                del _cache[digest]
        for key_id in key_ids:
            _active.pop(key_id, None)
