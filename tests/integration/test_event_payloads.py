"""Every event real jobs publish matches its payload model (app/jobs/payloads.py): what
PostgreSQL stores, what the Redis Stream holds byte for byte, and what the events API serves
from either. A publisher that drifts from its model (a key added, renamed, dropped or
reformatted) fails here.

The jobs run through the whole stack (API, PostgreSQL, Redis, the in-process Celery worker,
the simulator over HTTP); together they publish every event type, in every shape: success,
a structured job's repair log, a model failure, a retried attempt, a multi-step job's steps
(started, finished, and reused by its next attempt), a cancel while queued and
while running, the sweeper's three recoveries, a scheduled job that expired, a retry of a
failed job, and a job of the batch tier through a provider batch.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select, update

from app.execution.provider_batches import ProviderBatches
from app.jobs.events import stream_key
from app.jobs.payloads import PAYLOADS, EventEnvelope
from app.jobs.states import EPHEMERAL_EVENTS, EventType
from app.keys.api_keys import create_api_key
from app.models import Job, JobEvent
from app.runtime import runtime
from tests.conftest import Tenant, undispatched_job, wait_until

pytestmark = pytest.mark.usefixtures("worker")

REPAIR_SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}},
    "required": ["title"],
}


@dataclass
class Scenario:
    job_id: str
    # Types the job's events must include, and the data some of them must carry.
    expect_types: set[EventType]
    expect_data: dict[EventType, dict[str, Any]] = field(default_factory=dict)
    # Created through the API, so its stream holds every event from seq 1 (a job made by
    # `undispatched_job` has its job.queued in PostgreSQL only).
    whole_stream: bool = True
    # The stream's entries once the job ended, before any test deletes the stream.
    stream: list[str] = field(default_factory=list)


def _unique(prompt: str) -> str:
    return f"{prompt} ({uuid.uuid4().hex[:8]})"


def _expire_lease(job_id: uuid.UUID, cancel_requested: bool = False) -> None:
    values: dict[str, Any] = {"lease_expires_at": func.now() - timedelta(seconds=1)}
    if cancel_requested:
        values["cancel_requested_at"] = func.now()
    with runtime().db.transaction() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def _lost_worker_job(owner: str, **row: Any) -> uuid.UUID:
    """A job claimed by a worker that then died: its lease has run out."""
    job_id = undispatched_job(owner)
    if row:
        with runtime().db.transaction() as session:
            session.execute(update(Job).where(Job.id == job_id).values(**row))
    assert runtime().jobs.claim_job(job_id, "worker-that-died") is not None
    return job_id


def _events_page(tenant: Tenant, job_id: str) -> dict[str, Any]:
    response = tenant.get(f"/api/v1/jobs/{job_id}/events?after=0&limit=1000")
    assert response.status_code == 200, response.get_json()
    return response.get_json()


@pytest.fixture(scope="module")
def scenarios(app: Flask, worker: object) -> Iterator[tuple[Tenant, dict[str, Scenario]]]:
    """Starts every scenario at once (the worker runs them side by side) and waits for all."""
    owner = f"tenant-{uuid.uuid4().hex[:10]}"
    tenant = Tenant(owner, create_api_key(runtime().db, owner), app.test_client())

    def submit(kind: str, job_input: dict[str, Any]) -> str:
        return tenant.submit(kind, job_input)["id"]

    found: dict[str, Scenario] = {
        "succeeded": Scenario(
            submit("chat", {"prompt": _unique("A story [[sim tokens=150 tps=200]]")}),
            {
                EventType.QUEUED,
                EventType.STARTED,
                EventType.PROGRESS,
                EventType.OUTPUT_DELTA,
                EventType.SUCCEEDED,
            },
            {EventType.QUEUED: {"retry_of": None}},
        ),
        "repaired": Scenario(
            submit(
                "structured",
                {
                    "prompt": _unique("Title please [[sim fault=invalid_json times=1]]"),
                    "schema": REPAIR_SCHEMA,
                },
            ),
            {EventType.LOG, EventType.SUCCEEDED},
            {EventType.LOG: {"level": "warning"}},
        ),
        "failed": Scenario(
            submit("chat", {"prompt": _unique("[[sim fault=400]] hi")}),
            {EventType.FAILED},
            {EventType.FAILED: {"attempt": 1}},
        ),
        "retried": Scenario(
            submit("chat", {"prompt": _unique("Hello [[sim fault=drop times=1]]")}),
            {EventType.RETRYING, EventType.SUCCEEDED},
            {EventType.SUCCEEDED: {"attempt": 2}},
        ),
        # Steps started and finished, then reused by the attempt after the edit's 500.
        "steps": Scenario(
            submit(
                "article",
                {
                    "topic": _unique("Conveyor belts"),
                    "edit_notes": _unique("[[sim fault=500 times=1]]"),
                    "max_tokens": 30,
                },
            ),
            {EventType.STEP, EventType.RETRYING, EventType.SUCCEEDED},
            {EventType.SUCCEEDED: {"attempt": 2}},
        ),
    }

    queued = undispatched_job(owner)
    assert tenant.post(f"/api/v1/jobs/{queued}/cancel").status_code == 200
    found["canceled while queued"] = Scenario(
        str(queued),
        {EventType.CANCELED},
        {EventType.CANCELED: {"reason": "requested"}},
        whole_stream=False,
    )

    running = submit("chat", {"prompt": _unique("A long essay [[sim tokens=600 tps=40]]")})
    wait_until(
        lambda: any(
            e["type"] == EventType.OUTPUT_DELTA for e in _events_page(tenant, running)["items"]
        )
    )
    assert tenant.post(f"/api/v1/jobs/{running}/cancel").status_code == 202
    found["canceled while running"] = Scenario(
        running, {EventType.CANCELED}, {EventType.CANCELED: {"reason": "requested"}}
    )

    # Scheduled an hour ahead, with an expiry that is then moved into the past: the sweep
    # below fails it `expired` (its job.queued carries run_at and expires_at).
    scheduled = tenant.submit(
        "chat",
        {"prompt": _unique("later")},
        run_at=(datetime.now(UTC) + timedelta(hours=1)).isoformat(),
        expires_after=60,
    )["id"]
    with runtime().db.transaction() as session:
        session.execute(
            update(Job)
            .where(Job.id == uuid.UUID(scheduled))
            .values(expires_at=func.now() - timedelta(seconds=1))
        )
    found["expired"] = Scenario(
        scheduled,
        {EventType.QUEUED, EventType.FAILED},
        {EventType.FAILED: {"reason": "expired", "attempt": 0}},
    )

    lost_retried = _lost_worker_job(owner)
    lost_failed = _lost_worker_job(owner, max_attempts=1)
    lost_canceled = _lost_worker_job(owner)
    for job_id in (lost_retried, lost_failed):
        _expire_lease(job_id)
    _expire_lease(lost_canceled, cancel_requested=True)
    runtime().jobs.sweep()
    worker_lost = {"reason": "worker_lost", "worker": "worker-that-died"}
    found["sweeper retried"] = Scenario(
        str(lost_retried),
        {EventType.RETRYING, EventType.SUCCEEDED},
        {EventType.RETRYING: worker_lost},
        whole_stream=False,
    )
    found["sweeper failed"] = Scenario(
        str(lost_failed), {EventType.FAILED}, {EventType.FAILED: worker_lost}, whole_stream=False
    )
    found["sweeper canceled"] = Scenario(
        str(lost_canceled),
        {EventType.CANCELED},
        {EventType.CANCELED: worker_lost},
        whole_stream=False,
    )
    found["provider batch"] = Scenario(
        _through_a_provider_batch(submit),
        {EventType.PROVIDER_BATCH, EventType.SUCCEEDED},
    )

    for scenario in found.values():
        tenant.wait_for(scenario.job_id, timeout=30)
    failed_id = found["failed"].job_id
    again = tenant.post(f"/api/v1/jobs/{failed_id}/retry")
    assert again.status_code == 202, again.get_json()
    found["retry of a failed job"] = Scenario(
        again.get_json()["id"], {EventType.QUEUED}, {EventType.QUEUED: {"retry_of": failed_id}}
    )
    tenant.wait_for(found["retry of a failed job"].job_id, timeout=30)
    for scenario in found.values():
        scenario.stream = [
            fields[b"e"].decode()
            for _id, fields in runtime().redis.xrange(stream_key(scenario.job_id))
        ]
    yield tenant, found


def _through_a_provider_batch(submit: Any) -> str:
    """A batch-tier job, run to its end by the provider batch task (no beat runs here): the
    simulator's batch is in progress for 2 s, so some run publishes its counts."""
    job_id = submit("chat", {"prompt": _unique("Batched"), "service_tier": "batch"})
    batches = ProviderBatches(runtime().jobs, runtime().model_client)

    def ended() -> bool:
        batches.run()
        with runtime().db.transaction() as session:
            status = session.scalar(select(Job.status).where(Job.id == uuid.UUID(job_id)))
        return status in ("succeeded", "failed", "canceled")

    wait_until(ended, timeout=30, interval=0.1)
    return str(job_id)


def stored_rows(job_id: str) -> list[JobEvent]:
    with runtime().db.transaction() as session:
        return list(
            session.scalars(
                select(JobEvent).where(JobEvent.job_id == uuid.UUID(job_id)).order_by(JobEvent.seq)
            )
        )


def assert_matches_its_model(event_type: str, data: dict[str, Any]) -> None:
    model = PAYLOADS[EventType(event_type)]
    payload = model.model_validate(data)  # refuses unknown, missing and mistyped fields
    assert payload.as_data() == data, f"{event_type}: the model would send something else"


SCENARIOS = [
    "succeeded",
    "repaired",
    "failed",
    "retried",
    "steps",
    "canceled while queued",
    "canceled while running",
    "sweeper retried",
    "sweeper failed",
    "sweeper canceled",
    "expired",
    "retry of a failed job",
    "provider batch",
]


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_stored_event_matches_its_payload_model(scenarios, name: str) -> None:
    _tenant, found = scenarios
    rows = stored_rows(found[name].job_id)
    assert rows, "the job stored its events"
    for row in rows:
        assert EventType(row.type) not in EPHEMERAL_EVENTS
        assert_matches_its_model(row.type, row.data)


@pytest.mark.parametrize("name", SCENARIOS)
def test_the_stream_holds_exactly_what_the_models_write(scenarios, name: str) -> None:
    """Byte for byte: the envelope in Redis is the model's data in the model's key order."""
    _tenant, found = scenarios
    scenario = found[name]
    assert scenario.stream, "the job published to its stream"
    types = set()
    for raw in scenario.stream:
        envelope = EventEnvelope.model_validate_json(raw).root
        types.add(EventType(envelope.type))
        written = json.loads(raw)
        rewritten = {**written, "data": envelope.data.as_data()}
        assert json.dumps(rewritten, separators=(",", ":")) == raw
        for event_type, expected in scenario.expect_data.items():
            if envelope.type == event_type:
                assert expected.items() <= written["data"].items(), (event_type, written)
    missing = scenario.expect_types - types
    assert not missing, f"{name}: no {sorted(missing)} in {sorted(types)}"


@pytest.mark.parametrize("name", SCENARIOS)
def test_the_events_api_serves_them_from_the_stream_and_from_postgres(scenarios, name: str) -> None:
    tenant, found = scenarios
    job_id = found[name].job_id
    live = _events_page(tenant, job_id)
    assert live["source"] == ("stream" if found[name].whole_stream else "database")
    runtime().redis.delete(stream_key(job_id))  # as once the stream has expired
    replayed = _events_page(tenant, job_id)
    assert replayed["source"] == "database"
    for item in live["items"] + replayed["items"]:
        envelope = EventEnvelope.model_validate(item).root
        data = envelope.data.as_data()
        assert data == item["data"]
        assert_matches_its_model(item["type"], item["data"])
    # A replay from PostgreSQL has no deltas: its terminal event carries the stored output.
    output = tenant.get(f"/api/v1/jobs/{job_id}/result").get_json()["output"]
    assert replayed["items"][-1]["data"].get("output") == output


def test_together_the_jobs_published_every_event_type_in_every_optional_shape(
    scenarios,
) -> None:
    _tenant, found = scenarios
    seen: dict[EventType, set[str]] = {event_type: set() for event_type in EventType}
    for scenario in found.values():
        for row in stored_rows(scenario.job_id):
            seen[EventType(row.type)].update(row.data)
        for raw in scenario.stream:
            envelope = json.loads(raw)
            seen[EventType(envelope["type"])].update(envelope["data"])
    for event_type, model in PAYLOADS.items():
        if event_type is EventType.LOG:
            assert {"level", "message", "error"} <= seen[event_type]
            continue
        published = {name for name in model.model_fields if name != "output"}
        assert published <= seen[event_type], f"{event_type}: {published - seen[event_type]}"
