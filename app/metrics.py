"""Prometheus metrics: every metric Conveyor exports, defined once, and the one-line helpers
that record them where the thing happens (docs/metrics.md lists each and its source).

Web processes run under gunicorn with several workers, so their metrics live in
prometheus_client's multiprocess mode: `PROMETHEUS_MULTIPROC_DIR` is set (by
app/gunicorn_config.py) before this module is first imported, each process writes its values to
files there, and a scrape of any process reads them all. A Celery worker with the gevent or
threads pool is one process and keeps its values in memory; a prefork worker uses the
multiprocess mode when the operator sets the directory.

Label values are bounded: kinds, statuses, error codes, event types, models and priorities come
from the code or the configuration, never from a request, and no label carries a job id. The
tenant is a label value only when `CONVEYOR_METRICS_TENANT_LABEL` is on (bounded by the number
of tenants); otherwise it is empty, which Prometheus treats as no label at all.

Recording is cheap on purpose: a token delta counts one event (a counter increment, about a
microsecond; docs/metrics.md gives the measured cost), and nothing here does I/O.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
from collections.abc import Callable, Iterable
from datetime import datetime
from decimal import Decimal
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    multiprocess,
)
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app
from prometheus_client.registry import REGISTRY, Collector

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Seconds; from a fast queue hand-off to a stuck one (the sweeper's grace is tens of seconds).
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)
# Seconds; model jobs run from under a second to the hard time limit (minutes).
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
# Seconds; one model call, and its first token.
CALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30)

JOBS_CREATED = Counter(
    "conveyor_jobs_created_total", "Jobs stored by POST /jobs and batches.", ["kind", "tenant"]
)
JOBS_FINISHED = Counter(
    "conveyor_jobs_finished_total",
    "Jobs that reached a terminal status (succeeded, failed, canceled).",
    ["kind", "status", "tenant"],
)
JOB_DURATION = Histogram(
    "conveyor_job_duration_seconds",
    "From a job's first start to its end (the API's duration_seconds), for jobs that started.",
    ["kind", "status"],
    buckets=DURATION_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "conveyor_job_queue_wait_seconds",
    "From when a job could run (created, its run_at, or its retry time) to a worker's claim.",
    ["kind"],
    buckets=WAIT_BUCKETS,
)
RETRIES = Counter(
    "conveyor_job_retries_total",
    "Attempts that ended in a retry, by the error code that caused it.",
    ["kind", "code"],
)
LEASE_RECOVERIES = Counter(
    "conveyor_lease_recoveries_total",
    "Running jobs whose lease expired, taken back by the sweeper, by what became of them.",
    ["outcome"],
)
SWEEPS = Counter("conveyor_sweeps_total", "Sweeps run (the sweeper beat task).")
MODEL_CALLS = Histogram(
    "conveyor_model_call_duration_seconds",
    "One model call, from request to its last byte, by model and outcome (ok or error code).",
    ["model", "outcome"],
    buckets=CALL_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "conveyor_model_time_to_first_token_seconds",
    "From a streamed call's request to its first token, for calls that streamed one.",
    ["model", "outcome"],
    buckets=TTFT_BUCKETS,
)
MODEL_TOKENS = Counter(
    "conveyor_model_tokens_total",
    "Tokens of model calls as billed (type: input or output).",
    ["model", "type", "tenant"],
)
MODEL_COST = Counter(
    "conveyor_model_cost_usd_total",
    "What model calls cost, in US dollars, by the configured prices.",
    ["model", "tenant"],
)
EVENTS_PUBLISHED = Counter(
    "conveyor_events_published_total",
    "Job events accepted by their stream and sent to Socket.IO, by type.",
    ["type"],
)
SOCKETIO_CLIENTS = Gauge(
    "conveyor_socketio_clients",
    "Socket.IO connections open on the web processes.",
    multiprocess_mode="livesum",
)

_options = {"tenant_label": False}


def configure(*, tenant_label: bool) -> None:
    """The deployment's choices (create_app calls this once per process)."""
    _options["tenant_label"] = tenant_label
    # A `_created` gauge per counter series doubles a single-process scrape for a figure
    # Prometheus does not use (the multiprocess mode never sends them).
    disable_created_metrics()


def _tenant(owner: str | None) -> str:
    return (owner or "") if _options["tenant_label"] else ""


# Recording: one call where the thing happens --------------------------------------------------


def job_created(kind: str, owner: str) -> None:
    JOBS_CREATED.labels(kind, _tenant(owner)).inc()


def job_finished(
    kind: str, status: str, owner: str, started_at: datetime | None, finished_at: datetime
) -> None:
    JOBS_FINISHED.labels(kind, status, _tenant(owner)).inc()
    if started_at is not None:
        seconds = max(0.0, (finished_at - started_at).total_seconds())
        JOB_DURATION.labels(kind, status).observe(seconds)


def job_claimed(kind: str, waited_seconds: float | None) -> None:
    if waited_seconds is not None:
        QUEUE_WAIT.labels(kind).observe(max(0.0, waited_seconds))


def job_retried(kind: str, code: str) -> None:
    RETRIES.labels(kind, code).inc()


def lease_recovered(outcome: str) -> None:
    LEASE_RECOVERIES.labels(outcome).inc()


def swept() -> None:
    SWEEPS.inc()


def model_call(row: dict[str, Any], owner: str) -> None:
    """A `model_calls` row (CallRecord.as_row): its latency, first token, tokens and cost."""
    model, outcome = row["model"], row["outcome"]
    MODEL_CALLS.labels(model, outcome).observe(row["latency_ms"] / 1000)
    if row["ttft_ms"] is not None:
        TIME_TO_FIRST_TOKEN.labels(model, outcome).observe(row["ttft_ms"] / 1000)
    tenant = _tenant(owner)
    if row["tokens_in"]:
        MODEL_TOKENS.labels(model, "input", tenant).inc(row["tokens_in"])
    if row["tokens_out"]:
        MODEL_TOKENS.labels(model, "output", tenant).inc(row["tokens_out"])
    cost: Decimal | None = row["cost_usd"]
    if cost:
        MODEL_COST.labels(model, tenant).inc(float(cost))


def events_published(types: Iterable[str]) -> None:
    for event_type in types:
        EVENTS_PUBLISHED.labels(event_type).inc()


def socketio_connected() -> None:
    SOCKETIO_CLIENTS.inc()


def socketio_disconnected() -> None:
    SOCKETIO_CLIENTS.dec()


# Exposition -----------------------------------------------------------------------------------


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def process_registry(extra: Iterable[Collector] = ()) -> CollectorRegistry:
    """What this process serves: every process's values when in multiprocess mode (a registry
    made for the scrape, as prometheus_client requires), else this process's own; plus
    `extra` collectors (the pool's gauges, app/api/metrics.py)."""
    if multiprocess_dir() is None and not extra:
        return REGISTRY
    registry = CollectorRegistry()
    if multiprocess_dir() is not None:
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_Forward(REGISTRY))
    for collector in extra:
        registry.register(collector)
    return registry


class _Forward(Collector):
    """The default registry inside another one (its process and platform collectors too)."""

    def __init__(self, source: CollectorRegistry) -> None:
        self._source = source

    def collect(self) -> Iterable[Any]:
        return self._source.collect()


def process_exited(pid: int) -> None:
    """A process of a multiprocess group is gone: its live gauges stop counting (gunicorn's
    child_exit, Celery's worker_process_shutdown)."""
    if multiprocess_dir() is not None:
        multiprocess.mark_process_dead(pid)


def token_matches(header: str | None, token: str) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time."""
    scheme, _, given = (header or "").partition(" ")
    # As bytes: compare_digest refuses a str that is not ASCII, which a header may well be.
    matches = hmac.compare_digest(given.strip().encode(), token.encode())
    return scheme.lower() == "bearer" and matches


def _guarded(app: Callable, token: str | None) -> Callable:
    def guarded(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        if token is not None and not token_matches(environ.get("HTTP_AUTHORIZATION"), token):
            body = (
                b'{"type":"/problems/unauthorized","title":"Unauthorized","status":401,'
                b'"detail":"send Authorization: Bearer <CONVEYOR_METRICS_TOKEN>"}'
            )
            start_response(
                "401 Unauthorized",
                [
                    ("Content-Type", "application/problem+json"),
                    ("WWW-Authenticate", 'Bearer realm="metrics"'),
                ],
            )
            return [body]
        return app(environ, start_response)

    return guarded


LOOPBACK = ("127.0.0.1", "::1", "localhost")


class _QuietHandler(WSGIRequestHandler):
    """The standard library's handler writes a line per request to stderr, past the logging
    configuration (and not as JSON): one per scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_worker_metrics(host: str, port: int, token: str | None) -> WSGIServer | None:
    """A worker host's /metrics on its own port, on a daemon thread (a greenlet under gevent's
    patching). Without a token it binds only to a loopback address: every process on the
    machine may read it, nobody else."""
    if token is None and host not in LOOPBACK:
        logger.error(
            "worker metrics not served: binding %s needs CONVEYOR_METRICS_TOKEN "
            "(or bind a loopback address)",
            host,
        )
        return None

    def scrape(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        # A registry per scrape: the multiprocess collector reads the files present now.
        return make_wsgi_app(process_registry())(environ, start_response)

    server = make_server(
        host,
        port,
        _guarded(scrape, token),
        server_class=ThreadingWSGIServer,
        handler_class=_QuietHandler,
    )
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    logger.info("worker metrics on http://%s:%d/metrics", host, server.server_port)
    return server
