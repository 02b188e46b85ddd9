"""What-if variants: small patches that prototype proposed changes to the app, applied inside
the benchmarked processes only when asked (`--variants` of either benchmark, which sets
BENCH_VARIANTS for gunicorn / the Celery worker). The app's code is not modified, and without
`--variants` the benchmarks run the app exactly as shipped.

  no-sent-event   Celery task_send_sent_event=False (web: no task-sent PUBLISH, no mutex)
  no-task-events  also worker_send_task_events=False (worker: no received/started/succeeded)
  no-pre-ping     create_engine(pool_pre_ping=False): no SELECT 1 transaction per checkout
  redis-pool      Redis pools sized for the worker's slots (redis-py 8 caps a default pool at
                  100 connections and raises instead of waiting), for the event bus and the
                  Socket.IO emitter alike
  core-insert     Jobs.create_job with two prebuilt Core INSERTs (bind parameters at
                  execute time, so nothing is rebuilt or re-keyed per call) instead of
                  pg_insert(Job).values(**row).returning(Job) and the ORM event insert
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any

ENV = "BENCH_VARIANTS"


def _no_sent_event() -> None:
    _tweak_celery_config(task_send_sent_event=False)


def _no_task_events() -> None:
    _tweak_celery_config(task_send_sent_event=False, worker_send_task_events=False)


def _tweak_celery_config(**changes: Any) -> None:
    from app import queue

    original = queue.celery_config

    def patched(settings: Any) -> dict[str, object]:
        return {**original(settings), **changes}

    queue.celery_config = patched  # make_celery looks the name up at call time


def _no_pre_ping() -> None:
    from app import db

    original = db.create_engine

    def patched(*args: Any, **kwargs: Any) -> Any:
        return original(*args, **{**kwargs, "pool_pre_ping": False})

    db.create_engine = patched


def _redis_pool() -> None:
    import redis
    import socketio

    from app import runtime
    from app.jobs import events

    def connections(settings: Any) -> int:
        # Every slot may hold one connection at a time; headroom for heartbeat and listener.
        return max(100, 2 * settings.worker_concurrency)

    def build_redis(settings: Any) -> redis.Redis:
        return redis.Redis.from_url(
            settings.redis_url,
            socket_timeout=2.0,
            socket_connect_timeout=2.0,
            health_check_interval=30,
            max_connections=connections(settings),
        )

    original_init = events.EventBus.__init__

    def bus_init(self: Any, settings: Any, client: redis.Redis) -> None:
        original_init(self, settings, client)
        if not hasattr(self, "_emitter"):
            return  # an EventBus that publishes through its own Redis client needs nothing else
        manager = socketio.RedisManager(
            settings.redis_url,
            channel="conveyor-socketio",
            write_only=True,
            redis_options={"max_connections": connections(settings)},
        )
        # The channel lives on the manager; Server() would reject it as an option.
        self._emitter = events.SocketIO(message_queue=settings.redis_url, client_manager=manager)

    runtime.build_redis = build_redis  # create_app imports it at call time
    events.EventBus.__init__ = bus_init  # type: ignore[method-assign]


def _core_insert() -> None:
    from sqlalchemy import insert

    from app.jobs import transitions
    from app.jobs.events import Event
    from app.jobs.payloads import QueuedPayload
    from app.jobs.states import JobStatus
    from app.models import Job, JobEvent
    from app.runtime import runtime

    insert_job = insert(Job.__table__).returning(*Job.__table__.c)
    insert_event = insert(JobEvent.__table__)
    original = transitions.Jobs.create_job

    def create_job(**kw: Any) -> transitions.Created:
        if kw.get("idempotency_key") is not None:
            # The rare replay path keeps its ON CONFLICT logic.
            return original(runtime().jobs, **kw)
        rt = runtime()
        job_id, started = uuid.uuid4(), transitions.now()
        kind, priority = kw["kind"], kw.get("priority", 0)
        row = {
            "id": job_id,
            "owner": kw["owner"],
            "kind": kind,
            "status": JobStatus.QUEUED.value,
            "input": kw["input"],
            "priority": priority,
            "max_attempts": kw.get("max_attempts") or rt.settings.job_max_attempts,
            "model": rt.settings.model_for(kind),
            "retry_of": kw.get("retry_of"),
            "last_seq": 1,
            "created_at": started,
            "updated_at": started,
            "dispatched_at": started,
        }
        queued = QueuedPayload(kind=kind, retry_of=row["retry_of"])
        event = Event(job_id, kw["owner"], 1, queued, started)
        assert rt.db.engine is not None
        with rt.db.engine.begin() as conn:
            stored = conn.execute(insert_job, row).one()
            conn.execute(
                insert_event,
                {
                    "job_id": job_id,
                    "seq": 1,
                    "type": str(event.type),
                    "at": started,
                    "data": event.data,
                },
            )
        rt.bus.publish([event])
        rt.jobs.dispatch(job_id, priority)
        return transitions.Created(Job(**stored._mapping), replayed=False)

    # The API view calls runtime().jobs.create_job at request time.
    transitions.Jobs.create_job = lambda _jobs, **kw: create_job(**kw)  # type: ignore[method-assign]


VARIANTS: dict[str, Callable[[], None]] = {
    "no-sent-event": _no_sent_event,
    "no-task-events": _no_task_events,
    "no-pre-ping": _no_pre_ping,
    "redis-pool": _redis_pool,
    "core-insert": _core_insert,
}


def parse(text: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    return names


_applied: set[str] = set()


def apply(names: list[str]) -> None:
    """Applies each named patch once per process (a pool process may run several phases)."""
    for name in names:
        if name not in _applied:
            VARIANTS[name]()
            _applied.add(name)


def apply_from_env() -> None:
    apply(parse(os.environ.get(ENV, "")))


def web_app() -> Any:
    """gunicorn target `bench.variants:web_app()`: the app, with the variants applied first."""
    apply_from_env()
    from app import create_app

    return create_app()


def __getattr__(name: str) -> Any:
    # `celery -A bench.variants worker` asks for `celery`: build the worker app only then.
    if name == "celery":
        apply_from_env()
        from workers.celery_app import celery

        return celery
    raise AttributeError(name)
