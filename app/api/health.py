"""What GET /ready and GET /health report.

Every figure is gathered at most once per `CONVEYOR_HEALTH_MAX_AGE` seconds per process, by one
computation that concurrent callers share (app/shared_result.py), and a caller waits for it at
most `CONVEYOR_READY_TIMEOUT` seconds. So both endpoints answer in milliseconds under any
number of callers, and in bounded time when a dependency stalls.

Readiness is whether this process can serve: PostgreSQL and Redis answer. The health view adds
the artifact store and what the rest of the system is doing, from records the system keeps
anyway: worker heartbeats and the last sweep (app/jobs/presence.py), queued and running jobs and
the last hour's failures (PostgreSQL), the broker's waiting messages. It asks nothing of the
workers.

The artifact store is not part of readiness: without it this process still accepts jobs and
serves everything but artifacts' bytes, and taking every web process out of a load balancer
because a bucket is unreachable would turn one broken feature into a full outage. /health calls
the system degraded instead, and says why.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, wait
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Generic, TypeVar

from flask import Flask, current_app
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from app.api.schemas import (
    ArtifactStoreHealth,
    Components,
    Condition,
    Failures,
    Health,
    QueueDepth,
    Ready,
    ReadyCheck,
    StoreHealth,
    SweeperHealth,
    WorkersHealth,
)
from app.jobs import presence, transitions
from app.jobs.presence import SweepRecord, WorkerBeat
from app.queue import broker_queue_keys
from app.runtime import EXTENSION_KEY as RUNTIME_KEY
from app.runtime import Runtime
from app.shared_result import SharedResult

EXTENSION_KEY = "conveyor.health"
FAILURE_WINDOW = timedelta(hours=1)
# The figures may take longer than a ping on a large table; a caller still waits no longer than
# CONVEYOR_READY_TIMEOUT, and only one such query runs per process at a time.
FIGURES_STATEMENT_TIMEOUT = 5.0

T = TypeVar("T")


@dataclass(frozen=True)
class Gathered(Generic[T]):
    """One computation's outcome: its value, or why there is none."""

    at: datetime
    value: T | None = None
    error: str | None = None
    latency_ms: float | None = None


def gather(fetch: Callable[[], T]) -> Gathered[T]:
    at = datetime.now(UTC)
    started = time.perf_counter()
    try:
        value = fetch()
    except Exception as exc:
        return Gathered(at, error=f"{type(exc).__name__}: {exc}"[:300])
    return Gathered(at, value, latency_ms=round((time.perf_counter() - started) * 1000, 2))


@dataclass(frozen=True)
class DatabaseFigures:
    queued: int
    running: int
    failures: dict[str, int]


@dataclass(frozen=True)
class RedisFigures:
    beats: list[WorkerBeat]
    sweep: SweepRecord | None
    broker: int | None


class HealthMonitor:
    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self.timeout = runtime.settings.ready_timeout
        age = runtime.settings.health_max_age

        def shared(name: str, fetch: Callable[[], T]) -> SharedResult[Gathered[T]]:
            return SharedResult(lambda: gather(fetch), age, name)

        self.database_ping = shared("database-ping", self._ping_database)
        self.redis_ping = shared("redis-ping", runtime.redis.ping)
        self.database_figures = shared("database-figures", self._database_figures)
        self.redis_figures = shared("redis-figures", self._redis_figures)
        self.artifact_store = shared("artifact-store", self._check_artifact_store)

    # The answers ------------------------------------------------------------------------------

    def readiness(self) -> Ready:
        found = self._wait({"database": self.database_ping, "redis": self.redis_ping})
        checks = {name: self._ready_check(gathered) for name, gathered in found.items()}
        ready = all(check.ok for check in checks.values())
        return Ready(status="healthy" if ready else "unhealthy", checks=checks)

    def health(self) -> Health:
        found = self._wait(
            {
                "database": self.database_ping,
                "redis": self.redis_ping,
                "database_figures": self.database_figures,
                "redis_figures": self.redis_figures,
                "artifacts": self.artifact_store,
            }
        )
        now = time.time()
        redis_figures: Gathered[RedisFigures] | None = found["redis_figures"]
        db_figures: Gathered[DatabaseFigures] | None = found["database_figures"]
        components = Components(
            database=self._store(found["database"]),
            redis=self._store(found["redis"]),
            artifacts=ArtifactStoreHealth(
                **self._store(found["artifacts"]).model_dump(),
                store=self._runtime.artifacts.store.name,
            ),
            workers=self._workers(redis_figures, now),
            sweeper=self._sweeper(redis_figures, now),
        )
        stores = (components.database.status, components.redis.status)
        others = (
            components.artifacts.status,
            components.workers.status,
            components.sweeper.status,
        )
        status: Condition = (
            "down" if "down" in stores else "ok" if set(others) == {"ok"} else "degraded"
        )
        times = [gathered.at for gathered in found.values() if gathered is not None]
        return Health(
            status=status,
            checked_at=min(times, default=datetime.now(UTC)),
            components=components,
            queue=self._queue(db_figures, redis_figures),
            failures=self._failures(db_figures),
        )

    # Gathering (each runs on its SharedResult's thread) ----------------------------------------

    def _ping_database(self) -> None:
        self._in_transaction(lambda session: session.execute(text("SELECT 1")), self.timeout)

    def _check_artifact_store(self) -> None:
        self._runtime.artifacts.store.check()

    def _database_figures(self) -> DatabaseFigures:
        def read(session: Session) -> DatabaseFigures:
            queued, running = transitions.queue_depth(session)
            return DatabaseFigures(
                queued, running, transitions.failures_by_code(session, FAILURE_WINDOW)
            )

        return self._in_transaction(read, FIGURES_STATEMENT_TIMEOUT)

    def _in_transaction(self, work: Callable[[Session], T], statement_timeout: float) -> T:
        try:
            return self._transaction(work, statement_timeout)
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            # After a database restart the first use of a pooled connection fails and
            # SQLAlchemy discards the pool, so the next try gets a new connection. Reporting
            # that first failure would flap readiness for one max age on a healthy database.
            return self._transaction(work, statement_timeout)

    def _transaction(self, work: Callable[[Session], T], statement_timeout: float) -> T:
        with self._runtime.db.transaction() as session:
            ms = max(100, int(statement_timeout * 1000))
            session.execute(text(f"SET LOCAL statement_timeout = {ms}"))
            return work(session)

    def _redis_figures(self) -> RedisFigures:
        broker_keys = broker_queue_keys() if self._broker_is_redis() else []
        with self._runtime.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(presence.WORKERS_KEY)
            pipe.get(presence.SWEEP_KEY)
            for key in broker_keys:
                pipe.llen(key)
            raw_beats, raw_sweep, *lengths = pipe.execute()
        beats, forgotten = presence.read_worker_beats(raw_beats, time.time())
        if forgotten:
            self._runtime.redis.hdel(presence.WORKERS_KEY, *forgotten)
        broker = sum(lengths) if broker_keys else None
        return RedisFigures(beats, presence.read_sweep(raw_sweep), broker)

    def _broker_is_redis(self) -> bool:
        settings = self._runtime.settings
        return settings.celery_broker_url == settings.redis_url

    # Waiting and shaping -----------------------------------------------------------------------

    def _wait(self, shared: Mapping[str, SharedResult[Gathered[T]]]) -> dict[str, Gathered | None]:
        """Whatever finished within the timeout; None for what did not."""
        futures: dict[str, Future[Gathered[T]]] = {
            name: one.current() for name, one in shared.items()
        }
        wait(futures.values(), timeout=self.timeout)
        return {
            name: future.result() if future.done() else None for name, future in futures.items()
        }

    def _late(self) -> str:
        return f"no answer within {self.timeout:g} s"

    def _ready_check(self, gathered: Gathered | None) -> ReadyCheck:
        if gathered is None:
            return ReadyCheck(ok=False, detail=self._late())
        return ReadyCheck(
            ok=gathered.error is None,
            detail=gathered.error,
            latency_ms=gathered.latency_ms,
            checked_at=gathered.at,
        )

    def _store(self, gathered: Gathered | None) -> StoreHealth:
        if gathered is None:
            return StoreHealth(status="down", detail=self._late())
        if gathered.error is not None:
            return StoreHealth(status="down", detail=gathered.error)
        return StoreHealth(status="ok", latency_ms=gathered.latency_ms)

    def _unknown(self, gathered: Gathered | None) -> str:
        return f"unknown: Redis gave no figures ({gathered.error if gathered else self._late()})"

    def _workers(self, gathered: Gathered[RedisFigures] | None, now: float) -> WorkersHealth:
        if gathered is None or gathered.value is None:
            return WorkersHealth(
                status="degraded",
                detail=self._unknown(gathered),
                count=None,
                slots=None,
                running=None,
                pools={},
                last_heartbeat_age_s=None,
            )
        beats = gathered.value.beats
        live = [beat for beat in beats if beat.alive(now)]
        newest = min((beat.age(now) for beat in beats), default=None)
        pools: dict[str, int] = {}
        for beat in live:
            pools[beat.pool] = pools.get(beat.pool, 0) + 1
        detail = None
        if not live:
            detail = (
                "no worker heartbeat in the last hour"
                if newest is None
                else f"the last worker heartbeat is {newest:.0f} s old"
            )
        return WorkersHealth(
            status="ok" if live else "degraded",
            detail=detail,
            count=len(live),
            slots=sum(beat.concurrency for beat in live),
            running=sum(beat.running for beat in live),
            pools=pools,
            last_heartbeat_age_s=None if newest is None else round(newest, 3),
        )

    def _sweeper(self, gathered: Gathered[RedisFigures] | None, now: float) -> SweeperHealth:
        sweep = gathered.value.sweep if gathered is not None and gathered.value else None
        if sweep is None:
            known = gathered is not None and gathered.value is not None
            return SweeperHealth(
                status="degraded",
                detail="no sweep recorded: is celery beat running?"
                if known
                else self._unknown(gathered),
                interval_s=None,
                last_sweep_at=None,
                last_sweep_age_s=None,
                last_sweep=None,
            )
        age = sweep.age(now)
        counts = asdict(sweep)
        del counts["at"], counts["interval"]
        return SweeperHealth(
            status="degraded" if sweep.overdue(now) else "ok",
            detail=f"the last sweep is {age:.0f} s old, scheduled every {sweep.interval:g} s"
            if sweep.overdue(now)
            else None,
            interval_s=sweep.interval,
            last_sweep_at=datetime.fromtimestamp(sweep.at, UTC),
            last_sweep_age_s=round(age, 3),
            last_sweep=counts,
        )

    def _queue(
        self, db: Gathered[DatabaseFigures] | None, redis: Gathered[RedisFigures] | None
    ) -> QueueDepth:
        figures = db.value if db is not None else None
        return QueueDepth(
            queued=figures.queued if figures else None,
            running=figures.running if figures else None,
            broker=redis.value.broker if redis is not None and redis.value else None,
            detail=None if figures else self._late() if db is None else db.error,
        )

    def _failures(self, db: Gathered[DatabaseFigures] | None) -> Failures:
        window = int(FAILURE_WINDOW.total_seconds())
        if db is None or db.value is None:
            detail = self._late() if db is None else db.error
            return Failures(window_s=window, total=None, by_code={}, detail=detail)
        by_code = db.value.failures
        return Failures(window_s=window, total=sum(by_code.values()), by_code=by_code)


def init_app(app: Flask) -> None:
    app.extensions[EXTENSION_KEY] = HealthMonitor(app.extensions[RUNTIME_KEY])


def monitor() -> HealthMonitor:
    return current_app.extensions[EXTENSION_KEY]
