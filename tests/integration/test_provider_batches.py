"""Jobs of `service_tier: "batch"` through the real worker, the simulator's Batch API and the
beat task's run (app/execution/provider_batches.py), driven here by a thread of this process.

The beat thread is started once the test's jobs are handed over, so that they are collected
into one provider batch whatever the machine's speed.
"""

from __future__ import annotations

import io
import json
import threading
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import openai
import pytest
from flask import Flask
from sqlalchemy import text

from app.execution.provider_batches import ProviderBatches
from app.llm.batch_api import METADATA_KEY
from app.models import OUTSTANDING
from app.runtime import runtime
from devtools.simprocess import SimulatorProcess
from tests.conftest import Tenant, job_row, wait_until
from tests.integration.test_api import assert_problem

pytestmark = pytest.mark.usefixtures("worker")

SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}},
    "required": ["title"],
    "additionalProperties": False,
}


class Beat:
    """Runs the provider batch task every 0.1 s in a thread, once started."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[BaseException] = []

    def start(self) -> None:
        batches = ProviderBatches(runtime().jobs, runtime().model_client)

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    batches.run()
                except Exception as error:  # shown by the test's assertion
                    self.errors.append(error)
                self._stop.wait(0.1)

        self._thread = threading.Thread(target=loop, name="test-batch-beat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)


@pytest.fixture
def beat(app: Flask, simulator: SimulatorProcess) -> Iterator[Beat]:
    simulator.configure(batch_validating=0.05, batch_seconds=0.6, batch_finalizing=0.05)
    running = Beat()
    yield running
    running.stop()
    simulator.configure(batch_validating=0.2, batch_seconds=2.0, batch_finalizing=0.2)
    assert not running.errors, running.errors


def submit_batched(tenant: Tenant, prompt: str, kind: str = "chat", **extra: Any) -> str:
    job_input = {"prompt": f"{prompt} {uuid.uuid4().hex[:6]}", "service_tier": "batch", **extra}
    return str(tenant.submit(kind, job_input)["id"])


def phases(job_id: str) -> list[str]:
    with runtime().db.engine.connect() as connection:
        return list(
            connection.execute(
                text(
                    "SELECT data->>'phase' FROM job_events WHERE job_id = :id "
                    "AND type = 'job.provider_batch' ORDER BY seq"
                ),
                {"id": job_id},
            ).scalars()
        )


def handed_over(*job_ids: str) -> None:
    wait_until(lambda: all(phases(job_id)[:1] == ["pending"] for job_id in job_ids), timeout=20)


def calls_of(job_id: str) -> list[Any]:
    with runtime().db.engine.connect() as connection:
        return connection.execute(
            text(
                "SELECT model, tokens_in, tokens_out, cost_usd, outcome FROM model_calls "
                "WHERE job_id = :id"
            ),
            {"id": job_id},
        ).all()


def their_batch_ended(jobs: list[str]) -> bool:
    """The provider batch of `jobs` is over for us too (its results read)."""
    with runtime().db.engine.connect() as connection:
        states = connection.execute(
            text(
                "SELECT DISTINCT b.state FROM provider_batches b JOIN provider_batch_items i "
                "ON i.provider_batch = b.id WHERE i.job_id = ANY(CAST(:jobs AS uuid[]))"
            ),
            {"jobs": jobs},
        ).scalars()
        return list(states) == ["ended"]


def new_batches(simulator: SimulatorProcess, before: int) -> list[dict[str, Any]]:
    return simulator.batches()[before:]


def test_batch_jobs_end_through_one_provider_batch_at_half_price(
    tenant: Tenant, beat: Beat, simulator: SimulatorProcess
) -> None:
    before = len(simulator.batches())
    chats = [submit_batched(tenant, "Say hello", max_tokens=30) for _ in range(3)]
    structured = submit_batched(tenant, "A title", kind="structured", schema=SCHEMA)
    jobs = [*chats, structured]
    handed_over(*jobs)
    for job_id in jobs:
        job = tenant.get(f"/api/v1/jobs/{job_id}").get_json()
        assert job["status"] == "running"  # no worker slot held, and no lease
    beat.start()

    ended = [tenant.wait_for(job_id, timeout=30) for job_id in jobs]
    assert [job["status"] for job in ended] == ["succeeded"] * 4, ended
    outputs = [job_row(uuid.UUID(job_id)).output or {} for job_id in jobs]
    assert all(output["text"] for output in outputs[:3])
    assert set(outputs[3]["data"]) == {"title"}
    sent = new_batches(simulator, before)
    assert len(sent) == 1 and sent[0]["requests"] == 4, sent
    prices = runtime().model_client.prices
    for job, job_id in zip(ended, jobs, strict=True):
        (call,) = calls_of(job_id)
        model, tokens_in, tokens_out, cost, outcome = call
        assert outcome == "ok" and tokens_out > 0
        full = prices.cost(model, tokens_in, tokens_out)
        assert full > 0 and cost == pytest.approx(full / 2, abs=Decimal("0.00000002"))
        assert Decimal(job["usage"]["cost_usd"]) == cost
        seen = phases(job_id)
        assert seen[0] == "pending" and "submitted" in seen, seen
        assert job["attempt"] == 1


def test_failed_lines_fail_their_jobs_and_the_rest_succeed(
    tenant: Tenant, beat: Beat, simulator: SimulatorProcess
) -> None:
    good = submit_batched(tenant, "fine")
    refused = submit_batched(tenant, "[[sim fault=400]] refused")
    handed_over(good, refused)
    beat.start()
    assert tenant.wait_for(good, timeout=30)["status"] == "succeeded"
    failed = tenant.wait_for(refused, timeout=30)
    assert failed["status"] == "failed" and failed["error"]["code"] == "model_bad_request"
    assert calls_of(refused) == []  # refused: nothing billed


def test_an_expired_batch_fails_the_jobs_it_did_not_run(
    tenant: Tenant, beat: Beat, simulator: SimulatorProcess
) -> None:
    jobs = [submit_batched(tenant, "[[sim batch=expire]] late") for _ in range(4)]
    handed_over(*jobs)
    beat.start()
    ended = [tenant.wait_for(job_id, timeout=30) for job_id in jobs]
    statuses = sorted(job["status"] for job in ended)
    assert statuses == ["failed", "failed", "succeeded", "succeeded"], ended
    codes = {job["error"]["code"] for job in ended if job["status"] == "failed"}
    assert codes == {"batch_expired"}


def test_canceling_every_job_cancels_the_provider_batch(
    tenant: Tenant, beat: Beat, simulator: SimulatorProcess
) -> None:
    simulator.configure(batch_seconds=30)
    before = len(simulator.batches())
    jobs = [submit_batched(tenant, "never mind") for _ in range(2)]
    handed_over(*jobs)
    beat.start()
    wait_until(lambda: all("submitted" in phases(job_id) for job_id in jobs), timeout=20)
    for job_id in jobs:
        response = tenant.post(f"/api/v1/jobs/{job_id}/cancel")
        assert response.status_code == 200
        # Ended at once: no worker has to notice.
        assert tenant.get(f"/api/v1/jobs/{job_id}").get_json()["status"] == "canceled"
    wait_until(lambda: new_batches(simulator, before)[0]["canceled"], timeout=20)
    assert simulator.stats()["batches_canceled"] >= 1

    def batch_rows() -> int:
        with runtime().db.engine.connect() as connection:
            return int(
                connection.execute(
                    text("SELECT count(*) FROM provider_batches WHERE provider_batch_id = :id"),
                    {"id": new_batches(simulator, before)[0]["id"]},
                ).scalar_one()
            )

    wait_until(lambda: their_batch_ended(jobs), timeout=20)
    assert batch_rows() == 1  # kept while its jobs are
    for job_id in jobs:
        assert tenant.delete(f"/api/v1/jobs/{job_id}").status_code == 204
    wait_until(lambda: batch_rows() == 0, timeout=20)


def test_a_submission_cut_short_is_adopted_not_repeated(
    tenant: Tenant, beat: Beat, simulator: SimulatorProcess
) -> None:
    """As after a crash between the provider's create and our write of its id: the row is
    still `creating`, and the provider has a batch carrying our id."""
    job_id = submit_batched(tenant, "adopt me")
    handed_over(job_id)
    with runtime().db.engine.begin() as connection:
        batch_id = uuid.uuid4()
        connection.execute(
            text(
                "INSERT INTO provider_batches (id, model, state, request_count) "
                "SELECT :id, model, 'creating', 1 FROM provider_batch_items WHERE job_id = :job"
            ),
            {"id": batch_id, "job": job_id},
        )
        connection.execute(
            text("UPDATE provider_batch_items SET provider_batch = :id WHERE job_id = :job"),
            {"id": batch_id, "job": job_id},
        )
        body = connection.execute(
            text("SELECT body FROM provider_batch_items WHERE job_id = :job"), {"job": job_id}
        ).scalar_one()
    line = {"custom_id": f"{job_id}:1", "method": "POST", "url": "/v1/chat/completions"}
    data = json.dumps(line | {"body": body}).encode() + b"\n"
    with openai.OpenAI(base_url=simulator.base_url, api_key="sim") as client:
        upload = client.files.create(file=("x.jsonl", io.BytesIO(data)), purpose="batch")
        client.batches.create(
            input_file_id=upload.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={METADATA_KEY: str(batch_id)},
        )
    created = simulator.stats()["batches_created"]
    beat.start()
    assert tenant.wait_for(job_id, timeout=30)["status"] == "succeeded"
    assert simulator.stats()["batches_created"] == created  # adopted, not sent again


def test_a_handed_over_job_keeps_no_lease_through_sweeps_and_renewals(tenant: Tenant) -> None:
    job_id = submit_batched(tenant, "idle")
    handed_over(job_id)
    jobs = runtime().jobs
    jobs.sweep()
    assert jobs.renew_leases([(uuid.UUID(job_id), 1)]) == {}
    job = tenant.get(f"/api/v1/jobs/{job_id}").get_json()
    assert job["status"] == "running"
    with runtime().db.engine.connect() as connection:
        outstanding = connection.execute(
            text(f"SELECT count(*) FROM jobs WHERE owner = :owner AND ({OUTSTANDING})"),
            {"owner": tenant.owner},
        ).scalar_one()
    assert outstanding == 0  # no place held in the owner's dispatch window
    tenant.post(f"/api/v1/jobs/{job_id}/cancel")
    assert tenant.get(f"/api/v1/jobs/{job_id}").get_json()["status"] == "canceled"


@pytest.mark.parametrize(
    "job_input",
    [
        {"prompt": "x", "service_tier": "fast"},
        {"prompt": "x", "service_tier": 1},
        {"prompt": "x", "temperature": 0, "cache": True, "service_tier": "batch"},
    ],
)
def test_a_bad_service_tier_is_422_naming_it(tenant: Tenant, job_input: dict[str, Any]) -> None:
    response = tenant.post("/api/v1/jobs", json={"kind": "chat", "input": job_input})
    assert_problem(response, 422, "input.service_tier")


def test_a_canceled_batch_of_jobs_ends_its_handed_over_jobs(
    tenant: Tenant, beat: Beat, simulator: SimulatorProcess
) -> None:
    """POST /batches/{id}/cancel only asks running jobs to stop; the beat task ends those a
    provider batch holds."""
    items = [
        {
            "kind": "chat",
            "input": {"prompt": f"job {i} {uuid.uuid4().hex[:6]}", "service_tier": "batch"},
        }
        for i in range(2)
    ]
    created = tenant.post("/api/v1/batches", json={"items": items}).get_json()
    with runtime().db.engine.connect() as connection:
        jobs = [
            str(job_id)
            for job_id in connection.execute(
                text("SELECT id FROM jobs WHERE batch_id = :id"), {"id": created["id"]}
            ).scalars()
        ]
    handed_over(*jobs)
    assert tenant.post(f"/api/v1/batches/{created['id']}/cancel").status_code in (200, 202)
    beat.start()
    ended = [tenant.wait_for(job_id, timeout=20) for job_id in jobs]
    assert [job["status"] for job in ended] == ["canceled", "canceled"]


def test_a_batch_that_fails_validation_fails_its_jobs(
    tenant: Tenant, beat: Beat, simulator: SimulatorProcess
) -> None:
    jobs = [submit_batched(tenant, "[[sim batch=fail]] doomed") for _ in range(2)]
    handed_over(*jobs)
    beat.start()
    ended = [tenant.wait_for(job_id, timeout=30) for job_id in jobs]
    assert [job["status"] for job in ended] == ["failed", "failed"]
    assert {job["error"]["code"] for job in ended} == {"batch_failed"}
    assert "validation" in ended[0]["error"]["message"]
