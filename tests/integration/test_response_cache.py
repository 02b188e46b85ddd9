"""The response cache (input.cache): an identical deterministic call of the same owner is
answered from Redis, streams its answer as usual, costs nothing and says so; never across
owners, never for a job that did not succeed. Real PostgreSQL, Redis, worker and simulator."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from app.runtime import runtime
from tests.conftest import Tenant

pytestmark = pytest.mark.usefixtures("worker")


def tagged(text: str) -> tuple[str, str]:
    """A prompt the simulator's request log can find by its tag, unique to the test."""
    tag = uuid.uuid4().hex[:12]
    return f"{text} [[sim tag={tag} tokens=12]]", tag


def requests_seen(tag: str) -> int:
    base = runtime().settings.openai_base_url.removesuffix("/v1")
    items = httpx.get(f"{base}/_sim/requests", params={"tag": tag}, timeout=5).json()["items"]
    return len(items)


def run(tenant: Tenant, kind: str, job_input: dict[str, Any]) -> dict[str, Any]:
    job = tenant.wait_for(tenant.submit(kind, job_input)["id"], timeout=30)
    assert job["status"] in {"succeeded", "failed"}, job
    return job


def result_text(tenant: Tenant, job: dict[str, Any]) -> str:
    return tenant.get(f"/api/v1/jobs/{job['id']}/result").get_json()["output"]["text"]


def streamed_text(tenant: Tenant, job: dict[str, Any]) -> str:
    events = tenant.get(f"/api/v1/jobs/{job['id']}/events?after=0").get_json()["items"]
    return "".join(e["data"]["text"] for e in events if e["type"] == "job.output.delta")


def test_an_identical_call_is_answered_from_the_cache_and_costs_nothing(tenant: Tenant) -> None:
    prompt, tag = tagged("Name three rivers")
    job_input = {"prompt": prompt, "temperature": 0, "cache": True}
    first = run(tenant, "chat", job_input)
    second = run(tenant, "chat", job_input)

    assert first["status"] == second["status"] == "succeeded"
    assert requests_seen(tag) == 1, "the second job made no model call"
    assert first["cached"] is False and float(first["usage"]["cost_usd"]) > 0
    assert second["cached"] is True
    assert float(second["usage"]["cost_usd"]) == 0
    assert second["usage"]["tokens_in"] == second["usage"]["tokens_out"] == 0
    text = result_text(tenant, first)
    assert result_text(tenant, second) == text
    # It streams as a call would: the same deltas, as events subscribers see.
    assert streamed_text(tenant, second) == text
    calls = tenant.get(f"/api/v1/jobs/{second['id']}/calls").get_json()["items"]
    assert [c["outcome"] for c in calls] == ["cached"]
    stats = tenant.get("/api/v1/stats").get_json()
    assert stats["cache"] == {"requests": 2, "hits": 1}


def test_a_seed_makes_a_call_cacheable_and_is_part_of_its_key(tenant: Tenant) -> None:
    prompt, tag = tagged("A haiku")
    run(tenant, "chat", {"prompt": prompt, "seed": 7, "cache": True})
    assert run(tenant, "chat", {"prompt": prompt, "seed": 7, "cache": True})["cached"] is True
    other = run(tenant, "chat", {"prompt": prompt, "seed": 8, "cache": True})
    assert other["cached"] is False
    assert requests_seen(tag) == 2


def test_the_cache_is_never_shared_between_owners(new_tenant: Any) -> None:
    one, two = new_tenant(), new_tenant()
    prompt, tag = tagged("A secret of mine")
    job_input = {"prompt": prompt, "temperature": 0, "cache": True}
    run(one, "chat", job_input)
    other = run(two, "chat", job_input)
    assert other["cached"] is False
    assert requests_seen(tag) == 2


def test_without_cache_an_identical_job_calls_the_model_again(tenant: Tenant) -> None:
    prompt, tag = tagged("Count to five")
    run(tenant, "chat", {"prompt": prompt, "temperature": 0, "cache": True})
    again = run(tenant, "chat", {"prompt": prompt, "temperature": 0})
    assert again["cached"] is False
    assert requests_seen(tag) == 2


def test_a_job_that_failed_leaves_nothing_in_the_cache(tenant: Tenant) -> None:
    """Its answers were rejected (JSON that fails the schema, twice): served again, they would
    fail every later job the same way without the model being asked."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    prompt, tag = tagged("Number [[sim fault=schema_mismatch]]")
    job_input = {"prompt": prompt, "schema": schema, "temperature": 0, "cache": True}
    assert run(tenant, "structured", job_input)["status"] == "failed"
    second = run(tenant, "structured", job_input)
    assert second["status"] == "failed" and second["cached"] is False
    assert requests_seen(tag) == 4, "both jobs asked the model (the call and its repair)"


@pytest.mark.parametrize(
    "job_input",
    [
        {"prompt": "hi", "cache": True},
        {"prompt": "hi", "cache": True, "temperature": 0.7},
        {"prompt": "hi", "cache": "yes", "temperature": 0},
    ],
)
def test_cache_without_a_deterministic_call_is_a_422_naming_it(
    tenant: Tenant, job_input: dict[str, Any]
) -> None:
    response = tenant.post("/api/v1/jobs", json={"kind": "chat", "input": job_input})
    assert response.status_code == 422, response.get_json()
    assert response.content_type == "application/problem+json"
    assert [e["field"] for e in response.get_json()["errors"]] == ["input.cache"]
