"""Operators' endpoints: liveness, readiness, the health of the whole system, statistics.

Three probes for three questions (see docs/architecture.md, "Operating it"):
- /live: does this process answer? Touches nothing, so a dependency outage never gets a
  healthy process restarted. The compose healthcheck and the dispatch benchmark's floor.
- /ready: can this process serve? PostgreSQL and Redis answer; 503 if not, so a balancer
  routes around it.
- /health: what is the whole system doing? Stores, workers, sweeper, queue, failures. Always
  200 once the process answers: it reports outages in its body rather than failing.
"""

from __future__ import annotations

from flask import Blueprint, Response

from app.api.auth import current_principal
from app.api.health import monitor
from app.api.schemas import BudgetOut, Health, Live, Ready, Stats
from app.api.spec import json_response, operation
from app.api.stats_cache import stats_cache
from app.jobs import budgets
from app.runtime import runtime

bp = Blueprint("system", __name__)

NO_STORE = {"Cache-Control": "no-store"}


@bp.get("/live")
@operation(
    summary="Liveness",
    auth=False,
    tag="operations",
    responses={200: (Live, "The process answers")},
)
def live() -> Response:
    """Touches no dependency: restart a process only if this fails."""
    return json_response(Live())


@bp.get("/ready")
@operation(
    summary="Readiness",
    auth=False,
    tag="operations",
    responses={
        200: (Ready, "healthy: this process reaches PostgreSQL and Redis"),
        503: (Ready, "unhealthy: PostgreSQL or Redis does not answer"),
    },
)
def ready() -> Response:
    """Whether this process can serve. Checks run at most once per
    `CONVEYOR_HEALTH_MAX_AGE` seconds per process, shared by every caller meanwhile; an
    answer takes at most `CONVEYOR_READY_TIMEOUT` seconds. Workers are not checked: their
    absence queues jobs but does not stop this process from serving (see /health)."""
    answer = monitor().readiness()
    return json_response(answer, 200 if answer.status == "healthy" else 503, NO_STORE)


@bp.get("/health")
@operation(
    summary="Health of the system",
    auth=False,
    tag="operations",
    responses={200: (Health, "The system as this process sees it, outages included")},
)
def health() -> Response:
    """PostgreSQL and Redis, workers (from their heartbeats), the sweeper (its last sweep),
    queue depth and the last hour's failures by error code. Figures are at most
    `CONVEYOR_HEALTH_MAX_AGE` seconds old, the answer takes at most
    `CONVEYOR_READY_TIMEOUT` seconds, and a dependency that is down is reported in the
    body (`status: down`), never as an error."""
    return json_response(monitor().health(), headers=NO_STORE)


@bp.get("/stats")
@operation(
    summary="Job statistics for the caller",
    tag="operations",
    responses={200: (Stats, "Counts, tokens, cost and durations")},
)
def stats() -> Response:
    """Counts and totals over all the caller's jobs, computed at most once per
    `CONVEYOR_STATS_MAX_AGE` seconds per web process and shared by every caller meanwhile
    (`as_of` says when); the budget is read fresh."""
    session, owner = runtime().db.request_session, current_principal().owner
    data = stats_cache().of(owner)
    budget = BudgetOut(**BudgetOut.fields_of(budgets.budget_of(session, owner)))
    return json_response(Stats(**data, budget=budget))
