"""Budgets at the API: the admin's tenant settings (spend limits, dispatch weight and
concurrency cap, retention), and the check of a job's estimated cost against its own
`max_cost_usd` and its owner's remaining budget at submit."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from flask import Blueprint, Response
from sqlalchemy.orm import Session

from app.api.problems import ApiProblem, FieldError
from app.api.schemas import TenantOut, TenantPut, usd
from app.api.spec import json_response, operation
from app.jobs import budgets, fairness
from app.keys.api_keys import ADMIN
from app.kinds import Kind
from app.runtime import runtime

bp = Blueprint("tenants", __name__)

BUDGET_EXCEEDED = (
    "`budget-exceeded`: the estimated cost passes `max_cost_usd` or the owner's budget left; "
    "`limit` (max_cost_usd, daily, monthly), `remaining_usd` and `estimate_usd` say which"
)
OWNER_PATH = "/admin/tenants/<string(maxlength=200):owner>"


@bp.get(OWNER_PATH)
@operation(
    summary="Get a tenant's budgets, spend, dispatch window and retention",
    tag="admin",
    scope=ADMIN,
    responses={200: (TenantOut, "Its limits (null: none) and what it spent today and this month")},
)
def get_tenant(owner: str) -> Response:
    """An owner nobody has set limits for is shown without limits (every field null)."""
    session = runtime().db.request_session
    return json_response(_tenant_out(session, owner))


@bp.put(OWNER_PATH)
@operation(
    summary="Set a tenant's budgets, dispatch weight, concurrency cap and retention",
    tag="admin",
    scope=ADMIN,
    body=TenantPut,
    responses={200: (TenantOut, "The tenant's settings, as stored, and its spend")},
)
def put_tenant(owner: str, body: TenantPut) -> Response:
    """Replaces the owner's settings: a budget left out or null is no limit, a weight 1, a
    cap the deployment's default, a retention the deployment's default. Budgets take effect at
    once for new jobs, and for running ones within one worker heartbeat; a raised window or
    cap releases held jobs at once, a lowered one binds as the tenant's published jobs finish;
    a retention applies at the next retention run."""
    with runtime().db.transaction() as session:
        budgets.put_tenant(session, owner, body.model_dump())
    runtime().intake.release_quietly([owner])
    return json_response(_tenant_out(runtime().db.request_session, owner))


def _tenant_out(session: Session, owner: str) -> TenantOut:
    tenant = budgets.get_tenant(session, owner)
    dispatch = fairness.tenant_dispatch(session, owner, runtime().intake.window.params())
    default_retention = runtime().settings.retention_days
    budget = budgets.budget_of(session, owner)
    return TenantOut.of(owner, tenant, budget, dispatch, default_retention)


# The check at submit ---------------------------------------------------------------------------


def estimate(kind: Kind, job_input: dict[str, Any], model: str, models: dict[str, str]) -> Decimal:
    """The job's estimated cost at most: its input and max_tokens, once per step."""
    settings = runtime().settings
    return budgets.estimate_job(
        runtime().model_client.prices,
        job_input,
        [model, *models.values()],
        calls=max(1, len(kind.steps)),
        default_output_tokens=settings.budget_default_output_tokens,
    ).cost_usd


def owner_budget(owner: str) -> budgets.Budget:
    return budgets.budget_of(runtime().db.request_session, owner)


def budget_problem(refusal: budgets.Refusal, field_prefix: str = "") -> ApiProblem:
    """402 `budget-exceeded`: naming the job's `max_cost_usd` field, or the owner's limit."""
    if refusal.field is not None:
        what = f"its max_cost_usd ({usd(refusal.remaining)})"
        errors = [
            FieldError(
                field=f"{field_prefix}{refusal.field}",
                message=f"the job is estimated at up to {usd(refusal.estimate)} US dollars, "
                f"more than {usd(refusal.remaining)}",
            )
        ]
    else:
        what = f"the {refusal.limit} budget's remaining {usd(refusal.remaining)}"
        errors = None
    return ApiProblem(
        402,
        "budget-exceeded",
        "The job would pass a budget",
        f"estimated at up to {usd(refusal.estimate)} US dollars, more than {what}",
        errors,
        extra={
            "limit": refusal.limit,
            "remaining_usd": usd(refusal.remaining),
            "estimate_usd": usd(refusal.estimate),
        },
    )
