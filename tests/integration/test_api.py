"""The HTTP contract: auth, tenancy, validation as problem+json, pagination, OpenAPI."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import update

from app.models import JobEvent
from app.runtime import runtime
from tests.conftest import Tenant, undispatched_job

PROBLEM = "application/problem+json"


def assert_problem(response, status: int, field: str | None = None) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.headers["Content-Type"] == PROBLEM
    problem = response.get_json()
    assert problem["status"] == status and problem["title"] and problem["type"]
    if field is not None:
        assert field in [e["field"] for e in problem["errors"]], problem
    return problem


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"input": {"prompt": "x"}}, "kind"),
        ({"kind": "chat"}, "input"),
        ({"kind": "nope", "input": {"prompt": "x"}}, "kind"),
        ({"kind": "chat", "input": {}}, "input"),
        ({"kind": "chat", "input": {"prompt": 42}}, "input.prompt"),
        ({"kind": "chat", "input": {"prompt": ""}}, "input.prompt"),
        ({"kind": "chat", "input": {"prompt": "x", "max_tokens": "many"}}, "input.max_tokens"),
        ({"kind": "chat", "input": {"prompt": "x", "max_tokens": -1}}, "input.max_tokens"),
        ({"kind": "chat", "input": {"prompt": "x", "temperature": 9}}, "input.temperature"),
        ({"kind": "chat", "input": {"prompt": "x", "surprise": 1}}, "input.surprise"),
        (
            {"kind": "chat", "input": {"messages": [{"role": "robot", "content": "x"}]}},
            "input.messages.0.role",
        ),
        ({"kind": "chat", "input": {"prompt": "x"}, "priority": 10}, "priority"),
        ({"kind": "chat", "input": {"prompt": "x"}, "priority": "high"}, "priority"),
        ({"kind": "chat", "input": "just a string"}, "input"),
        ({"kind": ["chat"], "input": {"prompt": "x"}}, "kind"),
        ({"kind": "chat", "input": {"prompt": "x"}, "extra": True}, "extra"),
        ({"kind": "structured", "input": {"prompt": "x"}}, "input.schema"),
        (
            {"kind": "structured", "input": {"prompt": "x", "schema": {"type": "array"}}},
            "input.schema",
        ),
        (
            {"kind": "structured", "input": {"prompt": "x", "schema": {"type": 12}}},
            "input.schema.type",
        ),
    ],
)
def test_invalid_job_bodies_are_422_naming_the_field(
    tenant: Tenant, body: dict, field: str
) -> None:
    assert_problem(tenant.post("/api/v1/jobs", json=body), 422, field)


def test_a_body_that_is_not_an_object_is_422(tenant: Tenant) -> None:
    assert_problem(tenant.post("/api/v1/jobs", json=[1, 2]), 422)


def test_malformed_json_is_400(tenant: Tenant) -> None:
    response = tenant.post(
        "/api/v1/jobs", data=b'{"kind": "chat", "input": {', content_type="application/json"
    )
    assert_problem(response, 400)


def test_non_json_body_is_415(tenant: Tenant) -> None:
    assert_problem(tenant.post("/api/v1/jobs", data="kind=chat", content_type="text/plain"), 415)


def test_oversized_body_is_413(tenant: Tenant, app) -> None:
    size = app.config["MAX_CONTENT_LENGTH"] + 1
    body = b'{"kind": "chat", "input": {"prompt": "' + b"x" * size + b'"}}'
    assert_problem(tenant.post("/api/v1/jobs", data=body, content_type="application/json"), 413)


def test_prompt_longer_than_the_limit_is_422(tenant: Tenant) -> None:
    body = {"kind": "chat", "input": {"prompt": "x" * 100_001}}
    assert_problem(tenant.post("/api/v1/jobs", json=body), 422, "input.prompt")


def test_invalid_unicode_is_a_4xx_not_a_500(tenant: Tenant) -> None:
    response = tenant.post(
        "/api/v1/jobs",
        data=b'{"kind": "chat", "input": {"prompt": "\xff"}}',
        content_type="application/json",
    )
    assert 400 <= response.status_code < 500


@pytest.mark.parametrize(
    ("job_input", "field"),
    [
        ({"prompt": "a\u0000b"}, "input.prompt"),
        (
            {"prompt": "x", "messages": [{"role": "user", "content": "\u0000"}]},
            "input.messages.0.content",
        ),
    ],
)
def test_a_nul_character_is_422_naming_its_field(tenant: Tenant, job_input, field: str) -> None:
    """PostgreSQL stores no NUL in text or jsonb; the API refuses it instead of failing."""
    response = tenant.post("/api/v1/jobs", json={"kind": "chat", "input": job_input})
    assert_problem(response, 422, field)


def test_a_nul_in_a_structured_schema_key_is_422(tenant: Tenant) -> None:
    schema = {"type": "object", "properties": {"a\u0000": {"type": "string"}}}
    response = tenant.post(
        "/api/v1/jobs", json={"kind": "structured", "input": {"prompt": "x", "schema": schema}}
    )
    assert_problem(response, 422, "input.schema.properties.a\u0000")


def deeply_nested(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize(
    ("schema", "field"),
    [
        (
            {
                "type": "object",
                "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
                "properties": {"x": {"$ref": "#/$defs/a"}},
            },
            "input.schema.$defs.b.$ref",
        ),
        (
            {"type": "object", "properties": {"x": {"$ref": "http://127.0.0.1:9/s.json"}}},
            "input.schema.properties.x.$ref",
        ),
        (
            {"type": "object", "properties": {"x": {"type": "string", "pattern": "(a)\\1"}}},
            "input.schema.properties.x.pattern",
        ),
        (deeply_nested(95), "input.schema" + ".properties.a" * 32),
    ],
    ids=["ref-cycle", "remote-ref", "backreference", "nested-95-levels"],
)
def test_a_schema_no_worker_could_run_is_422_naming_the_place_inside_it(
    tenant: Tenant, schema: dict, field: str
) -> None:
    response = tenant.post(
        "/api/v1/jobs", json={"kind": "structured", "input": {"prompt": "x", "schema": schema}}
    )
    problem = assert_problem(response, 422, field)
    pointer = "#/" + "/".join(field.split(".")[2:])
    assert problem["errors"][0]["message"].startswith(pointer), "the message names it too"
    assert tenant.get("/api/v1/jobs?kind=structured").get_json()["items"] == []


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("kind=%00", "kind"),
        ("kind=Chat!", "kind"),
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=ten", "limit"),
        ("status=done", "status"),
        ("cursor=%%%", "cursor"),
        ("bogus=1", "bogus"),
    ],
)
def test_invalid_list_queries_are_422(tenant: Tenant, query: str, field: str) -> None:
    assert_problem(tenant.get(f"/api/v1/jobs?{query}"), 422, field)


def test_invalid_events_query_is_422(tenant: Tenant) -> None:
    job_id = (
        runtime().jobs.create_job(owner=tenant.owner, kind="chat", input={"prompt": "x"}).job.id
    )
    assert_problem(tenant.get(f"/api/v1/jobs/{job_id}/events?after=-1"), 422, "after")
    huge = 10**30  # seqs are PostgreSQL integers: this would overflow the query
    assert_problem(tenant.get(f"/api/v1/jobs/{job_id}/events?after={huge}"), 422, "after")
    assert_problem(tenant.get(f"/api/v1/jobs/{job_id}/events?after={2**31}"), 422, "after")
    assert_problem(tenant.get(f"/api/v1/jobs/{job_id}/events?wait=600"), 422, "wait")


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer nope", "Basic abc", "bearer  "])
def test_missing_or_bad_keys_are_401(app, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    response = app.test_client().get("/api/v1/jobs", headers=headers)
    assert_problem(response, 401)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_a_revoked_key_is_refused(app, tenant: Tenant) -> None:
    from app.keys import api_keys
    from app.runtime import runtime

    api_keys.revoke_api_key(runtime().db, tenant.key[:12])
    assert_problem(tenant.get("/api/v1/jobs"), 401)


def test_another_owners_job_is_404_everywhere(new_tenant) -> None:
    alice, mallory = new_tenant(), new_tenant()
    job_id = alice.submit("chat", {"prompt": "private"})["id"]
    for path in ("", "/result", "/events", "/logs"):
        assert_problem(mallory.get(f"/api/v1/jobs/{job_id}{path}"), 404)
    for action in ("/cancel", "/retry"):
        assert_problem(mallory.post(f"/api/v1/jobs/{job_id}{action}"), 404)
    assert_problem(mallory.delete(f"/api/v1/jobs/{job_id}"), 404)
    assert mallory.get("/api/v1/jobs").get_json()["items"] == []
    stats = mallory.get("/api/v1/stats").get_json()
    assert stats["by_status"]["queued"] == 0
    assert stats["cost_usd"] == "0.00000000"  # not "0" or "0E-8"
    assert alice.get(f"/api/v1/jobs/{job_id}").status_code == 200


def test_unknown_job_and_bad_ids_are_404(tenant: Tenant) -> None:
    assert_problem(tenant.get(f"/api/v1/jobs/{uuid.uuid4()}"), 404)
    assert_problem(tenant.get("/api/v1/jobs/not-a-uuid"), 404)
    assert_problem(tenant.get("/api/v1/nothing-here"), 404)


def test_wrong_method_is_405_problem(tenant: Tenant) -> None:
    assert_problem(tenant.client.put("/api/v1/jobs", headers=tenant.headers), 405)


def test_result_is_409_until_the_job_finishes(tenant: Tenant) -> None:
    job_id = undispatched_job(tenant.owner)  # no worker can finish it first
    runtime().jobs.cancel_job(tenant.owner, job_id)  # terminal now
    queued = (
        runtime()
        .jobs.create_job(owner=tenant.owner, kind="chat", input={"prompt": "[[sim ttft=5]]"})
        .job.id
    )
    assert_problem(tenant.get(f"/api/v1/jobs/{queued}/result"), 409)
    assert tenant.get(f"/api/v1/jobs/{job_id}/result").status_code == 200
    runtime().jobs.cancel_job(tenant.owner, queued)


def test_keyset_pagination_walks_every_job_once(tenant: Tenant) -> None:
    created = {
        str(
            runtime()
            .jobs.create_job(owner=tenant.owner, kind="chat", input={"prompt": f"p{i}"})
            .job.id
        )
        for i in range(7)
    }
    seen, cursor = [], None
    while True:
        query = "limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = tenant.get(f"/api/v1/jobs?{query}").get_json()
        seen += [job["id"] for job in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 7
    assert set(seen) == created


def test_list_filters_by_status_and_kind(tenant: Tenant) -> None:
    job_id = (
        runtime().jobs.create_job(owner=tenant.owner, kind="chat", input={"prompt": "x"}).job.id
    )
    runtime().jobs.cancel_job(tenant.owner, job_id)
    canceled = tenant.get("/api/v1/jobs?status=canceled&kind=chat").get_json()["items"]
    assert [job["id"] for job in canceled] == [str(job_id)]
    assert tenant.get("/api/v1/jobs?kind=structured").get_json()["items"] == []


def test_post_returns_202_with_location(tenant: Tenant) -> None:
    response = tenant.post("/api/v1/jobs", json={"kind": "chat", "input": {"prompt": "hi"}})
    assert response.status_code == 202
    job = response.get_json()
    assert response.headers["Location"] == f"/api/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["progress"] == 0


def test_openapi_document_is_generated_and_complete(app) -> None:
    client = app.test_client()
    doc = client.get("/api/v1/openapi.json").get_json()
    assert doc["openapi"].startswith("3.1")
    post = doc["paths"]["/api/v1/jobs"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "JobCreate"
    )
    assert {"202", "401", "422"} <= set(post["responses"])
    assert "ChatInput" in doc["components"]["schemas"]
    assert "StructuredInput" in doc["components"]["schemas"]
    job_input = doc["components"]["schemas"]["JobCreate"]["properties"]["input"]
    assert {"$ref": "#/components/schemas/ChatInput"} in job_input["anyOf"]
    for path in (
        "/api/v1/jobs/{job_id}/result",
        "/api/v1/stats",
        "/api/v1/live",
        "/api/v1/ready",
        "/api/v1/health",
    ):
        assert path in doc["paths"]
    page = client.get("/api/v1/docs")
    assert page.status_code == 200 and b"/api/v1/jobs" in page.data


def test_kinds_lists_input_schemas(tenant: Tenant) -> None:
    kinds = {k["name"]: k for k in tenant.get("/api/v1/kinds").get_json()["items"]}
    assert set(kinds) >= {"chat", "structured"}
    assert "schema" in kinds["structured"]["input_schema"]["properties"]


def test_live_and_ready(app, worker) -> None:
    client = app.test_client()
    assert client.get("/api/v1/live").get_json() == {"status": "ok"}
    ready = client.get("/api/v1/ready")
    body = ready.get_json()
    assert ready.status_code == 200
    assert body["status"] == "healthy"
    assert set(body["checks"]) == {"database", "redis"}
    assert body["checks"]["database"]["ok"] and body["checks"]["redis"]["ok"]


def test_retrying_a_job_deleted_meanwhile_is_404_not_500(tenant: Tenant, monkeypatch) -> None:
    job_id = undispatched_job(tenant.owner)
    runtime().jobs.cancel_job(tenant.owner, job_id)
    jobs = runtime().jobs
    create_job = jobs.create_job

    def deleted_by_someone_else_first(**fields):
        jobs.delete_job(tenant.owner, job_id)  # the DELETE that raced the retry
        return create_job(**fields)

    monkeypatch.setattr(jobs, "create_job", deleted_by_someone_else_first)
    assert_problem(tenant.post(f"/api/v1/jobs/{job_id}/retry"), 404)


def test_an_event_stored_by_an_earlier_payload_model_is_still_served(tenant: Tenant) -> None:
    """Reading checks the envelope only: a payload model may change after its events were
    stored (here: a field it no longer has, and one it now requires missing)."""
    job_id = undispatched_job(tenant.owner)
    with runtime().db.transaction() as session:
        session.execute(
            update(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.seq == 1)
            .values(data={"kind": "chat", "queue": "legacy"})
        )
    page = tenant.get(f"/api/v1/jobs/{job_id}/events")
    assert page.status_code == 200
    assert page.get_json()["items"][0]["data"] == {"kind": "chat", "queue": "legacy"}
