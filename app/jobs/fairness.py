"""Fair dispatch: a bounded window of published jobs per tenant, so that one tenant's backlog
never stands in the broker in front of another tenant's jobs.

A tenant's job is *outstanding* from the moment its Celery message is published
(`dispatched_at` set) until it finishes: queued with a message, or running. A tenant may have at
most its window's worth outstanding; a job past the window is stored *held*: queued with
`dispatched_at` NULL, exactly as a scheduled job waits for its run_at. A held job is released
(marked published, then published once) when its tenant's outstanding jobs leave the window:
by the finish or cancel of one of them, and by every sweep as a safety net. Each job is still
published once; nothing is re-queued to reorder the broker.

Why a window and not a reordering of the broker: the broker is a FIFO list (one per priority
step) shared by every worker. Once a tenant's 5,000 messages are in it, whatever comes next
waits behind them all. Keeping at most a window's worth of each tenant in the broker bounds
that wait to a window, whatever the tenant's backlog; and since a freed slot's replacement is
published at the back of the list, tenants that are all busy share the slots in proportion to
their windows (their weights).

The window (`CONVEYOR_TENANT_WINDOW`): `auto` is every live worker slot (the concurrency the
workers' beats report, app/jobs/presence.py) plus a quarter for messages in flight, at least
`CONVEYOR_TENANT_WINDOW_MIN`: a tenant alone still fills every free slot (work conserving). A
tenant's `weight` scales its window; its `max_concurrency` (else the deployment's
`CONVEYOR_TENANT_MAX_CONCURRENCY`) caps it, and since a running job is outstanding, it never
has more jobs running than the cap.

Every decision to publish a held or new job is taken under a per-tenant advisory lock, by a
statement that starts after the lock is held (so it counts every release committed before),
so two processes never both fill the same room: the intake's insert (app/jobs/sql.py CREATE),
and a release here.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import redis
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from app.jobs import presence
from app.models import OUTSTANDING

if TYPE_CHECKING:
    from app.config import Settings

logger = logging.getLogger(__name__)

# The auto window is read from the workers' beats at most this often per process.
WINDOW_CACHE_SECONDS = 5.0
# The first argument of the two-key advisory locks taken here ("fair" in ASCII, truncated).
LOCK_NAMESPACE = 0x66616972 & 0x7FFFFFFF
UNLIMITED = 2_147_483_647

# Takes the advisory lock of every owner named, in one order (of the lock key) whoever takes
# them, so that two transactions locking several owners never wait on each other in a cycle.
LOCK_OWNERS = text("""
SELECT count(pg_advisory_xact_lock(:namespace, k)) FROM (
    SELECT DISTINCT hashtext(o) AS k FROM unnest(CAST(:owners AS text[])) AS o ORDER BY k
) AS keys
""")


def window_sql(tenant: str) -> str:
    """The window of the owner whose `tenants` row is aliased `tenant` (possibly NULL): the
    base window (parameter `window`, not NULL) times its weight, under its cap (else the
    parameter `default_cap`)."""
    return f"""least(coalesce({tenant}.max_concurrency, CAST(:default_cap AS int), {UNLIMITED}),
              greatest(1, ceil(CAST(:window AS int) * coalesce({tenant}.weight, 1))))::int"""


def room_sql(owner: str, tenant: str) -> str:
    """How many more jobs the owner (SQL expression `owner`, its `tenants` row aliased
    `tenant`) may publish now: its window less its outstanding jobs. Takes the parameters
    `window` (NULL: fair dispatch off, no limit) and `default_cap`. The count stops at the
    window: a tenant with thousands outstanding (the window lowered, or just turned on) costs
    no more to check than one at its window."""
    window = window_sql(tenant)
    return f"""CASE WHEN CAST(:window AS int) IS NULL THEN {UNLIMITED} ELSE
        {window} - (SELECT count(*) FROM (
            SELECT 1 FROM jobs WHERE jobs.owner = {owner} AND ({OUTSTANDING}) LIMIT {window}
        ) AS outstanding)::int
    END"""


# Held jobs (new ones past the window, and scheduled ones whose run_at has come).
# A job waiting for its owner's window (or a scheduled one whose time has come) to publish it.
HELD = """status = 'queued' AND dispatched_at IS NULL AND (run_at IS NULL OR run_at <= now())"""

HAS_HELD = text(f"SELECT EXISTS (SELECT 1 FROM jobs WHERE owner = :owner AND {HELD})")

# Owners with held jobs, for the sweeper: those held by their window (jobs_owner_held) and
# those whose scheduled time has come (jobs_scheduled_due).
HELD_OWNERS = text("""
(SELECT DISTINCT owner FROM jobs
 WHERE status = 'queued' AND dispatched_at IS NULL AND run_at IS NULL LIMIT :limit)
UNION
(SELECT DISTINCT owner FROM jobs
 WHERE status = 'queued' AND dispatched_at IS NULL AND run_at <= now() LIMIT :limit)
""")

# The owner's next held jobs, as many as its window has room for (at most :batch), by
# priority then age: marked published and returned for the caller to publish. Run under the
# owner's lock, in a statement of its own (its snapshot then sees every earlier release).
RELEASE = text(f"""
UPDATE jobs SET dispatched_at = now()
WHERE id IN (
    SELECT id FROM jobs
    WHERE owner = :owner AND {HELD}
    ORDER BY priority DESC, created_at, batch_item, id
    LIMIT greatest(0, least(:batch, (
        SELECT {room_sql("o.owner", "t")}
        FROM (SELECT CAST(:owner AS text) AS owner) AS o
        LEFT JOIN tenants t ON t.owner = o.owner
    )))
    FOR UPDATE SKIP LOCKED
)
RETURNING id, priority, run_at, kind, attempt
""")


class DispatchWindow:
    """The deployment's base window, from the settings or (`auto`) from the live workers."""

    def __init__(self, settings: Settings, redis_client: redis.Redis) -> None:
        self._settings = settings
        self._redis = redis_client
        self._lock = threading.Lock()
        self._auto: tuple[float, int] | None = None  # (monotonic time read, window)

    @property
    def enabled(self) -> bool:
        return self._settings.tenant_window != "off"

    def params(self) -> dict[str, int | None]:
        """The parameters of `room_sql`."""
        return {"window": self.base(), "default_cap": self._settings.tenant_max_concurrency}

    def base(self) -> int | None:
        setting = self._settings.tenant_window
        if setting == "off":
            return None
        if setting == "auto":
            return self._auto_window()
        return int(setting)

    def _auto_window(self) -> int:
        with self._lock:
            cached = self._auto
        if cached is not None and time.monotonic() - cached[0] < WINDOW_CACHE_SECONDS:
            return cached[1]
        try:
            window = auto_window(
                live_slots(self._redis.hgetall(presence.WORKERS_KEY)),
                self._settings.tenant_window_min,
            )
        except redis.RedisError as exc:
            # Without Redis nothing is published anyway; keep the last answer.
            logger.warning("worker beats unreadable, keeping the last window: %s", exc)
            window = cached[1] if cached is not None else self._settings.tenant_window_min
        with self._lock:
            self._auto = (time.monotonic(), window)
        return window


def live_slots(raw_beats: dict[bytes, bytes]) -> int:
    """The slots of every worker process whose beat is fresh."""
    now = time.time()
    beats, _ = presence.read_worker_beats(raw_beats, now)
    return sum(beat.concurrency for beat in beats if beat.alive(now))


def auto_window(slots: int, minimum: int) -> int:
    """Every slot plus a quarter: a freed slot finds its next message already in the broker
    rather than waiting for a release's round trip."""
    return max(minimum, slots + math.ceil(slots / 4))


def lock_owners(connection: Connection, owners: Iterable[str]) -> None:
    connection.execute(LOCK_OWNERS, {"namespace": LOCK_NAMESPACE, "owners": sorted(set(owners))})


def release_held(
    connection: Connection, owner: str, window: dict[str, Any], batch: int
) -> list[Any]:
    """The owner's held jobs its window has room for (up to `batch`), marked published, in a
    transaction of the caller's that has done nothing yet: rows of (id, priority, run_at).
    Nothing (one cheap probe) when it holds none."""
    if not connection.execute(HAS_HELD, {"owner": owner}).scalar_one():
        return []
    if window["window"] is not None:
        lock_owners(connection, [owner])
    return connection.execute(RELEASE, {**window, "owner": owner, "batch": batch}).all()


# A tenant's window now, and how much of it is used, for the admin's view of the tenant.
TENANT_DISPATCH = text(f"""
SELECT coalesce(t.weight, 1) AS weight,
       CASE WHEN CAST(:window AS int) IS NOT NULL THEN {window_sql("t")} END AS window,
       (SELECT count(*) FROM jobs WHERE jobs.owner = o.owner AND ({OUTSTANDING})) AS outstanding,
       (SELECT count(*) FROM jobs
        WHERE jobs.owner = o.owner AND status = 'queued' AND dispatched_at IS NULL
          AND (run_at IS NULL OR run_at <= now())) AS held
FROM (SELECT CAST(:owner AS text) AS owner) AS o
LEFT JOIN tenants t ON t.owner = o.owner
""")


@dataclass(frozen=True)
class TenantDispatch:
    weight: Decimal
    window: int | None  # None: fair dispatch is off
    outstanding: int
    held: int


def tenant_dispatch(
    connection: Connection | Session, owner: str, window: dict[str, Any]
) -> TenantDispatch:
    row = connection.execute(TENANT_DISPATCH, {**window, "owner": owner}).one()
    return TenantDispatch(Decimal(row.weight), row.window, row.outstanding, row.held)


class Releaser:
    """Releases held jobs off the caller's thread: `poke(owner)` returns at once, and one
    thread per process releases every owner poked since its last pass, in one pass.

    Why not in the finishing worker's own thread: when a wave of a tenant's jobs ends
    together (5,000 submitted at once start, and end, in waves of every slot), each finisher
    would take the tenant's lock in turn while holding its slot and a pooled database
    connection; at 100 slots that stalled the worker for most of a second per wave and cost
    the tenant 40 % of its throughput. One thread coalesces the wave into a few releases. A
    poke lost to a crash is released by the next sweep."""

    def __init__(self, release: Callable[[list[str]], object]) -> None:
        self._release = release
        self._owners: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def poke(self, owner: str) -> None:
        with self._lock:
            self._owners.add(owner)
            # Started on first use (no import-time work), and again in a forked child.
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="conveyor-fair-release", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                owners, self._owners = self._owners, set()
            if not owners:
                continue
            try:
                self._release(sorted(owners))
            except Exception as exc:  # a database or broker outage; the sweeper retries
                logger.warning("release of held jobs failed, the sweeper will retry: %s", exc)
