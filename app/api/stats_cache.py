"""An owner's job statistics, computed at most once per `CONVEYOR_STATS_MAX_AGE` seconds per
web process, however many of the owner's readers ask meanwhile.

/stats aggregates every job the owner has (two index-only scans, migration 0015): 14 ms for
an owner of 9,000 jobs and about 100 ms for one of 100,000, each time it is asked. Dashboards
poll it, often several at once for one tenant, and 20 readers of a big tenant queued behind each
other's scans to a p99 of 1.6 s (docs/performance.md). Here the readers of one owner share one
computation in flight and reuse its result for the max age, as /health shares its checks
(app/shared_result.py); once it is older, the next reader starts a new computation and, like
every reader until it ends, gets the last figures meanwhile. The figures are then up to about
two max ages old, which the answer's `as_of` says. Rolled-up counters were the alternative:
every write path would have to keep them exact, they give no percentiles, and each tenant would
get a hot row.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
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
        self._owners: TTLCache[str, _Entry] = TTLCache(MAX_OWNERS, ttl=max(1.0, 4 * max_age))

    def of(self, owner: str) -> dict[str, Any]:
        """The owner's statistics (transitions.job_stats) with `as_of`, when they were read."""
        if self.max_age <= 0:
            return self._compute(owner)
        with self._lock:
            entry = self._owners.get(owner)
            if entry is None:
                entry = _Entry(SharedResult(lambda: self._compute(owner), self.max_age, "stats"))
                self._owners[owner] = entry
        future = entry.shared.current()
        if not future.done() and entry.last is not None:
            # Renewed in the background: the owner's readers get the figures of the last
            # computation meanwhile rather than all waiting for the new one (a big owner's
            # readers would otherwise all wait its 100 ms every max age).
            return entry.last
        value = future.result(timeout=WAIT_SECONDS)
        entry.last = value
        return value

    def _compute(self, owner: str) -> dict[str, Any]:
        as_of = datetime.now(UTC)
        with self._db.transaction() as session:
            return {**transitions.job_stats(session, owner), "as_of": as_of}


@dataclass
class _Entry:
    shared: SharedResult[dict[str, Any]]
    # The newest figures a reader got, served while the next computation runs.
    last: dict[str, Any] | None = None


def stats_cache() -> StatsCache:
    """The web process's cache, made at its first /stats."""
    cache = current_app.extensions.get(EXTENSION_KEY)
    if cache is None:
        settings = runtime().settings
        cache = current_app.extensions.setdefault(
            EXTENSION_KEY, StatsCache(runtime().db, settings.stats_max_age)
        )
    return cache
