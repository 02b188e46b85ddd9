"""Batches over HTTP, against the real PostgreSQL, Redis, Celery worker and simulator: creating
(JSON and JSON Lines), one commit for the whole batch, validation naming the item, idempotency,
counts and cost, cancel, the streamed results, the list, tenancy, and the batch's Socket.IO
room."""

from __future__ import annotations

import json
import time
import uuid
from decimal import Decimal
from typing import Any

import pytest
import socketio
from sqlalchemy import text

from app.jobs import batches
from app.queue import broker_queue_keys
from app.runtime import runtime
from tests.conftest import Tenant, wait_until
from tests.integration.test_api import assert_problem
from tests.integration.test_realtime import connect, token
from tests.webserver import WebServer

pytestmark = pytest.mark.usefixtures("worker")

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def unique(prompt: str) -> str:
    return f"{prompt} {uuid.uuid4().hex[:8]}"


def chat(prompt: str = "hello", **fields: Any) -> dict[str, Any]:
    return {"kind": "chat", "input": {"prompt": unique(prompt)}, **fields}


def create(tenant: Tenant, items: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    response = tenant.post("/api/v1/batches", json={"items": items}, **kwargs)
    assert response.status_code == 202, response.get_json()
    return response.get_json()


def jsonl(items: list[Any]) -> bytes:
    return "".join(json.dumps(item) + "\n" for item in items).encode()


def wait_done(tenant: Tenant, batch_id: str, timeout: float = 30) -> dict[str, Any]:
    return wait_until(
        lambda: (b := tenant.get(f"/api/v1/batches/{batch_id}").get_json())["done"] and b,
        timeout=timeout,
    )


def results(tenant: Tenant, batch_id: str) -> list[dict[str, Any]]:
    response = tenant.get(f"/api/v1/batches/{batch_id}/results")
    assert response.status_code == 200
    assert response.mimetype == "application/jsonl"
    return [json.loads(line) for line in response.get_data(as_text=True).splitlines()]


def broker_depth() -> int:
    keys = broker_queue_keys()
    return sum(runtime().redis.llen(key) for key in keys)


def job_count(owner: str) -> int:
    with runtime().db.engine.connect() as connection:
        return connection.execute(
            text("SELECT count(*) FROM jobs WHERE owner = :owner"), {"owner": owner}
        ).scalar_one()


# Creating --------------------------------------------------------------------------------------


def test_a_batch_of_mixed_kinds_runs_every_job_and_adds_up_their_cost(tenant: Tenant) -> None:
    items = [
        chat("first"),
        {"kind": "structured", "input": {"prompt": unique("a number"), "schema": SCHEMA}},
        chat("third", priority=5, max_attempts=2, model="gpt-4o-mini"),
    ]
    response = tenant.post("/api/v1/batches", json={"items": items})
    assert response.status_code == 202, response.get_json()
    created = response.get_json()
    assert response.headers["Location"] == created["links"]["self"]
    assert created["item_count"] == 3 and created["done"] is False
    assert created["counts"] == {
        "queued": 3,
        "running": 0,
        "succeeded": 0,
        "failed": 0,
        "canceled": 0,
    }

    done = wait_done(tenant, created["id"])
    assert done["counts"]["succeeded"] == 3
    assert done["progress"] == {"finished": 3, "total": 3, "percent": 100.0}
    lines = results(tenant, created["id"])
    assert [line["item"] for line in lines] == [0, 1, 2]
    assert isinstance(lines[1]["output"]["data"]["n"], int)
    assert all(line["status"] == "succeeded" and line["error"] is None for line in lines)
    jobs = [tenant.get(f"/api/v1/jobs/{line['id']}").get_json() for line in lines]
    assert {job["batch_id"] for job in jobs} == {created["id"]}
    assert [job["kind"] for job in jobs] == ["chat", "structured", "chat"]
    assert (jobs[2]["priority"], jobs[2]["max_attempts"], jobs[2]["model"]) == (5, 2, "gpt-4o-mini")
    assert jobs[0]["model"] == runtime().settings.model_for("chat")
    cost = sum(Decimal(job["usage"]["cost_usd"]) for job in jobs)
    assert cost > 0
    assert done["usage"]["cost_usd"] == f"{cost:.8f}"
    assert done["usage"]["tokens_out"] == sum(job["usage"]["tokens_out"] for job in jobs)


def test_the_batch_its_jobs_and_their_events_are_one_transaction(tenant: Tenant) -> None:
    created = create(tenant, [chat(str(i)) for i in range(50)])
    with runtime().db.engine.connect() as connection:
        writers = connection.execute(
            text("""
                SELECT count(DISTINCT x) FROM (
                    SELECT xmin::text AS x FROM batches WHERE id = :id
                    UNION ALL
                    SELECT e.xmin::text FROM job_events e JOIN jobs j ON j.id = e.job_id
                    WHERE j.batch_id = :id AND e.seq = 1
                ) AS rows
            """),
            {"id": created["id"]},
        ).scalar_one()
        stored = connection.execute(
            text("SELECT count(*) FROM jobs WHERE batch_id = :id"), {"id": created["id"]}
        ).scalar_one()
    assert stored == 50
    # Rows never updated since (a job's row is, as it runs) carry the id of the transaction
    # that wrote them: one for the batch and the job.queued events of its 50 jobs.
    assert writers == 1
    assert wait_done(tenant, created["id"])["counts"]["succeeded"] == 50


@pytest.mark.parametrize("content_type", ["application/x-ndjson", "application/jsonl"])
def test_a_json_lines_upload_is_a_batch_in_line_order(tenant: Tenant, content_type: str) -> None:
    items = [chat("one"), chat("two", priority=3)]
    body = jsonl(items) + b"\n"  # a blank last line is no item
    response = tenant.post("/api/v1/batches", data=body, content_type=content_type)
    assert response.status_code == 202, response.get_json()
    batch_id = response.get_json()["id"]
    wait_done(tenant, batch_id)
    lines = results(tenant, batch_id)
    jobs = [tenant.get(f"/api/v1/jobs/{line['id']}").get_json() for line in lines]
    assert [job["priority"] for job in jobs] == [0, 3]
    assert [job["input"]["prompt"] for job in jobs] == [i["input"]["prompt"] for i in items]


def test_ten_thousand_items_are_accepted_and_canceled_in_one_go(tenant: Tenant) -> None:
    """A body far over the 256 KiB of POST /jobs, at the item limit; then the batch's queued
    jobs are canceled at once, before the worker gets through them."""
    items = [{"kind": "chat", "input": {"prompt": f"n{i} [[sim ttft=3]]"}} for i in range(10_000)]
    began = time.monotonic()
    created = create(tenant, items)
    took = time.monotonic() - began
    assert created["counts"]["queued"] == 10_000
    answered = tenant.post(f"/api/v1/batches/{created['id']}/cancel").get_json()
    counts = answered["counts"]
    assert counts["queued"] == 0 and counts["canceled"] >= 9_900, (counts, took)
    assert answered["canceled_at"] is not None
    done = wait_done(tenant, created["id"], timeout=60)["counts"]
    # Jobs that had finished keep their outcome; running ones were told to stop.
    assert done["canceled"] + done["succeeded"] == 10_000, done
    assert done["canceled"] >= counts["canceled"]
    assert done["succeeded"] <= counts["succeeded"] + counts["running"]
    # The worker gets through the canceled jobs' 10,000 deliveries as no-ops (waited for here,
    # so that the tests after this one do not queue behind them); none of them runs a job.
    wait_until(lambda: broker_depth() == 0, timeout=90, interval=0.5)
    assert tenant.get(f"/api/v1/batches/{created['id']}").get_json()["counts"] == done


# Validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("items", "field"),
    [
        ([chat(), {"kind": "chat", "input": {"prompt": ""}}], "items[1].input.prompt"),
        ([chat(), chat(), {"kind": "nope", "input": {}}], "items[2].kind"),
        ([chat(priority=10)], "items[0].priority"),
        ([chat(max_attempts=0)], "items[0].max_attempts"),
        ([chat(model="bad model")], "items[0].model"),
        ([chat(surprise=True)], "items[0].surprise"),
        ([chat(), "not an object"], "items[1]"),
        ([{"kind": "chat"}], "items[0].input"),
        ([{"kind": "structured", "input": {"prompt": "x"}}], "items[0].input.schema"),
        (
            [{"kind": "chat", "input": {"messages": [{"role": "robot", "content": "x"}]}}],
            "items[0].input.messages.0.role",
        ),
        ([], "items"),
    ],
)
def test_a_bad_item_is_422_naming_its_index_and_creates_nothing(
    tenant: Tenant, items: list[Any], field: str
) -> None:
    assert_problem(tenant.post("/api/v1/batches", json={"items": items}), 422, field)
    assert job_count(tenant.owner) == 0
    assert tenant.get("/api/v1/batches").get_json()["items"] == []


def test_every_bad_item_is_named_up_to_a_hundred(tenant: Tenant) -> None:
    items = [{"kind": "chat", "input": {"prompt": ""}} for _ in range(150)]
    problem = assert_problem(tenant.post("/api/v1/batches", json={"items": items}), 422)
    assert [e["field"] for e in problem["errors"]] == [
        f"items[{i}].input.prompt" for i in range(100)
    ]
    assert "150 errors" in problem["detail"]


def test_ten_thousand_and_one_items_are_422(tenant: Tenant) -> None:
    items = [{"kind": "chat", "input": {"prompt": "x"}}] * 10_001
    assert_problem(tenant.post("/api/v1/batches", json={"items": items}), 422, "items")
    lines = jsonl(items)
    response = tenant.post("/api/v1/batches", data=lines, content_type="application/jsonl")
    assert_problem(response, 422, "lines")
    assert job_count(tenant.owner) == 0


def test_a_body_over_the_batch_limit_is_413(tenant: Tenant) -> None:
    limit = runtime().settings.max_batch_request_bytes
    body = b'{"items": [{"kind": "chat", "input": {"prompt": "' + b"x" * limit + b'"}}]}'
    assert_problem(tenant.post("/api/v1/batches", data=body, content_type="application/json"), 413)


def test_a_json_lines_line_that_is_not_json_is_400_naming_the_line(tenant: Tenant) -> None:
    body = jsonl([chat()]) + b"\n" + b'{"kind": "chat", "input": \n'
    response = tenant.post("/api/v1/batches", data=body, content_type="application/x-ndjson")
    problem = assert_problem(response, 400, "lines[3]")
    assert problem["type"] == "/problems/malformed-json"
    assert job_count(tenant.owner) == 0


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ({"kind": "chat", "input": {"prompt": 42}}, "lines[2].input.prompt"),
        ({"kind": "chat", "input": {"prompt": "x"}, "priority": "high"}, "lines[2].priority"),
        ([1, 2], "lines[2]"),
    ],
)
def test_a_bad_json_lines_item_is_422_naming_its_line(
    tenant: Tenant, line: Any, field: str
) -> None:
    body = jsonl([chat(), line, chat()])
    response = tenant.post("/api/v1/batches", data=body, content_type="application/jsonl")
    assert_problem(response, 422, field)
    assert job_count(tenant.owner) == 0


def test_an_empty_json_lines_upload_is_422(tenant: Tenant) -> None:
    response = tenant.post("/api/v1/batches", data=b"\n\n", content_type="application/jsonl")
    assert_problem(response, 422, "lines")


def test_malformed_json_and_other_media_types_are_refused(tenant: Tenant) -> None:
    response = tenant.post("/api/v1/batches", data=b'{"items": [', content_type="application/json")
    assert_problem(response, 400)
    response = tenant.post("/api/v1/batches", data=b"kind=chat", content_type="text/csv")
    assert_problem(response, 415)


def test_a_nul_character_is_422_naming_the_item(tenant: Tenant) -> None:
    items = [chat(), {"kind": "chat", "input": {"prompt": "a\u0000b"}}]
    assert_problem(
        tenant.post("/api/v1/batches", json={"items": items}), 422, "items[1].input.prompt"
    )
    body = jsonl(items)
    response = tenant.post("/api/v1/batches", data=body, content_type="application/jsonl")
    assert_problem(response, 422, "lines[2].input.prompt")


# Idempotency ----------------------------------------------------------------------------------


def test_an_idempotency_key_replays_the_same_batch_and_refuses_another_body(
    tenant: Tenant,
) -> None:
    key = {"Idempotency-Key": str(uuid.uuid4())}
    items = [chat("a"), chat("b")]
    first = tenant.post("/api/v1/batches", json={"items": items}, headers=key)
    assert first.status_code == 202
    # The same request, a default spelled out: the same batch.
    spelled = [{**items[0], "priority": 0}, items[1]]
    again = tenant.post("/api/v1/batches", json={"items": spelled}, headers=key)
    assert again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json()["id"] == first.get_json()["id"]
    # The same items as JSON Lines are the same request too.
    as_lines = tenant.post(
        "/api/v1/batches", data=jsonl(items), content_type="application/jsonl", headers=key
    )
    assert as_lines.status_code == 200 and as_lines.get_json()["id"] == first.get_json()["id"]
    other = tenant.post("/api/v1/batches", json={"items": [chat("c")]}, headers=key)
    problem = assert_problem(other, 422, "Idempotency-Key")
    assert problem["type"] == "/problems/idempotency-key-reused"
    assert job_count(tenant.owner) == 2
    bad_key = {"Idempotency-Key": "x" * 256}
    response = tenant.post("/api/v1/batches", json={"items": items}, headers=bad_key)
    assert_problem(response, 422, "Idempotency-Key")


# Cancel -----------------------------------------------------------------------------------------


def any_job_streaming(tenant: Tenant) -> bool:
    """Whether one of the tenant's running jobs has streamed a token (its events come from the
    job's Redis Stream, which holds the deltas)."""
    running = tenant.get("/api/v1/jobs?status=running").get_json()["items"]
    return any(
        event["type"] == "job.output.delta"
        for job in running
        for event in tenant.get(f"/api/v1/jobs/{job['id']}/events").get_json()["items"]
    )


def test_cancel_ends_queued_jobs_at_once_and_stops_running_ones(tenant: Tenant) -> None:
    # More slow jobs than the test worker's 8 slots: some run, the rest wait.
    items = [chat(f"long essay {i} [[sim tokens=2000 tps=100]]") for i in range(12)]
    created = create(tenant, items)
    batch_id = created["id"]
    # Cancel once a running job has streamed some text, so that its partial text is kept.
    wait_until(lambda: any_job_streaming(tenant), timeout=15)
    response = tenant.post(f"/api/v1/batches/{batch_id}/cancel")
    assert response.status_code == 202
    answered = response.get_json()
    assert answered["counts"]["canceled"] >= 1 and answered["counts"]["running"] >= 1
    assert answered["counts"]["queued"] == 0
    asked = time.monotonic()
    done = wait_done(tenant, batch_id, timeout=15)
    assert time.monotonic() - asked < 5, "running jobs stop at once, not a heartbeat later"
    assert done["counts"]["canceled"] == 12
    assert done["canceled_at"] == answered["canceled_at"]
    lines = results(tenant, batch_id)
    assert {line["status"] for line in lines} == {"canceled"}
    stopped = [line for line in lines if line["output"] is not None]
    assert stopped and all(line["output"]["partial_text"] for line in stopped)
    events = tenant.get(f"/api/v1/jobs/{lines[-1]['id']}/events").get_json()["items"]
    assert events[-1]["type"] == "job.canceled"

    again = tenant.post(f"/api/v1/batches/{batch_id}/cancel")
    assert again.status_code == 200
    assert again.get_json()["canceled_at"] == answered["canceled_at"]


def test_canceling_a_finished_batch_changes_no_job(tenant: Tenant) -> None:
    created = create(tenant, [chat()])
    wait_done(tenant, created["id"])
    response = tenant.post(f"/api/v1/batches/{created['id']}/cancel")
    assert response.status_code == 200
    assert response.get_json()["counts"]["succeeded"] == 1


# Results, list, tenancy ----------------------------------------------------------------------


def test_the_results_download_is_streamed_page_by_page_in_item_order(
    tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batches, "RESULTS_PAGE", 2)
    created = create(tenant, [chat(str(i)) for i in range(4)] + [chat("[[sim fault=400]]")])
    wait_done(tenant, created["id"])
    response = tenant.get(f"/api/v1/batches/{created['id']}/results")
    assert response.is_streamed
    assert response.headers["Content-Disposition"].startswith("attachment")
    lines = [json.loads(line) for line in response.get_data(as_text=True).splitlines()]
    assert [line["item"] for line in lines] == [0, 1, 2, 3, 4]
    assert len({line["id"] for line in lines}) == 5
    assert lines[0]["output"]["text"] and lines[0]["error"] is None
    assert lines[4]["status"] == "failed" and lines[4]["output"] is None
    assert lines[4]["error"]["code"] == "model_bad_request"


def test_results_of_a_batch_still_running_list_every_job(tenant: Tenant) -> None:
    created = create(tenant, [chat("[[sim ttft=3]]"), chat("[[sim ttft=3]]")])
    lines = results(tenant, created["id"])
    assert [line["status"] in ("queued", "running") for line in lines] == [True, True]
    tenant.post(f"/api/v1/batches/{created['id']}/cancel")


def test_batches_are_listed_newest_first_a_page_at_a_time(tenant: Tenant) -> None:
    ids = [create(tenant, [chat()])["id"] for _ in range(3)]
    first = tenant.get("/api/v1/batches?limit=2").get_json()
    assert [b["id"] for b in first["items"]] == ids[::-1][:2]
    second = tenant.get(f"/api/v1/batches?limit=2&cursor={first['next_cursor']}").get_json()
    assert [b["id"] for b in second["items"]] == ids[:1]
    assert second["next_cursor"] is None
    assert (
        second["items"][0]["counts"]["queued"]
        + sum(second["items"][0]["counts"][s] for s in ("running", "succeeded"))
        == 1
    )
    assert_problem(tenant.get("/api/v1/batches?cursor=nope"), 422, "cursor")
    assert_problem(tenant.get("/api/v1/batches?limit=0"), 422, "limit")


def test_another_tenants_batch_is_a_404_everywhere(new_tenant) -> None:
    alice, mallory = new_tenant(), new_tenant()
    batch_id = create(alice, [chat()])["id"]
    for response in (
        mallory.get(f"/api/v1/batches/{batch_id}"),
        mallory.post(f"/api/v1/batches/{batch_id}/cancel"),
        mallory.get(f"/api/v1/batches/{batch_id}/results"),
        alice.get(f"/api/v1/batches/{uuid.uuid4()}"),
    ):
        assert_problem(response, 404)
    assert mallory.get("/api/v1/batches").get_json()["items"] == []
    assert alice.get(f"/api/v1/batches/{batch_id}").get_json()["canceled_at"] is None


def test_batches_need_an_api_key(app) -> None:
    assert_problem(app.test_client().get("/api/v1/batches"), 401)
    assert_problem(app.test_client().post("/api/v1/batches", json={"items": [chat()]}), 401)


# The batch's Socket.IO room ----------------------------------------------------------------------


def batch_token(tenant: Tenant, batch_id: str) -> str:
    response = tenant.post("/api/v1/realtime/token", json={"batch_id": batch_id})
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["batch_id"] == batch_id
    return response.get_json()["token"]


def test_the_batch_room_gets_every_state_change_of_its_jobs_and_no_delta(
    web_server: WebServer, tenant: Tenant
) -> None:
    # Answers streamed for about 2 s, in many token deltas, which the room must not carry.
    slow = "[[sim tokens=200 tps=100]]"
    created = create(tenant, [chat(slow), chat(slow)])
    other = tenant.submit("chat", {"prompt": unique(f"not in the batch {slow}")})["id"]
    seen: list[dict[str, Any]] = []
    # A token scoped to the batch: the connection is not in the owner's room, so every event
    # it gets came through the batch's room.
    client = connect(web_server, {"token": batch_token(tenant, created["id"])})
    client.on("job_event", seen.append)
    try:
        ack = client.call("subscribe", {"batch_id": created["id"]}, timeout=10)
        assert ack["ok"] is True and ack["batch_id"] == created["id"]
        assert sum(ack["counts"].values()) == 2 and ack["done"] is False
        wait_done(tenant, created["id"])
        tenant.wait_for(other)

        def finished() -> set[str]:
            return {e["job_id"] for e in seen if e["type"] == "job.succeeded"}

        wait_until(lambda: len(finished()) == 2, timeout=10)
    finally:
        client.disconnect()
    ids = {line["id"] for line in results(tenant, created["id"])}
    assert {e["job_id"] for e in seen} == ids  # nothing of the job outside the batch
    types = {e["type"] for e in seen}
    assert "job.progress" in types and "job.output.delta" not in types


def test_a_batch_room_of_another_tenant_or_from_another_scope_is_refused(
    web_server: WebServer, new_tenant
) -> None:
    alice, mallory = new_tenant(), new_tenant()
    created, second = create(alice, [chat()]), create(alice, [chat()])
    clients: list[socketio.Client] = []

    def connected(auth: dict[str, str]) -> socketio.Client:
        clients.append(connect(web_server, auth))
        return clients[-1]

    try:
        theirs = connected({"token": token(mallory)})
        refused = theirs.call("subscribe", {"batch_id": created["id"]}, timeout=10)
        missing = theirs.call("subscribe", {"batch_id": str(uuid.uuid4())}, timeout=10)
        assert refused["ok"] is False and refused["error"] == "not-found"
        assert refused.keys() == missing.keys() and refused["error"] == missing["error"]
        bad = theirs.call("subscribe", {"batch_id": "nope"}, timeout=10)
        assert bad == {"ok": False, "error": "bad-request", "detail": "send {batch_id}"}
        job_id = results(alice, created["id"])[0]["id"]
        job_scoped = connected({"token": token(alice, job_id)})
        refused = job_scoped.call("subscribe", {"batch_id": created["id"]}, timeout=10)
        assert refused["error"] == "not-found"
        batch_scoped = connected({"token": batch_token(alice, created["id"])})
        refused = batch_scoped.call("subscribe", {"batch_id": second["id"]}, timeout=10)
        assert refused["error"] == "not-found"
        refused = batch_scoped.call("subscribe", {"job_id": job_id, "after_seq": 0}, timeout=10)
        assert refused["error"] == "not-found"
        assert all(client.connected for client in clients)
    finally:
        for client in clients:
            client.disconnect()
    response = mallory.post("/api/v1/realtime/token", json={"batch_id": created["id"]})
    assert_problem(response, 404)
    both = {"batch_id": created["id"], "job_id": job_id}
    assert_problem(alice.post("/api/v1/realtime/token", json=both), 422, "batch_id")


def test_a_batch_item_may_name_only_the_models_a_single_job_may(tenant: Tenant) -> None:
    items = [
        chat("fine", model="gpt-4o-mini"),
        chat("refused", model="sim-large"),
        chat("no such role", models={"poet": "gpt-4o-mini"}),
    ]
    response = tenant.post("/api/v1/batches", json={"items": items})
    assert response.status_code == 422, response.get_json()
    fields = [error["field"] for error in response.get_json()["errors"]]
    assert fields == ["items[1].model", "items[2].models.poet"]
