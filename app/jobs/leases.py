"""Per worker process: the jobs it runs, one heartbeat that renews all their leases in a single
UPDATE, and one Redis subscription that delivers cancellations at once.

The heartbeat also carries cancellation (the `cancel_requested_at` column), so a cancel whose
Redis message was lost still arrives within one heartbeat.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING

import redis
from flask import Flask

from app.jobs import service
from app.jobs.events import CANCEL_CHANNEL
from app.runtime import runtime

if TYPE_CHECKING:
    from app.jobs.context import JobContext

logger = logging.getLogger(__name__)


class ActiveJobs:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[uuid.UUID, JobContext] = {}
        self._started = False

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

    def ensure_started(self, app: Flask) -> None:
        """Starts the heartbeat and the cancel listener on first use, in the process that runs
        jobs (never at import, and after a prefork child has forked)."""
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
            threading.Thread(target=target, args=(app,), name=name, daemon=True).start()

    def _heartbeat(self, app: Flask) -> None:
        with app.app_context():
            interval = runtime().settings.heartbeat_seconds
            while True:
                time.sleep(interval)
                try:
                    self.renew_all()
                except Exception:
                    # A database outage must not kill the heartbeat; leases may lapse and the
                    # sweeper will recover those jobs, which is the designed outcome.
                    logger.exception("lease renewal failed")

    def renew_all(self) -> None:
        jobs = self.snapshot()
        if not jobs:
            return
        alive = service.renew_leases([(ctx.job_id, ctx.attempt) for ctx in jobs])
        now = time.monotonic()
        for ctx in jobs:
            if now > ctx.deadline:
                ctx.time_out()
            state = alive.get(ctx.job_id)
            if state is None:
                if not ctx.done:  # a finished attempt rightly holds no lease any more
                    logger.warning("lease lost", extra={"job_id": ctx.job_id})
                    ctx.lose_lease()
            elif state.cancel_requested:
                ctx.request_cancel()

    def _listen_for_cancels(self, app: Flask) -> None:
        with app.app_context():
            rt = runtime()
            while True:
                client = redis.Redis.from_url(
                    rt.settings.redis_url, socket_connect_timeout=2, health_check_interval=10
                )
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
