"""Whole jobs, end to end: API -> PostgreSQL -> Redis -> real Celery worker -> the simulator
over HTTP through the openai client -> stored result, events, usage and cost."""

from __future__ import annotations

import json
import time
import uuid
from decimal import Decimal

import pytest
from sqlalchemy import select, update

from app.models import Job, ModelCall
from app.runtime import runtime
from tests.conftest import Tenant, undispatched_job, wait_until

pytestmark = pytest.mark.usefixtures("worker")


def unique(prompt: str) -> str:
    """Prompts differ per test so the simulator's per-prompt fault counters never collide."""
    return f"{prompt} ({uuid.uuid4().hex[:8]})"


def model_calls(job_id: str) -> list[ModelCall]:
    with runtime().db.transaction() as session:
        return list(
            session.scalars(
                select(ModelCall)
                .where(ModelCall.job_id == uuid.UUID(job_id))
                .order_by(ModelCall.id)
            )
        )


def all_events(tenant: Tenant, job_id: str) -> list[dict]:
    return tenant.get(f"/api/v1/jobs/{job_id}/events?after=0").get_json()["items"]


def test_chat_job_runs_to_a_stored_result_with_usage_and_cost(tenant: Tenant) -> None:
    created = tenant.submit("chat", {"prompt": unique("Write a haiku about queues")})
    assert created["status"] == "queued"
    job = tenant.wait_for(created["id"])
    assert job["status"] == "succeeded", job
    assert job["progress"] == 100
    assert job["attempt"] == 1

    result = tenant.get(f"/api/v1/jobs/{job['id']}/result").get_json()
    text = result["output"]["text"]
    assert len(text.split()) >= 10
    assert result["usage"]["tokens_out"] > 0 and result["usage"]["tokens_in"] > 0
    calls = model_calls(job["id"])
    assert [c.outcome for c in calls] == ["ok"]
    # The simulator reports each call's cost (as OpenRouter does): the job counts that one,
    # and the price table's figure is kept beside it.
    assert calls[0].reported_cost_usd is not None
    assert Decimal(result["usage"]["cost_usd"]) == calls[0].reported_cost_usd > 0
    assert calls[0].cost_usd > 0

    events = all_events(tenant, job["id"])
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), "seq has no gaps and no repeats"
    types = [e["type"] for e in events]
    assert types[0] == "job.queued" and types[1] == "job.started"
    assert types[-1] == "job.succeeded"
    streamed = "".join(e["data"]["text"] for e in events if e["type"] == "job.output.delta")
    assert streamed == text, "the streamed deltas add up to the stored output"


def test_structured_job_output_validates_against_the_schema(tenant: Tenant) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": False,
    }
    created = tenant.submit("structured", {"prompt": unique("A character"), "schema": schema})
    job = tenant.wait_for(created["id"])
    assert job["status"] == "succeeded", job
    data = tenant.get(f"/api/v1/jobs/{job['id']}/result").get_json()["output"]["data"]
    assert isinstance(data["name"], str) and 0 <= data["age"] <= 120 and data["tags"]


def test_structured_job_repairs_invalid_json_once(tenant: Tenant) -> None:
    schema = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]}
    prompt = unique("Title please [[sim fault=invalid_json times=1]]")
    job = tenant.wait_for(tenant.submit("structured", {"prompt": prompt, "schema": schema})["id"])
    assert job["status"] == "succeeded", job
    output = tenant.get(f"/api/v1/jobs/{job['id']}/result").get_json()["output"]
    assert output["repaired"] is True and isinstance(output["data"]["title"], str)
    assert len(model_calls(job["id"])) == 2
    logs = tenant.get(f"/api/v1/jobs/{job['id']}/logs").get_json()["items"]
    assert any("repair" in entry["message"] for entry in logs)


def test_structured_job_fails_clearly_when_the_repair_fails_too(tenant: Tenant) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    prompt = unique("Number [[sim fault=schema_mismatch]]")
    job = tenant.wait_for(tenant.submit("structured", {"prompt": prompt, "schema": schema})["id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "output_invalid"
    assert job["attempt"] == 1, "an invalid output is not retried"
    assert len(model_calls(job["id"])) == 2


def test_a_schema_that_bypassed_the_api_fails_the_job_cleanly(tenant: Tenant) -> None:
    """A row the API never saw (an older version's, or written by hand): the worker checks the
    schema again and fails the job as invalid input, instead of crashing on a $ref cycle."""
    cycle = {
        "type": "object",
        "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
        "properties": {"x": {"$ref": "#/$defs/a"}},
    }
    job_id = undispatched_job(tenant.owner, kind="structured", extra_input={"schema": cycle})
    runtime().jobs.dispatch(job_id)
    job = tenant.wait_for(str(job_id))
    assert job["status"] == "failed"
    assert job["error"]["code"] == "invalid_input", job["error"]
    assert "#/$defs/b/$ref" in job["error"]["message"]
    assert model_calls(str(job_id)) == [], "refused before any model call"


def test_rate_limit_with_retry_after_is_retried_then_succeeds(tenant: Tenant) -> None:
    prompt = unique("Hello [[sim fault=429 times=1 retry_after=1]]")
    started = time.monotonic()
    job = tenant.wait_for(tenant.submit("chat", {"prompt": prompt})["id"])
    elapsed = time.monotonic() - started
    assert job["status"] == "succeeded", job
    assert job["attempt"] == 2
    assert elapsed >= 1.0, "Retry-After was honoured"
    assert [c.outcome for c in model_calls(job["id"])] == ["model_rate_limited", "ok"]
    retrying = [e for e in all_events(tenant, job["id"]) if e["type"] == "job.retrying"]
    assert retrying[0]["data"]["error"]["code"] == "model_rate_limited"
    assert retrying[0]["data"]["delay"] >= 1.0


def test_bad_request_from_the_model_fails_at_once_with_its_code(tenant: Tenant) -> None:
    job = tenant.wait_for(tenant.submit("chat", {"prompt": unique("[[sim fault=400]] hi")})["id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "model_bad_request"
    assert "400" in job["error"]["message"]
    assert job["attempt"] == 1
    result = tenant.get(f"/api/v1/jobs/{job['id']}/result").get_json()
    assert result["output"] is None and result["error"]["code"] == "model_bad_request"


def test_server_errors_exhaust_the_attempt_budget(tenant: Tenant) -> None:
    prompt = unique("[[sim fault=500]] hi")
    job = tenant.wait_for(tenant.submit("chat", {"prompt": prompt}, max_attempts=2)["id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "model_unavailable"
    assert job["attempt"] == 2
    assert len(model_calls(job["id"])) == 2


def test_dropped_stream_is_retried_and_partial_output_is_not_the_result(tenant: Tenant) -> None:
    prompt = unique("Tell a story [[sim fault=drop times=1]]")
    job = tenant.wait_for(tenant.submit("chat", {"prompt": prompt})["id"])
    assert job["status"] == "succeeded", job
    assert [c.outcome for c in model_calls(job["id"])] == ["model_stream_dropped", "ok"]
    text = tenant.get(f"/api/v1/jobs/{job['id']}/result").get_json()["output"]["text"]
    events = all_events(tenant, job["id"])
    last_start = max(i for i, e in enumerate(events) if e["type"] == "job.started")
    first_try = "".join(
        e["data"]["text"] for e in events[:last_start] if e["type"] == "job.output.delta"
    )
    second_try = "".join(
        e["data"]["text"] for e in events[last_start:] if e["type"] == "job.output.delta"
    )
    assert first_try and text.startswith(first_try) and len(first_try) < len(text)
    assert second_try == text, "the result is the complete answer of the attempt that succeeded"


def test_canceling_a_queued_job_is_immediate(tenant: Tenant) -> None:
    job_id = undispatched_job(tenant.owner)  # nobody will claim it before the cancel
    response = tenant.post(f"/api/v1/jobs/{job_id}/cancel")
    assert response.status_code == 200
    assert response.get_json()["status"] == "canceled"
    events = tenant.get(f"/api/v1/jobs/{job_id}/events?after=0").get_json()["items"]
    assert [e["type"] for e in events] == ["job.queued", "job.canceled"]


def test_canceling_a_running_job_closes_the_stream_and_keeps_partial_usage(
    tenant: Tenant, simulator
) -> None:
    before = simulator.stats()["canceled_by_client"]
    prompt = unique("A long essay [[sim tokens=600 tps=30]]")
    job_id = tenant.submit("chat", {"prompt": prompt})["id"]
    wait_until(lambda: any(e["type"] == "job.output.delta" for e in all_events(tenant, job_id)))
    response = tenant.post(f"/api/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202
    assert response.get_json()["cancel_requested"] is True
    asked = time.monotonic()
    job = tenant.wait_for(job_id, timeout=10)
    assert job["status"] == "canceled"
    assert time.monotonic() - asked < 3, "cancellation is fast, not a heartbeat later"
    result = tenant.get(f"/api/v1/jobs/{job_id}/result").get_json()
    assert result["output"]["partial_text"]
    assert 0 < result["usage"]["tokens_out"] < 600
    assert [c.outcome for c in model_calls(job_id)] == ["interrupted"]
    wait_until(lambda: simulator.stats()["canceled_by_client"] > before, timeout=5)


def test_retry_creates_a_new_job_linked_to_the_old_one(tenant: Tenant) -> None:
    response = tenant.post(
        "/api/v1/jobs",
        json={
            "kind": "chat",
            "input": {"prompt": unique("[[sim fault=401]]")},
            "priority": 7,
            "max_attempts": 1,
        },
    )
    failed = tenant.wait_for(response.get_json()["id"])
    assert failed["error"]["code"] == "model_auth_failed"
    # Money is a plain decimal string, never scientific notation ("0E-8").
    assert failed["usage"]["cost_usd"] == "0.00000000"
    # The configuration has changed since (another model for the kind): the retry still asks
    # for the model the original was made with.
    with runtime().db.transaction() as session:
        session.execute(
            update(Job).where(Job.id == uuid.UUID(failed["id"])).values(model="model-of-then")
        )
    response = tenant.post(f"/api/v1/jobs/{failed['id']}/retry")
    assert response.status_code == 202
    retried = response.get_json()
    assert retried["retry_of"] == failed["id"] and retried["id"] != failed["id"]
    assert response.headers["Location"].endswith(retried["id"])
    detail = tenant.get(f"/api/v1/jobs/{retried['id']}").get_json()
    original = tenant.get(f"/api/v1/jobs/{failed['id']}").get_json()
    assert detail["input"] == original["input"]
    assert (detail["kind"], detail["priority"], detail["max_attempts"], detail["model"]) == (
        "chat",
        7,
        1,
        "model-of-then",
    )


def test_delete_only_finished_jobs(tenant: Tenant) -> None:
    job_id = tenant.submit("chat", {"prompt": unique("slow [[sim tokens=400 tps=40]]")})["id"]
    tenant.wait_for(job_id, "running")
    conflict = tenant.delete(f"/api/v1/jobs/{job_id}")
    assert conflict.status_code == 409
    assert conflict.headers["Content-Type"] == "application/problem+json"
    tenant.post(f"/api/v1/jobs/{job_id}/cancel")
    tenant.wait_for(job_id)
    assert tenant.delete(f"/api/v1/jobs/{job_id}").status_code == 204
    assert tenant.get(f"/api/v1/jobs/{job_id}").status_code == 404


def test_events_long_poll_returns_when_a_new_event_arrives(tenant: Tenant) -> None:
    job_id = tenant.submit("chat", {"prompt": unique("hi [[sim ttft=0.5]]")})["id"]
    page = tenant.get(f"/api/v1/jobs/{job_id}/events?after=1&wait=10").get_json()
    assert page["items"] and page["items"][0]["seq"] == 2
    assert page["source"] == "stream"


def test_stats_aggregate_the_callers_jobs(new_tenant) -> None:
    tenant = new_tenant()
    ids = [tenant.submit("chat", {"prompt": unique(f"stats {i}")})["id"] for i in range(3)]
    for job_id in ids:
        tenant.wait_for(job_id)
    stats = tenant.get("/api/v1/stats").get_json()
    assert stats["by_status"]["succeeded"] == 3
    assert stats["by_kind"]["chat"]["succeeded"] == 3
    assert stats["tokens_out"] > 0 and Decimal(stats["cost_usd"]) > 0
    assert stats["duration_seconds"]["count"] == 3
    assert stats["duration_seconds"]["p50"] > 0


def test_a_job_past_its_time_limit_fails_and_its_stream_is_closed(tenant: Tenant) -> None:
    limit = runtime().settings.job_soft_time_limit
    prompt = unique(f"endless [[sim tokens=400 duration={limit * 3}]]")
    started = time.monotonic()
    job = tenant.wait_for(tenant.submit("chat", {"prompt": prompt})["id"], timeout=limit * 2)
    assert job["status"] == "failed" and job["error"]["code"] == "time_limit_exceeded"
    assert time.monotonic() - started < limit + 4, "stopped by the heartbeat, not the model"
    assert [c.outcome for c in model_calls(job["id"])] == ["interrupted"]


def test_events_reach_the_socketio_channel_for_the_job_and_owner_rooms(tenant: Tenant) -> None:
    pubsub = runtime().redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("conveyor-socketio")
    try:
        job_id = tenant.submit("chat", {"prompt": unique("emitted")})["id"]
        tenant.wait_for(job_id)
        emitted = []
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.2)  # None also for the subscribe notice
            if message is None:
                continue
            (envelope,) = json.loads(message["data"])["data"]
            if envelope["job_id"] == job_id:
                emitted.append(json.loads(message["data"]) | {"data": envelope})
    finally:
        pubsub.close()
    types = [p["data"]["type"] for p in emitted]
    assert types[0] == "job.queued" and types[-1] == "job.succeeded"
    assert "job.output.delta" in types
    for payload in emitted:
        assert payload["event"] == "job_event" and f"job:{job_id}" in payload["room"]
        is_delta = payload["data"]["type"] == "job.output.delta"
        assert (f"user:{tenant.owner}" in payload["room"]) is not is_delta


def test_socketio_messages_match_what_the_python_socketio_emitter_publishes(app) -> None:
    """Events are published in python-socketio's message-queue format by our own Redis
    script; this pins that format to the library's, so an upgrade that changes it fails here."""
    from flask_socketio import SocketIO

    from app.jobs.events import SOCKETIO_CHANNEL, Event
    from app.jobs.payloads import QueuedPayload

    rt = runtime()
    pubsub = rt.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(SOCKETIO_CHANNEL)
    event = Event(uuid.uuid4(), "owner-x", 1, QueuedPayload(kind="chat", retry_of=None))
    try:
        rt.bus.publish([event])
        emitter = SocketIO(message_queue=rt.settings.redis_url, channel=SOCKETIO_CHANNEL)
        emitter.emit(
            "job_event", event.envelope(), to=[f"job:{event.job_id}", "user:owner-x"], namespace="/"
        )
        messages = []
        deadline = time.monotonic() + 3
        while len(messages) < 2 and time.monotonic() < deadline:
            if (message := pubsub.get_message(timeout=0.2)) is not None:
                messages.append(json.loads(message["data"]))
    finally:
        pubsub.close()
    ours, theirs = messages
    assert ours.pop("host_id") != theirs.pop("host_id")
    assert ours == theirs


def test_stats_sum_every_status_and_kind_of_the_owner_only() -> None:
    # /stats sums its totals over (status, kind) groups (app/jobs/transitions.py job_stats);
    # rows written directly, so that several statuses and kinds, cache use and durations are
    # known exactly.
    from datetime import UTC, datetime, timedelta

    from app.jobs.transitions import job_stats

    owner, other = f"stats-{uuid.uuid4()}", f"stats-{uuid.uuid4()}"
    start = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [
        # (owner, kind, status, tokens_in, tokens_out, cost, input cache, cached, seconds)
        (owner, "chat", "succeeded", 10, 20, "0.5", True, True, 2),
        (owner, "chat", "succeeded", 1, 2, "0.25", True, False, 4),
        (owner, "chat", "failed", 3, 0, "0.125", False, False, None),
        (owner, "structured", "succeeded", 5, 5, "1", False, False, 6),
        (owner, "structured", "queued", 0, 0, "0", True, False, None),
        (other, "chat", "succeeded", 100, 100, "9", True, True, 8),
    ]
    with runtime().db.transaction() as session:
        for who, kind, status, tin, tout, cost, cache, cached, seconds in rows:
            session.add(
                Job(
                    id=uuid.uuid4(),
                    owner=who,
                    kind=kind,
                    status=status,
                    input={"prompt": "x", **({"cache": True} if cache else {})},
                    max_attempts=3,
                    tokens_in=tin,
                    tokens_out=tout,
                    cost_usd=Decimal(cost),
                    cached=cached,
                    started_at=start if seconds else None,
                    finished_at=start + timedelta(seconds=seconds) if seconds else None,
                )
            )
    with runtime().db.transaction() as session:
        stats = job_stats(session, owner)
    assert stats["by_status"] == {
        "queued": 1,
        "running": 0,
        "succeeded": 3,
        "failed": 1,
        "canceled": 0,
    }
    assert stats["by_kind"] == {
        "chat": {"succeeded": 2, "failed": 1},
        "structured": {"succeeded": 1, "queued": 1},
    }
    assert (stats["tokens_in"], stats["tokens_out"]) == (19, 27)
    assert stats["cost_usd"] == Decimal("1.875")
    assert stats["duration_seconds"]["count"] == 3
    assert stats["duration_seconds"]["p50"] == pytest.approx(4.0)
    # Requests: succeeded jobs that asked for the cache (the queued one does not count yet).
    assert stats["cache"] == {"requests": 2, "hits": 1}
