"""Request rate limits per API key, in Redis (the `limits` library, which Flask-Limiter is built
on), tiered by what a request does:

- `create`: requests that make jobs (POST /jobs, /batches, /canvases, a retry): the strictest;
- `stream`: event feeds (long-polls, Server-Sent Events) and exports, which a client holds or
  repeats by design: the most generous;
- `read`: everything else.

Checked right after authentication, so a limit is the key's whatever process answers. Every
limited answer carries `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` and
`RateLimit-Policy` (the IETF httpapi draft's fields); a request over its limit is a 429 problem
with `Retry-After`. A Redis that cannot be reached lets requests through (and logs): the
limiter protects the service, and failing closed would turn a Redis outage into a full one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, g, request
from limits import RateLimitItem, parse
from limits.storage import RedisStorage
from redis.exceptions import NoScriptError, RedisError

from app.api.problems import ApiProblem

if TYPE_CHECKING:
    from app.config import Settings
    from app.keys.api_keys import Principal

logger = logging.getLogger(__name__)

EXTENSION_KEY = "conveyor.ratelimits"
CREATE_ENDPOINTS = frozenset(
    {"jobs.create_job", "jobs.retry_job", "batches.create_batch", "canvases.create_canvas"}
)
STREAM_ENDPOINTS = frozenset(
    {"jobs.list_events", "batches.download_results", "exports.export_jobs", "exports.export_job"}
)


@dataclass(frozen=True)
class Verdict:
    limit: RateLimitItem
    remaining: int
    reset_in: int  # seconds until the window has room again


class RateLimits:
    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.rate_limits_enabled
        self.tiers: dict[str, RateLimitItem] = {
            "create": parse(settings.rate_limit_create),
            "read": parse(settings.rate_limit_read),
            "stream": parse(settings.rate_limit_stream),
        }
        # A sliding window counter: no double burst at a window's boundary (as a fixed window
        # allows), and O(1) in Redis whatever the limit, where an exact moving window keeps (and
        # scans) one entry per request in the window.
        self._storage = SlidingWindowStorage(settings.redis_url, key_prefix="conveyor:ratelimit")

    def check(self, principal: Principal) -> Verdict | None:
        """Counts this request against the key's tier; ApiProblem(429) when over it."""
        if not self.enabled:
            return None
        tier = tier_of(request.endpoint)
        limit = self.tiers[tier]
        identity = (tier, str(principal.key_id))
        try:
            allowed, window = self._storage.hit(limit, *identity)
        except RedisError as exc:
            logger.warning("rate limit not checked (Redis: %s); request let through", exc)
            return None
        verdict = window.verdict(limit)
        if not allowed:
            raise ApiProblem(
                429,
                "rate-limited",
                "Too many requests",
                f"this key may make {limit.amount} {tier} requests per "
                f"{limit.get_expiry()} s; try again in {verdict.reset_in} s",
                headers={"Retry-After": str(verdict.reset_in), **headers(verdict)},
            )
        return verdict


@dataclass(frozen=True)
class Window:
    """A sliding window counter's two windows, as `limits` keeps them in Redis."""

    previous_count: int
    previous_expires_in: float  # seconds
    current_count: int
    current_expires_in: float

    def verdict(self, limit: RateLimitItem) -> Verdict:
        """What `SlidingWindowCounterRateLimiter.get_window_stats` computes from the same
        window: the weighted count's room, and when the next request fits again."""
        expiry = limit.get_expiry()
        weighted = self.previous_count * self.previous_expires_in / expiry + self.current_count
        remaining = max(0, limit.amount - math.floor(weighted))
        reset_in = math.inf
        if self.previous_count:
            reset_in = self.previous_expires_in % (expiry / self.previous_count)
        if self.current_count:
            reset_in = min(reset_in, self.current_expires_in % expiry)
        if math.isinf(reset_in):
            reset_in = 0.0
        # At least 1: a window that resets "now" has room again within the second.
        return Verdict(limit, remaining, max(1, math.ceil(reset_in)))


class SlidingWindowStorage(RedisStorage):
    """`limits`' Redis storage, with its sliding window's acquire and read in one round trip.

    `SlidingWindowCounterRateLimiter.hit` and then `get_window_stats` (for the RateLimit
    headers) are two round trips per request; here the library's own two Lua scripts, on its
    own keys, go through one pipeline: one round trip, where the library's strategy makes two.
    """

    def hit(self, limit: RateLimitItem, *identifiers: str, cost: int = 1) -> tuple[bool, Window]:
        key = limit.key_for(*identifiers)
        expiry = limit.get_expiry()
        keys = [
            self.prefixed_key(self._previous_window_key(key)),
            self.prefixed_key(self._current_window_key(key)),
        ]
        try:
            acquired, read = self._acquire_and_read(keys, limit.amount, expiry, cost)
        except NoScriptError:
            # A Redis restarted (or flushed its scripts) since they were loaded: load, again.
            connection = self.get_connection()
            for script in (self.lua_acquire_sliding_window, self.lua_sliding_window):
                script.sha = connection.script_load(script.script)
            acquired, read = self._acquire_and_read(keys, limit.amount, expiry, cost)
        previous_count, previous_ttl, current_count, current_ttl = read or (0, 0, 0, 0)
        window = Window(
            int(previous_count or 0),
            max(0.0, float(previous_ttl or 0)) / 1000,
            int(current_count or 0),
            max(0.0, float(current_ttl or 0)) / 1000,
        )
        return bool(acquired), window

    def _acquire_and_read(self, keys: list[str], amount: int, expiry: int, cost: int) -> Any:
        """By EVALSHA, not the Script objects: a pipeline holding Script objects first asks
        Redis whether they exist (SCRIPT EXISTS), a round trip of its own on every request."""
        with self.get_connection().pipeline(transaction=False) as pipe:
            pipe.evalsha(self.lua_acquire_sliding_window.sha, 2, *keys, amount, expiry, cost)
            pipe.evalsha(self.lua_sliding_window.sha, 2, *keys, expiry)
            return pipe.execute()


def tier_of(endpoint: str | None) -> str:
    if endpoint in CREATE_ENDPOINTS:
        return "create"
    if endpoint in STREAM_ENDPOINTS:
        return "stream"
    return "read"


def headers(verdict: Verdict) -> dict[str, str]:
    limit = verdict.limit
    return {
        "RateLimit-Limit": str(limit.amount),
        "RateLimit-Remaining": str(verdict.remaining),
        "RateLimit-Reset": str(verdict.reset_in),
        "RateLimit-Policy": f"{limit.amount};w={limit.get_expiry()}",
    }


def check_request(app: Flask, principal: Principal) -> None:
    verdict = app.extensions[EXTENSION_KEY].check(principal)
    if verdict is not None:
        g.rate_limit = verdict


def _add_headers(response: Response) -> Response:
    verdict = g.pop("rate_limit", None)
    if verdict is not None:
        response.headers.update(headers(verdict))
    return response


def init_app(app: Flask, settings: Settings) -> None:
    app.extensions[EXTENSION_KEY] = RateLimits(settings)
    app.after_request(_add_headers)
