"""An owner's job statistics, computed at most once per `CONVEYOR_STATS_MAX_AGE` seconds per
web process, however many of the owner's readers ask meanwhile.

/stats aggregates every job the owner has (two index-only scans, migration 0015): 14 ms for
an owner of 9,000 jobs and about 100 ms for one of 100,000, each time it is asked. Dashboards
poll it, often several at once for one tenant, and 20 readers of a big tenant queued behind each
other's scans to a p99 of 1.6 s (docs/performance.md). Here the readers of one owner share one
computation in flight and reuse its result for the max age, as /health shares its checks
(app/shared_result.py). The figures are then up to that many seconds old, which the answer's
`as_of` says. Rolled-up counters were the alternative: every write path would have to keep
them exact, they give no percentiles, and each tenant would get a hot row.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

from cachetools import TTLCache
from flask import current_app

from app.db import Database
from app.jobs import transitions
from app.runtime import runtime
from app.shared_result import SharedResult

EXTENSION_KEY = "conveyor.stats_cache"
# Owners whose result a process keeps at once; past it the least recently asked are dropped.
MAX_OWNERS = 10_000
# How long a caller waits for a computation in flight (a stalled database fails the request
# with the usual 503 rather than holding it forever).
WAIT_SECONDS = 30.0


class StatsCache:
    def __init__(self, db: Database, max_age: float) -> None:
        self._db = db
        self.max_age = max_age
        self._lock = threading.Lock()
        # An entry outlives its result's max age a little, so an owner polled every max age
        # keeps its SharedResult (and its single flight) instead of getting a new one.
        self._owners: TTLCache[str, SharedResult[dict[str, Any]]] = TTLCache(
            MAX_OWNERS, ttl=max(1.0, 4 * max_age)
        )

    def of(self, owner: str) -> dict[str, Any]:
        """The owner's statistics (transitions.job_stats) with `as_of`, when they were read."""
        if self.max_age <= 0:
            return self._compute(owner)
        with self._lock:
            shared = self._owners.get(owner)
            if shared is None:
                shared = SharedResult(lambda: self._compute(owner), self.max_age, "stats")
                self._owners[owner] = shared
        return shared.current().result(timeout=WAIT_SECONDS)

    def _compute(self, owner: str) -> dict[str, Any]:
        as_of = datetime.now(UTC)
        with self._db.transaction() as session:
            return {**transitions.job_stats(session, owner), "as_of": as_of}


def stats_cache() -> StatsCache:
    """The web process's cache, made at its first /stats."""
    cache = current_app.extensions.get(EXTENSION_KEY)
    if cache is None:
        settings = runtime().settings
        cache = current_app.extensions.setdefault(
            EXTENSION_KEY, StatsCache(runtime().db, settings.stats_max_age)
        )
    return cache
