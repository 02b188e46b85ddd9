"""The response cache: a chat call that asked for it (`input.cache`, with temperature 0 or a
fixed seed) is answered from an earlier identical call of the same owner, within a TTL.

Entries live in Redis under the owner's own prefix, and the owner is also part of what is
hashed, so one tenant's answers are never another's, even if a prefix were mistaken. An entry
is the answer's deltas as the model streamed them, so that a hit streams the same events a
call would have. The cache is best effort: Redis unavailable is a miss, and a failed write is
logged and forgotten; a job never fails because of its cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis

logger = logging.getLogger(__name__)

PREFIX = "conveyor:respcache:"
# The request options that change an answer; anything else (the step header) does not.
KEYED_OPTIONS = ("max_tokens", "temperature", "seed", "response_format")


@dataclass(frozen=True)
class CachedAnswer:
    deltas: list[str]
    finish_reason: str | None

    @property
    def text(self) -> str:
        return "".join(self.deltas)


def cache_key(
    owner: str, model: str, messages: list[dict[str, Any]], options: dict[str, Any]
) -> str:
    """The Redis key of a call: the owner's prefix and a SHA-256 of everything that decides the
    answer, serialized canonically (sorted keys, no whitespace)."""
    keyed = {name: options[name] for name in KEYED_OPTIONS if options.get(name) is not None}
    if "temperature" in keyed:
        # 0 and 0.0 are one temperature, but two JSON texts.
        keyed["temperature"] = float(keyed["temperature"])
    material = {"owner": owner, "model": model, "messages": messages, "options": keyed}
    digest = hashlib.sha256(
        json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    ).hexdigest()
    # The owner is hex-encoded in the prefix: an owner name with ':' or '*' stays one segment,
    # and an operator can still SCAN one tenant's entries.
    return f"{PREFIX}{owner.encode().hex()}:{digest}"


class ResponseCache:
    def __init__(self, redis_client: redis.Redis, ttl: int, max_bytes: int) -> None:
        self._redis = redis_client
        self.ttl = ttl
        self.max_bytes = max_bytes

    def get(self, key: str) -> CachedAnswer | None:
        try:
            raw = self._redis.get(key)
        except Exception:
            logger.warning("response cache unavailable: treated as a miss", exc_info=True)
            return None
        if raw is None:
            return None
        try:
            entry = json.loads(raw)
            return CachedAnswer(list(entry["deltas"]), entry.get("finish_reason"))
        except (ValueError, KeyError, TypeError):
            logger.warning("unreadable response cache entry %s: treated as a miss", key)
            return None

    def put(self, key: str, answer: CachedAnswer) -> bool:
        """Stores the answer for `ttl` seconds, unless it is larger than `max_bytes`; an entry
        already there is kept (SET NX), so two jobs racing on one prompt store it once."""
        raw = json.dumps(
            {"deltas": answer.deltas, "finish_reason": answer.finish_reason},
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode()
        if len(raw) > self.max_bytes:
            logger.info("answer of %d bytes not cached (limit %d)", len(raw), self.max_bytes)
            return False
        try:
            return bool(self._redis.set(key, raw, ex=self.ttl, nx=True))
        except Exception:
            logger.warning("response cache write failed", exc_info=True)
            return False
