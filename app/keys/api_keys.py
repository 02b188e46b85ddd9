"""Bearer API keys, stored as SHA-256 hashes (keys are 256-bit random, so a slow hash adds
nothing). A validated key is cached for a few seconds per process so that the hot path of
`POST /jobs` does not pay a query for it; revocation takes effect within that time, for what a
key opened before it too (Socket.IO connections, event streams, long-polls:
app/keys/watch.py). Expiry needs no query: the cached key carries its expiry time.

A key holds scopes: `jobs:read` (every read of the owner's jobs, batches and canvases, and
their events), `jobs:write` (creating, canceling, retrying, deleting them) and `admin` (the
keys themselves, and every owner's jobs under /api/v1/admin). They are set when the key is
created and never change."""

from __future__ import annotations

import hashlib
import secrets
import threading
import uuid
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from cachetools import TTLCache
from sqlalchemy import ColumnElement, func, or_, select, text, update
from sqlalchemy.orm import Session

from app.db import newest_page
from app.models import ApiKey

if TYPE_CHECKING:
    from app.db import Database

KEY_PREFIX = "cvk_"
CACHE_SECONDS = 10
JOBS_READ, JOBS_WRITE, ADMIN = "jobs:read", "jobs:write", "admin"
SCOPES = (JOBS_READ, JOBS_WRITE, ADMIN)
DEFAULT_SCOPES = (JOBS_READ, JOBS_WRITE)
# `last_used_at` is written at most this often per key: it answers "is this key still in
# use?", and a write per request (or per cache miss of every process) would buy no better
# answer.
LAST_USED_RESOLUTION_SECONDS = 60
KEY_STATES = ("active", "expired", "revoked")
_NEVER = datetime.max.replace(tzinfo=UTC)

_cache: TTLCache[str, Principal] = TTLCache(maxsize=10_000, ttl=CACHE_SECONDS)
# Key ids known to be active, with their expiry, for the subscription tokens that name their
# key by id.
_active: TTLCache[uuid.UUID, datetime] = TTLCache(maxsize=10_000, ttl=CACHE_SECONDS)
_cache_lock = threading.Lock()


@dataclass(frozen=True)
class Principal:
    owner: str
    scopes: frozenset[str]
    key_id: uuid.UUID
    expires_at: datetime | None = None

    def expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= datetime.now(UTC)


@dataclass(frozen=True)
class IssuedKey:
    """A key just created: its row and, this once, its secret."""

    row: ApiKey
    secret: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def ordered_scopes(scopes: Iterable[str]) -> list[str]:
    """The scopes once each, in SCOPES' order; ValueError for one that does not exist."""
    wanted = set(scopes)
    if unknown := wanted - set(SCOPES):
        raise ValueError(f"unknown scopes {sorted(unknown)}; scopes: {', '.join(SCOPES)}")
    if not wanted:
        raise ValueError("a key needs at least one scope")
    return [scope for scope in SCOPES if scope in wanted]


def issue_api_key(
    db: Database,
    owner: str,
    name: str = "default",
    scopes: Iterable[str] = DEFAULT_SCOPES,
    expires_at: datetime | None = None,
    created_by: uuid.UUID | None = None,
) -> IssuedKey:
    """Stores a new key; only its hash is kept, so this is the one chance to see it."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id=uuid.uuid4(),
        name=name,
        owner=owner,
        scopes=ordered_scopes(scopes),
        prefix=key[:12],
        key_hash=hash_key(key),
        expires_at=expires_at,
        created_by=created_by,
    )
    with db.transaction() as session:
        session.add(row)
        session.flush()
        session.refresh(row)
        session.expunge(row)
    return IssuedKey(row, key)


def create_api_key(
    db: Database,
    owner: str,
    name: str = "default",
    scopes: Iterable[str] = DEFAULT_SCOPES,
    expires_at: datetime | None = None,
) -> str:
    """`issue_api_key`, for callers that want the secret only."""
    return issue_api_key(db, owner, name, scopes, expires_at).secret


def revoke_api_key(db: Database, prefix: str) -> int:
    """Revokes the keys that start with `prefix` (the operator's `flask keys revoke`)."""
    with db.transaction() as session:
        result = session.execute(
            update(ApiKey)
            .where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
            .values(revoked_at=func.now())
        )
    clear_key_cache()
    return result.rowcount


def revoke_key(session: Session, key_id: uuid.UUID) -> ApiKey | None:
    """Revokes one key by id (a key revoked already keeps its time); None: no such key. The
    caller commits; this process forgets the key at once, the others within CACHE_SECONDS."""
    row = session.scalars(
        update(ApiKey)
        .where(ApiKey.id == key_id)
        .values(revoked_at=func.coalesce(ApiKey.revoked_at, func.now()))
        .returning(ApiKey)
    ).one_or_none()
    if row is not None:
        _forget({key_id})
    return row


def clear_key_cache() -> None:
    """Forgets every key this process cached (the next use of each loads it again)."""
    with _cache_lock:
        _cache.clear()
        _active.clear()


def get_key(session: Session, key_id: uuid.UUID) -> ApiKey | None:
    return session.get(ApiKey, key_id)


def list_keys(
    session: Session,
    owner: str | None,
    state: str | None,
    limit: int,
    before: tuple[datetime, uuid.UUID] | None = None,
) -> Sequence[ApiKey]:
    """Newest first, after the keyset `before` (created_at, id) when given."""
    statement = select(ApiKey)
    if owner is not None:
        statement = statement.where(ApiKey.owner == owner)
    if state is not None:
        statement = statement.where(_in_state(state))
    return newest_page(session, statement, ApiKey, limit, before)


def _in_state(state: str) -> ColumnElement[bool]:
    unexpired = or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > func.now())
    if state == "revoked":
        return ApiKey.revoked_at.is_not(None)
    if state == "expired":
        return ApiKey.revoked_at.is_(None) & ~unexpired
    return ApiKey.revoked_at.is_(None) & unexpired


def key_state(row: ApiKey, at: datetime | None = None) -> str:
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and row.expires_at <= (at or datetime.now(UTC)):
        return "expired"
    return "active"


def principal_for_key(db: Database, key: str) -> Principal | None:
    """The principal of a valid key (cached for CACHE_SECONDS), or None: unknown, revoked or
    expired."""
    digest = hash_key(key)
    with _cache_lock:
        principal = _cache.get(digest)
    if principal is None:
        principal = _load(db, digest)
        if principal is None:
            return None
        with _cache_lock:
            _cache[digest] = principal
    return None if principal.expired() else principal


# The key, if it is usable now, and a touch of its last use unless one was recorded within
# the resolution: most loads write nothing.
_LOAD = text(f"""
WITH key AS (
    SELECT id, owner, scopes, expires_at, last_used_at FROM api_keys
    WHERE key_hash = :digest AND revoked_at IS NULL
      AND (expires_at IS NULL OR expires_at > now())
), touched AS (
    UPDATE api_keys SET last_used_at = now()
    WHERE id = (SELECT id FROM key)
      AND (last_used_at IS NULL
           OR last_used_at < now() - interval '{LAST_USED_RESOLUTION_SECONDS} seconds')
)
SELECT id, owner, scopes, expires_at FROM key
""")


def _load(db: Database, digest: str) -> Principal | None:
    with db.transaction() as session:
        row = session.execute(_LOAD, {"digest": digest}).one_or_none()
    if row is None:
        return None
    with _cache_lock:
        # Seen active just now: a subscription token it mints is good for the same window.
        _active[row.id] = row.expires_at or _NEVER
    return Principal(row.owner, frozenset(row.scopes), row.id, row.expires_at)


def key_is_active(db: Database, key_id: uuid.UUID) -> bool:
    """Whether the key exists, is not revoked and has not expired (revocation is seen within
    CACHE_SECONDS, expiry at once)."""
    with _cache_lock:
        expires_at = _active.get(key_id)
    if expires_at is None:
        with db.transaction() as session:
            row = session.execute(
                select(ApiKey.expires_at).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
            ).one_or_none()
        if row is None:
            return False
        expires_at = row.expires_at or _NEVER
        with _cache_lock:
            _active[key_id] = expires_at
    return expires_at > datetime.now(UTC)


def inactive_among(db: Database, key_ids: Collection[uuid.UUID]) -> set[uuid.UUID]:
    """Those of `key_ids` that are revoked, expired or deleted, in one query and never from
    the cache: for checks that must see a revocation made by another process.

    This process's cache forgets the ones found at once, so that a client cut off because of
    them cannot reconnect with the key for the rest of the cache's window."""
    if not key_ids:
        return set()
    with db.transaction() as session:
        active = set(
            session.scalars(
                select(ApiKey.id).where(
                    ApiKey.id.in_(key_ids),
                    ApiKey.revoked_at.is_(None),
                    or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > func.now()),
                )
            )
        )
    inactive = set(key_ids) - active
    if inactive:
        _forget(inactive)
    return inactive


def _forget(key_ids: set[uuid.UUID]) -> None:
    with _cache_lock:
        for digest in list(_cache.keys()):
            principal = _cache.get(digest)  # None once expired
            if principal is not None and principal.key_id in key_ids:
                del _cache[digest]
        for key_id in key_ids:
            _active.pop(key_id, None)
