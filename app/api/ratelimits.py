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
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flask import Flask, Response, g, request
from limits import RateLimitItem, parse
from limits.storage import RedisStorage
from limits.strategies import SlidingWindowCounterRateLimiter
from redis.exceptions import RedisError

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
        self._limiter = SlidingWindowCounterRateLimiter(
            RedisStorage(settings.redis_url, key_prefix="conveyor:ratelimit")
        )

    def check(self, principal: Principal) -> Verdict | None:
        """Counts this request against the key's tier; ApiProblem(429) when over it."""
        if not self.enabled:
            return None
        tier = tier_of(request.endpoint)
        limit = self.tiers[tier]
        identity = (tier, str(principal.key_id))
        try:
            allowed = self._limiter.hit(limit, *identity)
            reset_at, remaining = self._limiter.get_window_stats(limit, *identity)
        except RedisError as exc:
            logger.warning("rate limit not checked (Redis: %s); request let through", exc)
            return None
        # At least 1: a window that resets "now" has room again within the second.
        verdict = Verdict(limit, remaining, max(1, math.ceil(reset_at - time.time())))
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
