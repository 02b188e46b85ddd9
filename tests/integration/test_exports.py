"""Exports: a job's record as JSON, YAML and CSV, and the job list streamed as JSON Lines or CSV.
Each is read back with its standard reader, awkward values included."""

from __future__ import annotations

import csv
import io
import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import yaml

from app.jobs import history
from app.models import Job, JobEvent, ModelCall
from app.runtime import runtime
from tests.conftest import Tenant, undispatched_job
from tests.integration.test_api import assert_problem

# Newlines of three kinds, commas, quotes, a formula, non-Latin scripts, an emoji, YAML's
# special words and a Unicode line separator.
AWKWARD = "line one\nline \"two\", with, commas\r\n\u2028yes: no # null\t漢字 ünï 🚀 'quoted'"
FORMULA = '=HYPERLINK("http://example.com","click")'


def read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


def export(tenant: Tenant, job_id: Any, fmt: str) -> Any:
    response = tenant.get(f"/api/v1/jobs/{job_id}/export?format={fmt}")
    assert response.status_code == 200, response.get_data(as_text=True)
    return response


def crafted_job(owner: str) -> uuid.UUID:
    """A finished job written straight to the tables, with awkward values wherever the export
    writes text: input, output, event data, a model call's error, and nulls."""
    job_id = uuid.uuid4()
    at = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    with runtime().db.transaction() as session:
        session.add(
            Job(
                id=job_id,
                owner=owner,
                kind="chat",
                status="succeeded",
                input={"prompt": AWKWARD, "system": FORMULA},
                output={"text": AWKWARD, "finish_reason": None, "list": [1, "a,b", None]},
                max_attempts=3,
                attempt=2,
                last_seq=3,
                model="sim-small",
                created_at=at,
                updated_at=at,
                finished_at=at + timedelta(seconds=2),
                tokens_in=10,
                tokens_out=20,
                cost_usd=Decimal("0.00001500"),
            )
        )
        session.flush()
        for seq, kind, data in [
            (1, "job.queued", {"kind": "chat", "retry_of": None}),
            (2, "job.log", {"level": "info", "message": AWKWARD}),
            (3, "job.succeeded", {}),
        ]:
            session.add(JobEvent(job_id=job_id, seq=seq, type=kind, at=at, data=data))
        for attempt, error in [(1, f"upstream said: {AWKWARD}"), (2, None)]:
            session.add(
                ModelCall(
                    job_id=job_id,
                    attempt=attempt,
                    provider="sim",
                    model="sim-small",
                    tokens_in=5,
                    tokens_out=10 * (attempt - 1),
                    cost_usd=Decimal(0),
                    latency_ms=12.5,
                    ttft_ms=None,
                    outcome="model_unavailable" if error else "ok",
                    error_message=error,
                    started_at=at,
                )
            )
    return job_id


def test_a_job_export_reads_back_the_same_in_every_format(tenant: Tenant) -> None:
    job_id = crafted_job(tenant.owner)
    as_json = export(tenant, job_id, "json")
    as_yaml = export(tenant, job_id, "yaml")
    as_csv = export(tenant, job_id, "csv")
    assert as_json.mimetype == "application/json"
    assert as_yaml.mimetype == "application/yaml"
    assert as_csv.mimetype == "text/csv"
    assert as_csv.headers["Content-Disposition"] == f'attachment; filename="job-{job_id}.csv"'

    document = json.loads(as_json.get_data(as_text=True))
    assert yaml.safe_load(as_yaml.get_data(as_text=True)) == document
    assert document["job"]["id"] == str(job_id) and "input" not in document["job"]
    assert document["input"] == {"prompt": AWKWARD, "system": FORMULA}
    assert document["output"]["text"] == AWKWARD
    assert [e["type"] for e in document["events"]] == ["job.queued", "job.log", "job.succeeded"]
    assert document["events"][1]["data"]["message"] == AWKWARD
    calls = document["model_calls"]
    assert [set(call) for call in calls] == [set(history.model_call_columns())] * 2
    assert calls[0]["error_message"] == f"upstream said: {AWKWARD}"
    assert calls[1]["error_message"] is None and calls[0]["ttft_ms"] is None
    assert calls[0]["cost_usd"] == "0.00000000"  # not "0E-8"
    assert document["job"]["usage"]["cost_usd"] == "0.00001500"

    rows = read_csv(as_csv.get_data(as_text=True))
    assert [row["section"] for row in rows] == ["job", "event", "event", "event", "call", "call"]
    job_row, events, calls_rows = rows[0], rows[1:4], rows[4:]
    assert job_row["job.id"] == str(job_id) and job_row["job.status"] == "succeeded"
    assert json.loads(job_row["job.input"]) == document["input"]
    assert json.loads(job_row["job.output"]) == document["output"]
    assert job_row["job.usage.cost_usd"] == "0.00001500"
    assert job_row["job.error.code"] == "" and job_row["job.retry_of"] == ""  # null: empty
    assert job_row["job.cancel_requested"] == "false"
    assert job_row["event.seq"] == "" and job_row["call.id"] == ""  # other sections: empty
    assert [json.loads(e["event.data"]) for e in events] == [e["data"] for e in document["events"]]
    assert [e["event.seq"] for e in events] == ["1", "2", "3"]
    assert calls_rows[0]["call.error_message"] == f"upstream said: {AWKWARD}"
    assert calls_rows[1]["call.error_message"] == "" and calls_rows[0]["call.ttft_ms"] == ""
    assert calls_rows[0]["call.latency_ms"] == "12.5"
    assert {f"call.{c}" for c in history.model_call_columns()} <= set(rows[0])


def test_a_job_export_shows_the_job_as_the_api_does(tenant: Tenant, worker: object) -> None:
    prompt = f"{AWKWARD} [[sim fault=500 times=1]] {uuid.uuid4()}"
    job_id = tenant.submit("chat", {"prompt": prompt})["id"]
    shown = tenant.wait_for(job_id, timeout=30)
    assert shown["status"] == "succeeded", shown
    document = export(tenant, job_id, "json").get_json()
    assert document["job"] == {k: v for k, v in shown.items() if k != "input"}
    assert document["input"]["prompt"] == prompt
    assert document["output"] == tenant.get(f"/api/v1/jobs/{job_id}/result").get_json()["output"]
    types = [event["type"] for event in document["events"]]
    assert types[0] == "job.queued" and types[-1] == "job.succeeded" and "job.retrying" in types
    seqs = [event["seq"] for event in document["events"]]
    assert seqs == sorted(seqs)
    outcomes = [(call["attempt"], call["outcome"]) for call in document["model_calls"]]
    assert outcomes == [(1, "model_unavailable"), (2, "ok")]
    rows = read_csv(export(tenant, job_id, "csv").get_data(as_text=True))
    assert [row["call.outcome"] for row in rows if row["section"] == "call"] == [
        "model_unavailable",
        "ok",
    ]
    assert json.loads(rows[0]["job.input"])["prompt"] == prompt


def test_an_unfinished_job_exports_with_null_output_and_no_calls(tenant: Tenant) -> None:
    job_id = undispatched_job(tenant.owner, prompt=AWKWARD, dispatched_ago=timedelta(hours=1))
    runtime().jobs.cancel_job(tenant.owner, job_id)
    document = yaml.safe_load(export(tenant, job_id, "yaml").get_data(as_text=True))
    assert document["output"] is None and document["model_calls"] == []
    assert document["job"]["status"] == "canceled" and document["job"]["error"] is None
    rows = read_csv(export(tenant, job_id, "csv").get_data(as_text=True))
    assert [row["section"] for row in rows] == ["job", "event", "event"]
    assert rows[0]["job.output"] == ""
    assert json.loads(rows[0]["job.input"])["prompt"].startswith(AWKWARD)


def test_a_csv_cell_a_spreadsheet_would_run_as_a_formula_is_quoted(tenant: Tenant) -> None:
    job_id = crafted_job(tenant.owner)
    with runtime().db.transaction() as session:
        session.get_one(Job, job_id).model = "=cmd|'/c calc'!A1"
    rows = read_csv(export(tenant, job_id, "csv").get_data(as_text=True))
    assert rows[0]["job.model"] == "'=cmd|'/c calc'!A1"
    # JSON cells start with "{", so the formula inside the input stays as it was.
    assert json.loads(rows[0]["job.input"])["system"] == FORMULA
    assert export(tenant, job_id, "json").get_json()["job"]["model"] == "=cmd|'/c calc'!A1"


def test_another_tenants_job_is_not_exported(tenant: Tenant, new_tenant: Any) -> None:
    job_id = crafted_job(tenant.owner)
    problem = assert_problem(new_tenant().get(f"/api/v1/jobs/{job_id}/export?format=csv"), 404)
    assert str(job_id) in problem["detail"]
    assert_problem(tenant.get(f"/api/v1/jobs/{uuid.uuid4()}/export"), 404)
    assert_problem(tenant.client.get(f"/api/v1/jobs/{job_id}/export"), 401)


@pytest.mark.parametrize("fmt", ["xml", "JSON", "", "jsonl"])
def test_an_unknown_job_export_format_is_422_naming_format(tenant: Tenant, fmt: str) -> None:
    job_id = crafted_job(tenant.owner)
    assert_problem(tenant.get(f"/api/v1/jobs/{job_id}/export?format={fmt}"), 422, "format")


def test_the_default_job_export_is_json(tenant: Tenant) -> None:
    job_id = crafted_job(tenant.owner)
    response = tenant.get(f"/api/v1/jobs/{job_id}/export")
    assert response.mimetype == "application/json"
    assert response.get_json()["job"]["id"] == str(job_id)
