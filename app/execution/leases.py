"""Per worker process: the jobs it runs, one heartbeat that renews all their leases in a single
UPDATE, and one Redis subscription that delivers cancellations at once.

The heartbeat also carries cancellation (the `cancel_requested_at` column), so a cancel whose
Redis message was lost still arrives within one heartbeat, and it records the process's
presence in Redis (presence.py), which is how GET /health counts workers.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import redis
from celery import bootsteps, signals
from celery.concurrency import ALIASES
from flask import Flask

from app.jobs import budgets, presence
from app.jobs.events import CANCEL_CHANNEL
from app.jobs.presence import WorkerIdentity
from app.queue import WEBHOOK_QUEUE
from app.runtime import runtime_of

if TYPE_CHECKING:
    from app.jobs.transitions import Jobs
    from app.kinds.context import JobContext

logger = logging.getLogger(__name__)


def cancel_listener_connection(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, socket_connect_timeout=2, health_check_interval=10)


class ActiveJobs:
    def __init__(self, connect: Callable[[str], redis.Redis] = cancel_listener_connection) -> None:
        # Opens the cancel listener's connection, one of its own: a subscribed connection can
        # serve no other command. The unit tests pass fakeredis's.
        self._connect = connect
        self._lock = threading.Lock()
        self._jobs: dict[uuid.UUID, JobContext] = {}
        self._started = False
        self._identity: WorkerIdentity | None = None

    def track(self, ctx: JobContext) -> None:
        with self._lock:
            self._jobs[ctx.job_id] = ctx

    def untrack(self, ctx: JobContext) -> None:
        with self._lock:
            if self._jobs.get(ctx.job_id) is ctx:
                del self._jobs[ctx.job_id]

    def get(self, job_id: uuid.UUID) -> JobContext | None:
        with self._lock:
            return self._jobs.get(job_id)

    def snapshot(self) -> list[JobContext]:
        with self._lock:
            return list(self._jobs.values())

    def ensure_started(self, jobs: Jobs, identity: WorkerIdentity | None = None) -> None:
        """Starts the heartbeat and the cancel listener once, in the process that runs jobs:
        when its Celery worker starts (`worker_heartbeat_step`, which gives `identity`) or at
        its first job; never at import, and after a prefork child has forked. Only a process
        that knows its identity records its presence: one running a job outside a worker is
        no worker."""
        if identity is not None:
            self._identity = identity
        if self._started:
            return
        with self._lock:
            if self._started:
                return
            self._started = True
        for target, name in (
            (self._heartbeat, "lease-heartbeat"),
            (self._listen_for_cancels, "cancel-listener"),
        ):
            threading.Thread(target=target, args=(jobs,), name=name, daemon=True).start()

    def _heartbeat(self, jobs: Jobs) -> None:
        interval = jobs.settings.heartbeat_seconds
        while True:
            self._beat(jobs, interval)
            time.sleep(interval)

    def _beat(self, jobs: Jobs, interval: float) -> None:
        try:
            self.renew_all(jobs)
        except Exception:
            # A database outage must not kill the heartbeat; leases may lapse and the
            # sweeper will recover those jobs, which is the designed outcome.
            logger.exception("lease renewal failed")
        if self._identity is None:
            return
        beat = presence.worker_beat(self._identity, len(self.snapshot()), interval)
        try:
            presence.record_worker_beat(jobs.redis, beat)
        except redis.RedisError as exc:
            # Leases live in PostgreSQL, so jobs are unaffected; GET /health reports Redis down.
            logger.warning("worker presence not recorded: %s", exc)

    def renew_all(self, jobs: Jobs) -> None:
        running = self.snapshot()
        if not running:
            return
        progress = [event for ctx in running if (event := ctx.take_unwritten_progress())]
        alive = jobs.renew_leases([(ctx.job_id, ctx.attempt) for ctx in running], progress)
        now = time.monotonic()
        for ctx in running:
            state = alive.get(ctx.job_id)
            if state is None:
                if not ctx.done:  # a finished attempt rightly holds no lease any more
                    logger.warning("lease lost", extra={"job_id": ctx.job_id})
                    ctx.lose_lease()
            elif state.cancel_requested:
                ctx.request_cancel()
            # After the cancel: a job both canceled and out of time by the time a late beat
            # sees it (a beat delayed behind a busy pool) ends as its owner asked, `canceled`;
            # the job's thread may check its flags between the two.
            if now > ctx.deadline:
                ctx.time_out()
        refresh_budgets(jobs, running)

    def _listen_for_cancels(self, jobs: Jobs) -> None:
        while True:
            client = self._connect(jobs.settings.redis_url)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(CANCEL_CHANNEL)
                while True:
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._deliver_cancel(message["data"])
            except redis.RedisError as exc:
                logger.warning(
                    "cancel listener lost Redis (%s); heartbeat still delivers cancellations",
                    exc,
                )
                time.sleep(1.0)
            finally:
                pubsub.close()
                client.close()

    def _deliver_cancel(self, data: bytes) -> None:
        try:
            job_id = uuid.UUID(data.decode())
        except ValueError:
            return
        ctx = self.get(job_id)
        if ctx is not None:
            logger.info("cancel requested", extra={"job_id": job_id})
            ctx.request_cancel()


active_jobs = ActiveJobs()


def worker_heartbeat_step(app: Flask) -> type[bootsteps.StartStopStep]:
    """A worker bootstep for `app`'s Celery app (added by create_app)."""

    class WorkerHeartbeat(bootsteps.StartStopStep):
        """Starts the heartbeat of every process that runs jobs when the worker starts, not at
        its first job: GET /health counts workers by the presence their heartbeats record, so an
        idle worker must beat too."""

        requires = ("celery.worker.components:Pool",)

        def __init__(self, worker: Any, **kwargs: Any) -> None:
            super().__init__(worker, **kwargs)
            # A worker that only sends webhooks (`-Q webhooks`) runs no job: it is no job
            # worker for GET /health. Any other queue is jobs' (an operator's own `-Q` name
            # included, as the tests' gevent worker has).
            self.runs_jobs = bool(set(worker.app.amqp.queues.consume_from) - {WEBHOOK_QUEUE})
            pool = pool_name(worker.pool_cls)
            self.identity = WorkerIdentity(worker.hostname, pool, worker.concurrency)
            if pool == "prefork" and self.runs_jobs:
                # Prefork children run the jobs, each with its own heartbeat. The pool forks
                # them before any step starts, so the hook is connected here, at construction.
                signals.worker_process_init.connect(self.start_in_child, weak=False)

        def start(self, worker: Any) -> None:
            if self.identity.pool != "prefork" and self.runs_jobs:
                active_jobs.ensure_started(runtime_of(app).jobs, self.identity)

        def start_in_child(self, **_: Any) -> None:
            active_jobs.ensure_started(runtime_of(app).jobs, replace(self.identity, concurrency=1))

    return WorkerHeartbeat


def pool_name(pool_cls: type) -> str:
    """The name `celery worker --pool` knows the pool by (threads, not thread)."""
    path = f"{pool_cls.__module__}:{pool_cls.__name__}"
    names = [name for name, target in ALIASES.items() if target == path and name != "processes"]
    return names[0] if names else pool_cls.__name__


def refresh_budgets(jobs: Jobs, running: list[JobContext]) -> None:
    """Each running job's view of its owner's budget left, from one query for the process's
    jobs per beat: spend the process's other jobs (and other workers') recorded meanwhile
    lowers it, and an admin's new limit reaches running jobs within one beat."""
    with jobs.db.engine.connect() as connection:
        found = budgets.budgets_of(connection, {ctx.claim.owner for ctx in running})
    for ctx in running:
        if (budget := found.get(ctx.claim.owner)) is not None:
            ctx.tenant_limit = budget.tightest()
