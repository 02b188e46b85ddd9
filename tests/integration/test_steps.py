"""Checkpointed steps, models by role and the record of every model call, through the whole
stack: the API, PostgreSQL, Redis, the in-process Celery worker and the simulator over HTTP.

The simulator is shared by the session, so each test finds its own requests in the
simulator's request log by a `[[sim tag=...]]` of its own, and tells the steps apart by
their system messages (app/kinds/article.py).
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select, update

from app.jobs.payloads import StepPayload
from app.jobs.transitions import LeaseLost
from app.models import Job, JobStep, ModelCall
from app.runtime import runtime
from devtools.simprocess import SimulatorProcess
from tests.conftest import Tenant, undispatched_job

pytestmark = pytest.mark.usefixtures("worker")

SYSTEM_OF_STEP = {"outline": "You plan articles", "draft": "You write articles", "edit": "You edit"}
# The simulator's own price (app/sim/chunks.py), which it reports as `usage.cost`.
SIM_IN, SIM_OUT = Decimal("0.20"), Decimal("0.80")


def _tag() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def _article(tenant: Tenant, tag: str, edit_directive: str = "", **fields: Any) -> str:
    job_input = {
        "topic": f"Conveyor belts in bakeries [[sim tag={tag}]]",
        "edit_notes": f"Keep it short [[sim tag={tag} {edit_directive}]]",
        "max_tokens": 30,
    }
    return tenant.submit("article", job_input, **fields)["id"]


def _requests_by_step(sim: SimulatorProcess, tag: str) -> dict[str, list[str]]:
    """The outcomes of the simulator's requests of each step, in order."""
    found: dict[str, list[str]] = {step: [] for step in SYSTEM_OF_STEP}
    for request in sim.requests(tag):
        step = next(
            s for s, system in SYSTEM_OF_STEP.items() if request["system"].startswith(system)
        )
        found[step].append(request["outcome"])
    return found


def _step_events(tenant: Tenant, job_id: str) -> list[tuple[str, str, int]]:
    items = tenant.get(f"/api/v1/jobs/{job_id}/events?limit=1000").get_json()["items"]
    return [
        (e["data"]["step"], e["data"]["status"], e["data"]["attempt"])
        for e in items
        if e["type"] == "job.step"
    ]


def _calls(tenant: Tenant, job_id: str) -> list[dict[str, Any]]:
    response = tenant.get(f"/api/v1/jobs/{job_id}/calls")
    assert response.status_code == 200, response.get_json()
    return response.get_json()["items"]


def test_an_article_runs_its_steps_in_order_with_weighted_progress_and_records_each_call(
    tenant: Tenant, simulator: SimulatorProcess
) -> None:
    tag = _tag()
    job_id = _article(tenant, tag)
    job = tenant.wait_for(job_id)
    assert job["status"] == "succeeded", job
    assert job["models"] == {"analysis": "gpt-4o-mini", "creative": "gpt-4o-mini"}

    items = tenant.get(f"/api/v1/jobs/{job_id}/events?limit=1000").get_json()["items"]
    steps = [e["data"] for e in items if e["type"] == "job.step"]
    assert [(s["step"], s["status"], s["progress"]) for s in steps] == [
        ("outline", "started", 0.0),
        ("outline", "finished", 20.0),
        ("draft", "started", 20.0),
        ("draft", "finished", 70.0),
        ("edit", "started", 70.0),
        ("edit", "finished", 100.0),
    ]
    # Progress never goes back, and the edit's token progress stays inside its share.
    progress = [e["data"]["progress"] for e in items if "progress" in e["data"]]
    assert progress == sorted(progress)
    deltas = [e for e in items if e["type"] == "job.output.delta"]
    assert deltas and all(70.0 <= e["data"]["progress"] <= 100.0 for e in deltas)

    calls = _calls(tenant, job_id)
    assert [(c["step"], c["role"], c["attempt"], c["outcome"]) for c in calls] == [
        ("outline", "analysis", 1, "ok"),
        ("draft", "creative", 1, "ok"),
        ("edit", "creative", 1, "ok"),
    ]
    finished = {s["step"]: s for s in steps if s["status"] == "finished"}
    for call in calls:
        assert call["model"] == "gpt-4o-mini" and call["ttft_ms"] is not None
        assert call["latency_ms"] >= call["ttft_ms"] > 0
        # The step's event carries what its calls cost.
        assert finished[call["step"]]["cost_usd"] == call["cost_usd"]
        assert finished[call["step"]]["tokens_out"] == call["tokens_out"]
    result = tenant.get(f"/api/v1/jobs/{job_id}/result").get_json()
    assert result["output"]["text"] and result["output"]["outline"] and result["output"]["draft"]
    assert _requests_by_step(simulator, tag) == {"outline": ["ok"], "draft": ["ok"], "edit": ["ok"]}


def test_a_retry_after_a_model_error_in_the_last_step_resumes_at_that_step(
    tenant: Tenant, simulator: SimulatorProcess
) -> None:
    tag = _tag()
    job_id = _article(tenant, tag, "fault=500 times=1")
    job = tenant.wait_for(job_id)
    assert job["status"] == "succeeded" and job["attempt"] == 2, job

    # The model saw the outline and the draft once, the edit twice (the 500, then the answer).
    assert _requests_by_step(simulator, tag) == {
        "outline": ["ok"],
        "draft": ["ok"],
        "edit": ["500", "ok"],
    }
    assert _step_events(tenant, job_id) == [
        ("outline", "started", 1),
        ("outline", "finished", 1),
        ("draft", "started", 1),
        ("draft", "finished", 1),
        ("edit", "started", 1),
        # Attempt 2: the checkpoints stand in for the first two steps (finished by attempt 1).
        ("outline", "reused", 1),
        ("draft", "reused", 1),
        ("edit", "started", 2),
        ("edit", "finished", 2),
    ]
    calls = _calls(tenant, job_id)
    assert [(c["step"], c["attempt"], c["outcome"]) for c in calls] == [
        ("outline", 1, "ok"),
        ("draft", 1, "ok"),
        ("edit", 1, "model_unavailable"),
        ("edit", 2, "ok"),
    ]
    with runtime().db.transaction() as session:
        checkpoints = {
            row.name: row.attempt
            for row in session.scalars(select(JobStep).where(JobStep.job_id == uuid.UUID(job_id)))
        }
    assert checkpoints == {"outline": 1, "draft": 1, "edit": 2}
    # The job's total is what its calls cost, the refused one included (it cost nothing).
    total = sum(Decimal(c["cost_usd"]) for c in calls)
    assert Decimal(job["usage"]["cost_usd"]) == total > 0


def test_a_directive_naming_a_step_faults_that_steps_call_only(
    tenant: Tenant, simulator: SimulatorProcess
) -> None:
    """The topic reaches the outline and the draft; its block names the draft (the worker sends
    each call's step in X-Conveyor-Step), so only the draft's first call fails."""
    tag = _tag()
    job_input = {
        "topic": f"Conveyor belts [[sim tag={tag}]] [[sim step=draft fault=500 times=1]]",
        "edit_notes": f"Keep it short [[sim tag={tag}]]",
        "max_tokens": 30,
    }
    job = tenant.wait_for(tenant.submit("article", job_input)["id"])
    assert job["status"] == "succeeded" and job["attempt"] == 2, job
    assert _requests_by_step(simulator, tag) == {
        "outline": ["ok"],
        "draft": ["500", "ok"],
        "edit": ["ok"],
    }


def test_areported_cost_is_counted_and_the_price_tables_is_kept_beside_it(
    tenant: Tenant,
) -> None:
    reported = tenant.submit("chat", {"prompt": f"Hi [[sim tag={_tag()}]]"})["id"]
    unreported = tenant.submit("chat", {"prompt": f"Hi [[sim tag={_tag()} cost=none]]"})["id"]
    for job_id in (reported, unreported):
        assert tenant.wait_for(job_id)["status"] == "succeeded"

    (call,) = _calls(tenant, reported)
    assert call["step"] is None and call["role"] is None  # a kind without steps
    expected = (SIM_IN * call["tokens_in"] + SIM_OUT * call["tokens_out"]) / 1_000_000
    assert Decimal(call["reported_cost_usd"]) == expected.quantize(Decimal("1e-8"))
    # gpt-4o-mini in the price table: 0.15 / 0.60 per million, not the simulator's figure.
    table = (Decimal("0.15") * call["tokens_in"] + Decimal("0.60") * call["tokens_out"]) / 10**6
    assert Decimal(call["table_cost_usd"]) == table.quantize(Decimal("1e-8"))
    assert call["cost_usd"] == call["reported_cost_usd"] != call["table_cost_usd"]
    job = tenant.get(f"/api/v1/jobs/{reported}").get_json()
    assert job["usage"]["cost_usd"] == call["reported_cost_usd"]

    (call,) = _calls(tenant, unreported)
    assert call["reported_cost_usd"] is None
    assert call["cost_usd"] == call["table_cost_usd"]
    job = tenant.get(f"/api/v1/jobs/{unreported}").get_json()
    assert job["usage"]["cost_usd"] == call["table_cost_usd"]


def test_each_role_calls_the_model_pinned_for_it(tenant: Tenant) -> None:
    """Pinned as the API pins a request's choice (the API's checks are tested below)."""
    created = runtime().jobs.create_job(
        owner=tenant.owner,
        kind="article",
        input={"topic": f"Rollers [[sim tag={_tag()}]]", "max_tokens": 20},
        models={"analysis": "sim-small", "creative": "sim-large"},
    )
    job = tenant.wait_for(str(created.job.id))
    assert job["status"] == "succeeded", job
    calls = _calls(tenant, job["id"])
    assert [(c["step"], c["model"]) for c in calls] == [
        ("outline", "sim-small"),
        ("draft", "sim-large"),
        ("edit", "sim-large"),
    ]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"model": "sim-large"}, "model"),
        ({"models": {"creative": "anthropic/claude-sonnet-4"}}, "models.creative"),
        ({"models": {"poet": "gpt-4o-mini"}}, "models.poet"),
    ],
)
def test_a_model_or_role_the_deployment_does_not_allow_is_a_422_naming_the_field(
    tenant: Tenant, fields: dict[str, Any], field: str
) -> None:
    response = tenant.post(
        "/api/v1/jobs", json={"kind": "article", "input": {"topic": "belts"}, **fields}
    )
    assert response.status_code == 422, response.get_json()
    problem = response.get_json()
    assert response.content_type == "application/problem+json"
    assert [error["field"] for error in problem["errors"]] == [field]


def test_a_role_on_a_kind_without_roles_is_a_422(tenant: Tenant) -> None:
    response = tenant.post(
        "/api/v1/jobs",
        json={"kind": "chat", "input": {"prompt": "hi"}, "models": {"default": "gpt-4o-mini"}},
    )
    assert response.status_code == 422
    assert response.get_json()["errors"][0]["field"] == "models.default"
    assert "has no role" in response.get_json()["errors"][0]["message"]


def test_a_configured_model_may_be_named_and_is_pinned_for_every_role(tenant: Tenant) -> None:
    job = tenant.submit("article", {"topic": "belts"}, model="gpt-4o-mini")
    assert job["model"] == "gpt-4o-mini"
    assert job["models"] == {"analysis": "gpt-4o-mini", "creative": "gpt-4o-mini"}
    chat = tenant.submit("chat", {"prompt": "hi"})
    assert chat["models"] is None


def test_another_tenants_calls_are_a_404(tenant: Tenant, new_tenant: Any) -> None:
    job_id = tenant.submit("chat", {"prompt": "mine"})["id"]
    tenant.wait_for(job_id)
    assert len(_calls(tenant, job_id)) == 1
    other = new_tenant()
    response = other.get(f"/api/v1/jobs/{job_id}/calls")
    assert response.status_code == 404
    assert response.content_type == "application/problem+json"
    assert tenant.get(f"/api/v1/jobs/{uuid.uuid4()}/calls").status_code == 404


def test_the_kinds_list_names_steps_and_roles(tenant: Tenant) -> None:
    kinds = {k["name"]: k for k in tenant.get("/api/v1/kinds").get_json()["items"]}
    assert kinds["article"]["roles"] == ["analysis", "creative"]
    assert [(s["name"], s["role"]) for s in kinds["article"]["steps"]] == [
        ("outline", "analysis"),
        ("draft", "creative"),
        ("edit", "creative"),
    ]
    assert kinds["chat"]["steps"] == [] and kinds["chat"]["roles"] == []


def test_a_worker_that_lost_its_lease_cannot_checkpoint(tenant: Tenant) -> None:
    job_id = undispatched_job(tenant.owner, kind="article")
    jobs = runtime().jobs
    claim = jobs.claim_job(job_id, "worker-about-to-lose")
    assert claim is not None and claim.checkpoints == {}
    with runtime().db.transaction() as session:  # the sweeper gave the job to attempt 2
        session.execute(update(Job).where(Job.id == job_id).values(attempt=2))
    payload = StepPayload(
        step="outline", status="finished", role="analysis", attempt=1, progress=20
    )
    checkpoint = {
        "name": "outline",
        "output": "1. Belts",
        "tokens_in": 1,
        "tokens_out": 2,
        "cost_usd": "0",
        "started_at": "2026-12-08T00:00:00+00:00",
    }
    with pytest.raises(LeaseLost):
        jobs.fenced_update(claim, claim.seq + 1, payload, checkpoint=checkpoint, progress=20.0)
    with runtime().db.transaction() as session:
        assert session.scalars(select(JobStep).where(JobStep.job_id == job_id)).all() == []
        assert session.scalars(select(ModelCall).where(ModelCall.job_id == job_id)).all() == []
