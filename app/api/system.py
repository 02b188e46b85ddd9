"""Operators' endpoints: liveness, readiness, statistics."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from flask import Response, current_app
from sqlalchemy import text

from app.api.auth import current_principal
from app.api.spec import Api, json_response
from app.jobs import service
from app.jobs.schemas import Health, Ready, ReadyCheck, Stats
from app.runtime import Runtime, runtime

# Readiness checks run in parallel on a small shared pool so that one stalled dependency
# costs the probe its timeout, not the sum of all timeouts.
_probes = ThreadPoolExecutor(max_workers=6, thread_name_prefix="ready-probe")


def register(api: Api) -> None:
    @api.operation(
        "/health",
        "GET",
        summary="Liveness",
        auth=False,
        tag="operations",
        responses={200: (Health, "The process answers")},
    )
    def health() -> Response:
        """Touches no dependency: a load balancer restarts a process only if this fails."""
        return json_response(Health(status="ok"))

    @api.operation(
        "/ready",
        "GET",
        summary="Readiness",
        auth=False,
        tag="operations",
        responses={
            200: (Ready, "healthy or degraded"),
            503: (Ready, "unhealthy: the database or the broker is down"),
        },
    )
    def ready() -> Response:
        rt = runtime()
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        checks = _run_checks(rt, app, rt.settings.ready_timeout)
        if not (checks["database"].ok and checks["broker"].ok):
            status = "unhealthy"
        elif not checks["workers"].ok:
            status = "degraded"
        else:
            status = "healthy"
        return json_response(
            Ready(status=status, checks=checks), 503 if status == "unhealthy" else 200
        )

    @api.operation(
        "/stats",
        "GET",
        summary="Job statistics for the caller",
        tag="operations",
        responses={200: (Stats, "Counts, tokens, cost and durations")},
    )
    def stats() -> Response:
        data = service.job_stats(runtime().db.request_session, current_principal().owner)
        return json_response(Stats(**data))


def _run_checks(rt: Runtime, app: object, timeout: float) -> dict[str, ReadyCheck]:
    probes: dict[str, Callable[[], str | None]] = {
        "database": lambda: _check_database(rt),
        "broker": lambda: _check_broker(rt),
        "workers": lambda: _check_workers(rt, timeout * 0.8),
    }
    futures = {name: _probes.submit(_timed, probe) for name, probe in probes.items()}
    deadline = time.monotonic() + timeout
    results = {}
    for name, future in futures.items():
        try:
            results[name] = future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            results[name] = ReadyCheck(ok=False, detail=f"no answer within {timeout:g} s")
    return results


def _timed(probe: Callable[[], str | None]) -> ReadyCheck:
    started = time.perf_counter()
    try:
        detail = probe()
    except Exception as exc:
        return ReadyCheck(ok=False, detail=f"{type(exc).__name__}: {exc}"[:300])
    latency = round((time.perf_counter() - started) * 1000, 2)
    return ReadyCheck(ok=True, detail=detail, latency_ms=latency)


def _check_database(rt: Runtime) -> str | None:
    with rt.db.transaction() as session:
        session.execute(text("SET LOCAL statement_timeout = 1000"))
        session.execute(text("SELECT 1"))
    return None


def _check_broker(rt: Runtime) -> str | None:
    rt.redis.ping()
    return None


def _check_workers(rt: Runtime, timeout: float) -> str | None:
    replies = rt.celery.control.ping(timeout=timeout)
    if not replies:
        raise RuntimeError("no worker answered a ping")
    return f"{len(replies)} worker(s) answered"
