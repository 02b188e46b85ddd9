"""At-least-once delivery made effect-once: idempotent creation, claims by compare-and-set,
fencing by attempt, and the sweeper. Against the real PostgreSQL, Redis and Celery worker."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from app.jobs import transitions
from app.jobs.events import stream_key
from app.jobs.payloads import ProgressPayload, SucceededPayload
from app.models import Job, ModelCall
from app.queue import QUEUE
from app.runtime import runtime
from tests.conftest import Tenant, job_row, undispatched_job, wait_until

pytestmark = pytest.mark.usefixtures("worker")


def count_calls(job_id: uuid.UUID) -> int:
    with runtime().db.transaction() as session:
        return session.scalar(select(func.count()).where(ModelCall.job_id == job_id))


def broker_drained() -> bool:
    client = runtime().redis
    # Kombu keeps one list per priority step: "conveyor", "conveyor:1" ... "conveyor:9".
    queued = sum(client.llen(key) for key in [QUEUE, *(f"{QUEUE}:{n}" for n in range(1, 10))])
    return queued == 0 and client.hlen("unacked") == 0


def test_twenty_concurrent_posts_with_one_idempotency_key_make_one_job(tenant: Tenant, app) -> None:
    body = {"kind": "chat", "input": {"prompt": f"once {uuid.uuid4()}"}}
    headers = {"Idempotency-Key": f"key-{uuid.uuid4()}"}

    def post(_: int) -> tuple[int, str]:
        with app.test_client() as client:
            response = client.post("/api/v1/jobs", json=body, headers={**tenant.headers, **headers})
            return response.status_code, response.get_json()["id"]

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(post, range(20)))
    assert len({job_id for _, job_id in results}) == 1
    assert sorted(status for status, _ in results).count(202) == 1
    assert {status for status, _ in results} <= {200, 202}
    with runtime().db.transaction() as session:
        assert session.scalar(select(func.count()).where(Job.owner == tenant.owner)) == 1


def test_same_idempotency_key_with_another_body_is_a_clear_4xx(tenant: Tenant) -> None:
    headers = {"Idempotency-Key": "reused-key"}
    first = tenant.post(
        "/api/v1/jobs", json={"kind": "chat", "input": {"prompt": "a"}}, headers=headers
    )
    assert first.status_code == 202
    replay = tenant.post(
        "/api/v1/jobs", json={"kind": "chat", "input": {"prompt": "a"}}, headers=headers
    )
    assert replay.status_code == 200 and replay.get_json()["id"] == first.get_json()["id"]
    assert replay.headers["Idempotent-Replayed"] == "true"
    other = tenant.post(
        "/api/v1/jobs", json={"kind": "chat", "input": {"prompt": "b"}}, headers=headers
    )
    assert other.status_code == 422
    problem = other.get_json()
    assert problem["type"] == "/problems/idempotency-key-reused"
    assert problem["errors"][0]["field"] == "Idempotency-Key"


def test_a_body_spelling_its_defaults_is_a_replay_of_one_leaving_them_out(
    tenant: Tenant,
) -> None:
    headers = {"Idempotency-Key": f"defaults-{uuid.uuid4()}"}
    plain = {"kind": "chat", "input": {"prompt": "same job"}}
    first = tenant.post("/api/v1/jobs", json=plain, headers=headers)
    assert first.status_code == 202
    spelled = {
        "kind": "chat",
        "input": {"prompt": "same job", "system": None, "max_tokens": None},
        "priority": 0,
        "max_attempts": runtime().settings.job_max_attempts,
    }
    replay = tenant.post("/api/v1/jobs", json=spelled, headers=headers)
    assert replay.status_code == 200, replay.get_json()
    assert replay.get_json()["id"] == first.get_json()["id"]
    # A value other than the default is another request.
    other = tenant.post("/api/v1/jobs", json={**spelled, "max_attempts": 1}, headers=headers)
    assert other.status_code == 422


def test_duplicate_task_delivery_runs_the_model_once(tenant: Tenant) -> None:
    job_id = undispatched_job(tenant.owner)
    assert runtime().jobs.dispatch(job_id) and runtime().jobs.dispatch(job_id)
    job = tenant.wait_for(str(job_id))
    assert job["status"] == "succeeded"
    wait_until(broker_drained)
    assert job_row(job_id).attempt == 1
    assert count_calls(job_id) == 1


def test_two_workers_racing_for_a_claim_one_wins(tenant: Tenant, app) -> None:
    job_id = undispatched_job(tenant.owner)
    barrier = threading.Barrier(10)

    def claim(n: int) -> transitions.Claim | None:
        with app.app_context():
            barrier.wait()
            return runtime().jobs.claim_job(job_id, f"racer-{n}")

    with ThreadPoolExecutor(max_workers=10) as pool:
        claims = [c for c in pool.map(claim, range(10)) if c is not None]
    assert len(claims) == 1
    row = job_row(job_id)
    assert row.status == "running" and row.attempt == 1
    assert row.worker is not None and row.worker.startswith("racer-")


def test_a_stale_attempt_cannot_write(tenant: Tenant) -> None:
    job_id = undispatched_job(tenant.owner)
    stale = runtime().jobs.claim_job(job_id, "ghost")
    assert stale is not None
    expire_lease(job_id)
    report = runtime().jobs.sweep()
    assert report.recovered >= 1
    with pytest.raises(transitions.LeaseLost):
        runtime().jobs.fenced_update(
            stale, stale.seq + 1, ProgressPayload(progress=50), progress=50.0
        )
    with pytest.raises(transitions.LeaseLost):
        runtime().jobs.finish_job(
            stale,
            stale.seq + 2,
            SucceededPayload(attempt=stale.attempt),
            output={"text": "stale"},
        )
    job = tenant.wait_for(str(job_id))
    assert job["status"] == "succeeded" and job["attempt"] == 2
    result = tenant.get(f"/api/v1/jobs/{job_id}/result").get_json()
    assert result["output"]["text"] != "stale"


def test_sweeper_republishes_a_job_nobody_claimed(tenant: Tenant) -> None:
    job_id = undispatched_job(tenant.owner, dispatched_ago=timedelta(minutes=5))
    report = runtime().jobs.sweep()
    assert report.republished >= 1
    job = tenant.wait_for(str(job_id))
    assert job["status"] == "succeeded" and job["attempt"] == 1


def test_sweeper_recovers_an_expired_lease(tenant: Tenant) -> None:
    job_id = undispatched_job(tenant.owner)
    lost = runtime().jobs.claim_job(job_id, "worker-that-died")
    assert lost is not None
    expire_lease(job_id)
    runtime().jobs.sweep()
    job = tenant.wait_for(str(job_id))
    assert job["status"] == "succeeded" and job["attempt"] == 2
    events = tenant.get(f"/api/v1/jobs/{job_id}/events?after=0").get_json()["items"]
    retrying = [e for e in events if e["type"] == "job.retrying"]
    assert retrying[0]["data"]["reason"] == "worker_lost"
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs))


def test_sweeper_fails_a_lost_job_past_its_attempts(tenant: Tenant) -> None:
    job_id = undispatched_job(tenant.owner)
    with runtime().db.transaction() as session:
        session.execute(update(Job).where(Job.id == job_id).values(max_attempts=1))
    assert runtime().jobs.claim_job(job_id, "doomed") is not None
    expire_lease(job_id)
    runtime().jobs.sweep()
    row = job_row(job_id)
    assert row.status == "failed" and row.error_code == "worker_lost"
    assert row.lease_expires_at is None


def test_sweep_runs_as_a_celery_task(tenant: Tenant) -> None:
    job_id = undispatched_job(tenant.owner, dispatched_ago=timedelta(minutes=5))
    runtime().celery.send_task("conveyor.sweep")
    assert tenant.wait_for(str(job_id))["status"] == "succeeded"


def test_the_lease_is_renewed_while_a_long_call_runs(tenant: Tenant) -> None:
    lease = runtime().settings.lease_seconds
    job_id = tenant.submit("chat", {"prompt": f"long [[sim tokens=100 duration={lease * 2}]]"})[
        "id"
    ]
    job = tenant.wait_for(job_id, timeout=lease * 4)
    assert job["status"] == "succeeded" and job["attempt"] == 1


def test_event_streams_expire(tenant: Tenant) -> None:
    job_id = tenant.submit("chat", {"prompt": "ttl"})["id"]
    tenant.wait_for(job_id)
    ttl = runtime().redis.ttl(stream_key(job_id))
    assert 0 < ttl <= runtime().settings.event_stream_ttl


def test_a_hole_in_the_stream_sends_readers_to_postgres(tenant: Tenant) -> None:
    """A worker killed between its commit and its publish leaves the stream without that
    event (found by the soak); a replay must not present the stream as complete."""
    job_id = tenant.submit("chat", {"prompt": "a hole"})["id"]
    tenant.wait_for(job_id)
    runtime().redis.xdel(stream_key(job_id), "0-2")  # job.started never reached Redis
    page = tenant.get(f"/api/v1/jobs/{job_id}/events?after=0").get_json()
    assert page["source"] == "database"
    seqs = [item["seq"] for item in page["items"]]
    assert seqs[:2] == [1, 2] and page["items"][-1]["type"] == "job.succeeded"
    assert [item["prev"] for item in page["items"]] == [0, *seqs[:-1]]
    # Past the hole the stream is whole again and serves the deltas.
    assert tenant.get(f"/api/v1/jobs/{job_id}/events?after=2").get_json()["source"] == "stream"


def expire_lease(job_id: uuid.UUID) -> None:
    with runtime().db.transaction() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_expires_at=func.now() - timedelta(seconds=1))
        )


def test_a_cancel_whose_signal_was_lost_arrives_with_the_heartbeat(tenant: Tenant) -> None:
    job_id = tenant.submit("chat", {"prompt": f"slow {uuid.uuid4()} [[sim tokens=300 tps=30]]"})[
        "id"
    ]
    tenant.wait_for(job_id, "running")
    # What the API does, minus the Redis message: only the row says "cancel".
    with runtime().db.transaction() as session:
        session.execute(
            update(Job).where(Job.id == uuid.UUID(job_id)).values(cancel_requested_at=func.now())
        )
    heartbeat = runtime().settings.heartbeat_seconds
    job = tenant.wait_for(job_id, timeout=heartbeat * 3 + 2)
    assert job["status"] == "canceled"
