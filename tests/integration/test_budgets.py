"""Budgets: a job's max_cost_usd and its owner's daily and monthly limits, checked at submit
against an estimate and held while the job streams; spend and what is left in /stats; the
admin's tenant settings. Real PostgreSQL, Redis, worker and simulator."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa

from app.models import ModelCall, TenantSpend
from app.runtime import runtime
from tests.conftest import Tenant, put_tenant

pytestmark = pytest.mark.usefixtures("worker")

# The test configuration's model is gpt-4o-mini: $0.60 per million output tokens. A job that
# sets no max_tokens is estimated at 1,024 output tokens (about $0.00062 with its input).
LONG = "[[sim tokens=3000 tps=3000]] write at length"


def post_job(tenant: Tenant, job_input: dict[str, Any], **fields: Any) -> Any:
    return tenant.post("/api/v1/jobs", json={"kind": "chat", "input": job_input, **fields})


def calls_of(job_id: str) -> list[ModelCall]:
    with runtime().db.transaction() as session:
        statement = sa.select(ModelCall).where(ModelCall.job_id == uuid.UUID(job_id))
        return list(session.scalars(statement))


# At submit ------------------------------------------------------------------------------------


def test_a_job_estimated_over_its_max_cost_is_refused_naming_the_field(tenant: Tenant) -> None:
    response = post_job(tenant, {"prompt": "hi", "max_tokens": 4000}, max_cost_usd="0.0001")
    assert response.status_code == 402
    problem = response.get_json()
    assert response.content_type == "application/problem+json"
    assert problem["type"] == "/problems/budget-exceeded"
    assert problem["limit"] == "max_cost_usd"
    assert problem["errors"][0]["field"] == "max_cost_usd"
    # 4,000 tokens at $0.60 a million, and the input's few.
    assert Decimal(problem["estimate_usd"]) > Decimal("0.0024")
    assert problem["remaining_usd"] == "0.00010000"
    # Within it, the same job is taken, and shows its limit.
    job = post_job(tenant, {"prompt": "hi", "max_tokens": 100}, max_cost_usd="0.0001").get_json()
    assert job["max_cost_usd"] == "0.00010000"


@pytest.mark.parametrize(
    "value", ["abc", "-1", "0", "0.000000001", "100001", True, [1], {"usd": 1}]
)
def test_a_bad_max_cost_is_a_422_naming_it(tenant: Tenant, value: Any) -> None:
    response = post_job(tenant, {"prompt": "hi"}, max_cost_usd=value)
    assert response.status_code == 422, response.get_json()
    assert [e["field"] for e in response.get_json()["errors"]] == ["max_cost_usd"]


def test_max_cost_is_part_of_the_idempotency_fingerprint_only_when_given(tenant: Tenant) -> None:
    key = {"Idempotency-Key": uuid.uuid4().hex}
    body = {"kind": "chat", "input": {"prompt": "[[sim tokens=3]] hi"}}
    first = tenant.post("/api/v1/jobs", json=body, headers=key)
    assert first.status_code == 202
    assert tenant.post("/api/v1/jobs", json=body, headers=key).status_code == 200
    other = tenant.post("/api/v1/jobs", json=body | {"max_cost_usd": "0.5"}, headers=key)
    assert other.status_code == 422
    key = {"Idempotency-Key": uuid.uuid4().hex}
    assert (
        tenant.post("/api/v1/jobs", json=body | {"max_cost_usd": "0.5"}, headers=key).status_code
        == 202
    )
    same = tenant.post("/api/v1/jobs", json=body | {"max_cost_usd": 0.50}, headers=key)
    assert same.status_code == 200


def test_a_tenant_budget_used_by_earlier_jobs_refuses_the_next(
    admin: Tenant, tenant: Tenant
) -> None:
    job = tenant.wait_for(tenant.submit("chat", {"prompt": "[[sim tokens=200]] spend"})["id"])
    assert job["status"] == "succeeded"
    spent = Decimal(job["usage"]["cost_usd"])
    assert spent > 0
    budget = tenant.get("/api/v1/stats").get_json()["budget"]
    assert Decimal(budget["spent_today_usd"]) == spent
    assert Decimal(budget["spent_month_usd"]) == spent
    assert budget["daily_budget_usd"] is None and budget["remaining_today_usd"] is None

    # A daily budget a little above what was spent: the next job's estimate passes it.
    daily = spent + Decimal("0.0001")
    assert put_tenant(admin, tenant.owner, daily_budget_usd=str(daily)).status_code == 200
    response = post_job(tenant, {"prompt": "more"})
    assert response.status_code == 402
    problem = response.get_json()
    assert problem["type"] == "/problems/budget-exceeded"
    assert problem["limit"] == "daily"
    assert problem["remaining_usd"] == "0.00010000"
    assert "errors" not in problem
    # A small job still fits; so does everything under a higher monthly limit alone.
    assert post_job(tenant, {"prompt": "[[sim tokens=3]] a", "max_tokens": 5}).status_code == 202
    stats = tenant.get("/api/v1/stats").get_json()["budget"]
    assert stats["daily_budget_usd"] == f"{daily:.8f}"
    assert Decimal(stats["remaining_today_usd"]) <= Decimal("0.0001")

    # A retry is checked as a new job is.
    retry = tenant.post(f"/api/v1/jobs/{job['id']}/retry")
    assert retry.status_code == 409  # it succeeded: nothing to retry
    put_tenant(admin, tenant.owner, monthly_budget_usd=str(spent))
    refused = post_job(tenant, {"prompt": "more"}).get_json()
    assert refused["limit"] == "monthly" and refused["remaining_usd"] == "0.00000000"


def test_a_batch_is_refused_when_its_items_together_pass_the_budget(
    admin: Tenant, tenant: Tenant
) -> None:
    put_tenant(admin, tenant.owner, daily_budget_usd="0.001")
    one = {"kind": "chat", "input": {"prompt": "[[sim tokens=3]] x"}}
    ok = tenant.post("/api/v1/batches", json={"items": [one]})
    assert ok.status_code == 202
    many = tenant.post("/api/v1/batches", json={"items": [one] * 3})
    assert many.status_code == 402
    assert many.get_json()["limit"] == "daily"
    own = tenant.post("/api/v1/batches", json={"items": [one, one | {"max_cost_usd": "0.00001"}]})
    assert own.status_code == 402
    assert own.get_json()["errors"][0]["field"] == "items[1].max_cost_usd"


# While streaming ------------------------------------------------------------------------------


def test_a_streaming_job_is_stopped_at_its_max_cost_with_its_partial_output(
    tenant: Tenant,
) -> None:
    # Estimated (1,024 tokens) under the limit; it streams 3,000 and is stopped near 1,300.
    limit = Decimal("0.0008")
    created = tenant.submit("chat", {"prompt": LONG}, max_cost_usd=str(limit))
    job = tenant.wait_for(created["id"])
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "budget_exceeded"
    assert "max_cost_usd" in job["error"]["message"]
    result = tenant.get(f"/api/v1/jobs/{job['id']}/result").get_json()
    partial = result["output"]["partial_text"]
    assert 0 < len(partial.split()) < 3000
    calls = calls_of(job["id"])
    assert [call.outcome for call in calls] == ["budget_exceeded"]
    # Its usage is kept: what it streamed, at the table's price, a hair over the limit.
    assert 1000 < calls[0].tokens_out < 1500
    cost = Decimal(job["usage"]["cost_usd"])
    assert limit < cost < limit + Decimal("0.0001")


@pytest.mark.parametrize("period", ["daily", "monthly"])
def test_a_streaming_job_is_stopped_when_its_owner_passes_a_budget(
    admin: Tenant, tenant: Tenant, period: str
) -> None:
    put_tenant(admin, tenant.owner, **{f"{period}_budget_usd": "0.0008"})
    job = tenant.wait_for(tenant.submit("chat", {"prompt": LONG})["id"])
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "budget_exceeded"
    assert period in job["error"]["message"]
    assert tenant.get(f"/api/v1/jobs/{job['id']}/result").get_json()["output"]["partial_text"]
    assert Decimal("0.0008") < Decimal(job["usage"]["cost_usd"]) < Decimal("0.0009")
    budget = tenant.get("/api/v1/stats").get_json()["budget"]
    assert Decimal(budget["spent_today_usd"]) == Decimal(job["usage"]["cost_usd"])
    remaining = "remaining_today_usd" if period == "daily" else "remaining_month_usd"
    assert budget[remaining] == "0.00000000"
    # Used up: the next job is refused at submit.
    assert post_job(tenant, {"prompt": "x", "max_tokens": 1}).status_code == 402


def test_spend_counts_every_call_even_a_lease_lost_one(tenant: Tenant) -> None:
    """The counter is written by the statement that records the calls, from the same rows."""
    job = tenant.wait_for(tenant.submit("chat", {"prompt": "[[sim tokens=50]] count"})["id"])
    with runtime().db.transaction() as session:
        spend = session.scalars(
            sa.select(TenantSpend).where(TenantSpend.owner == tenant.owner)
        ).all()
    assert [row.cost_usd for row in spend] == [Decimal(job["usage"]["cost_usd"])]


# The admin's tenant settings ------------------------------------------------------------------


def test_tenant_budgets_are_set_and_read_by_an_admin_only(admin: Tenant, tenant: Tenant) -> None:
    path = f"/api/v1/admin/tenants/{tenant.owner}"
    shown = admin.get(path).get_json()
    assert shown["owner"] == tenant.owner
    assert shown["daily_budget_usd"] is None and shown["created_at"] is None
    stored = put_tenant(admin, tenant.owner, daily_budget_usd="5", monthly_budget_usd=100)
    assert stored.status_code == 200
    body = stored.get_json()
    assert body["daily_budget_usd"] == "5.00000000"
    assert body["monthly_budget_usd"] == "100.00000000"
    assert body["remaining_today_usd"] == "5.00000000"
    assert admin.get(path).get_json()["monthly_budget_usd"] == "100.00000000"
    # Replaced as a whole: a field left out is no limit.
    assert (
        put_tenant(admin, tenant.owner, daily_budget_usd="1").get_json()["monthly_budget_usd"]
        is None
    )

    assert tenant.get(path).status_code == 403
    forbidden = tenant.client.put(path, headers=tenant.headers, json={})
    assert forbidden.status_code == 403
    assert forbidden.get_json()["type"] == "/problems/insufficient-scope"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"daily_budget_usd": "-1"}, "daily_budget_usd"),
        ({"daily_budget_usd": "lots"}, "daily_budget_usd"),
        ({"monthly_budget_usd": "1.123456789"}, "monthly_budget_usd"),
        ({"monthly_budget_usd": "1e9"}, "monthly_budget_usd"),
        ({"retention_days": -1}, "retention_days"),
    ],
)
def test_a_bad_budget_is_a_422_naming_the_field(
    admin: Tenant, tenant: Tenant, body: dict[str, Any], field: str
) -> None:
    response = put_tenant(admin, tenant.owner, **body)
    assert response.status_code == 422, response.get_json()
    assert [e["field"] for e in response.get_json()["errors"]] == [field]


def test_a_retry_is_checked_against_the_budget_left(admin: Tenant, tenant: Tenant) -> None:
    created = tenant.submit("chat", {"prompt": LONG}, max_cost_usd="0.0008")
    failed = tenant.wait_for(created["id"])
    assert failed["error"]["code"] == "budget_exceeded"
    put_tenant(admin, tenant.owner, daily_budget_usd=failed["usage"]["cost_usd"])
    refused = tenant.post(f"/api/v1/jobs/{failed['id']}/retry")
    assert refused.status_code == 402
    assert refused.get_json()["limit"] == "daily"
    put_tenant(admin, tenant.owner)
    retried = tenant.post(f"/api/v1/jobs/{failed['id']}/retry")
    assert retried.status_code == 202
    assert retried.get_json()["max_cost_usd"] == "0.00080000"
