"""GET /metrics: Prometheus' scrape of a web process, and the pool's gauges.

The counters and histograms are recorded where things happen (app/metrics.py) in every process;
a scrape of any gunicorn worker reads all of this host's web processes through the multiprocess
directory. The gauges of the whole pool (queue depth by priority, running jobs, live workers,
the last sweep) are read here, at scrape time, from PostgreSQL and Redis: this is the one place
that computes them. Each web process reads them at most once per
`CONVEYOR_METRICS_POOL_MAX_AGE` seconds, however often it is scraped, and a scrape waits for them
at most `CONVEYOR_READY_TIMEOUT` seconds (then they are left out, and
`conveyor_pool_gauges_up` says 0).

The endpoint is not public: it answers only a request bearing `CONVEYOR_METRICS_TOKEN`
(401 otherwise), and without that setting it answers 404: metrics are off.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from flask import Blueprint, Flask, Response, current_app, request
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import text

from app import metrics
from app.api.problems import ApiProblem
from app.jobs import presence, transitions
from app.jobs.presence import SweepRecord, WorkerBeat
from app.runtime import Runtime, runtime, runtime_of
from app.shared_result import SharedResult

logger = logging.getLogger(__name__)

bp = Blueprint("metrics", __name__)
EXTENSION_KEY = "conveyor.metrics"
# The API's priorities (JobIn.priority): every one has a series, zero when nothing waits.
PRIORITIES = range(10)
POOL_STATEMENT_TIMEOUT_MS = 5000


@dataclass(frozen=True)
class PoolFigures:
    queued: dict[int, int]
    running: int
    beats: list[WorkerBeat]
    sweep: SweepRecord | None


class PoolCollector(Collector):
    """The pool's gauges, from one shared, cached read (app/shared_result.py)."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        settings = runtime.settings
        self._timeout = settings.ready_timeout
        self._figures = SharedResult(self._read, settings.metrics_pool_max_age, "metrics-pool")

    def _read(self) -> PoolFigures:
        with self._runtime.db.transaction() as session:
            session.execute(text(f"SET LOCAL statement_timeout = {POOL_STATEMENT_TIMEOUT_MS}"))
            queued = transitions.queued_by_priority(session)
            _, running = transitions.queue_depth(session)
        with self._runtime.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(presence.WORKERS_KEY)
            pipe.get(presence.SWEEP_KEY)
            raw_beats, raw_sweep = pipe.execute()
        beats, _ = presence.read_worker_beats(raw_beats, time.time())
        return PoolFigures(queued, running, beats, presence.read_sweep(raw_sweep))

    def collect(self) -> Iterator[Metric]:
        future = self._figures.current()
        try:
            figures = future.result(timeout=self._timeout)
        except Exception as exc:  # a timeout, or what the read raised
            logger.warning("pool gauges left out of the scrape: %s", exc or type(exc).__name__)
            figures = None
        up = GaugeMetricFamily(
            "conveyor_pool_gauges_up",
            "1 if this scrape's pool gauges were read from PostgreSQL and Redis, else 0.",
            value=0 if figures is None else 1,
        )
        yield up
        if figures is None:
            return
        yield from _pool_families(figures, time.time())


def _pool_families(figures: PoolFigures, now: float) -> Iterable[Metric]:
    queued = GaugeMetricFamily(
        "conveyor_jobs_queued",
        "Jobs waiting in status queued (held and scheduled ones too), by priority.",
        labels=["priority"],
    )
    for priority in sorted(set(PRIORITIES) | set(figures.queued)):
        queued.add_metric([str(priority)], figures.queued.get(priority, 0))
    yield queued
    yield GaugeMetricFamily(
        "conveyor_jobs_running", "Jobs in status running.", value=figures.running
    )
    live = [beat for beat in figures.beats if beat.alive(now)]
    yield GaugeMetricFamily(
        "conveyor_workers",
        "Job worker processes with a recent heartbeat (webhook-only workers run no job).",
        value=len(live),
    )
    yield GaugeMetricFamily(
        "conveyor_worker_slots",
        "Job slots of the live workers (their concurrency).",
        value=sum(beat.concurrency for beat in live),
    )
    if figures.sweep is not None:
        yield GaugeMetricFamily(
            "conveyor_sweeper_last_sweep_timestamp_seconds",
            "When the last sweep ended (Unix time); absent before the first sweep.",
            value=figures.sweep.at,
        )
        yield GaugeMetricFamily(
            "conveyor_sweeper_interval_seconds",
            "How often beat schedules a sweep, as the last sweep recorded it.",
            value=figures.sweep.interval,
        )


@bp.get("/metrics")
def scrape() -> Response:
    """Prometheus' text format (or OpenMetrics, as the scraper's Accept header asks)."""
    token = runtime().settings.metrics_token
    if token is None:
        raise ApiProblem(
            404, "not-found", "Not Found", "metrics are off: set CONVEYOR_METRICS_TOKEN"
        )
    if not metrics.token_matches(request.headers.get("Authorization"), token):
        raise ApiProblem(
            401,
            "unauthorized",
            "Unauthorized",
            "send Authorization: Bearer <CONVEYOR_METRICS_TOKEN>",
            headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
        )
    encoder, content_type = choose_encoder(request.headers.get("Accept"))
    registry = metrics.process_registry([current_app.extensions[EXTENSION_KEY]])
    return Response(
        encoder(registry), headers={"Content-Type": content_type, "Cache-Control": "no-store"}
    )


def init_app(app: Flask) -> None:
    """At the root, where Prometheus looks by default, not under /api/v1."""
    app.extensions[EXTENSION_KEY] = PoolCollector(runtime_of(app))
    app.register_blueprint(bp)
