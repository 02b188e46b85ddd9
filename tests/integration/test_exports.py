"""Exports: a job's record as JSON, YAML and CSV, and the job list streamed as JSON Lines or CSV.
Each is read back with its standard reader, awkward values included."""

from __future__ import annotations

import csv
import io
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from flask import Flask
from sqlalchemy import delete, text

from app.api.export_formats import JOB_COLUMNS
from app.config import Settings
from app.db import STREAMING_APPLICATION_NAME
from app.jobs import history
from app.keys.api_keys import create_api_key
from app.models import Job, JobEvent, ModelCall
from app.runtime import runtime
from tests.conftest import Tenant, undispatched_job, wait_until
from tests.integration.test_api import assert_problem
from tests.webserver import WebServer

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
    assert document["job"] == {k: v for k, v in shown.items() if k not in ("input", "webhook")}
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


# The job list ---------------------------------------------------------------------------------

BIG = 100_000
SEED_START = datetime(2024, 1, 1, tzinfo=UTC)
SEED = text("""
INSERT INTO jobs (id, owner, kind, status, input, output, max_attempts, attempt, model,
                  created_at, updated_at, started_at, finished_at, tokens_in, tokens_out,
                  cost_usd)
SELECT gen_random_uuid(), :owner,
       CASE WHEN i % 3 = 0 THEN 'structured' ELSE 'chat' END,
       CASE WHEN i % 2 = 0 THEN 'succeeded' ELSE 'canceled' END,
       jsonb_build_object('prompt', :prompt || i),
       CASE WHEN i % 2 = 0 THEN jsonb_build_object('text', :prompt || i) END,
       3, 1, 'sim-small',
       :start + i * interval '1 second', :start + i * interval '1 second',
       :start + i * interval '1 second', :start + (i + 2) * interval '1 second',
       i, 2 * i, i * 0.00000150
FROM generate_series(1, :count) AS i
""")


def seed_jobs(owner: str, count: int, prompt: str = "write about") -> None:
    """`count` finished jobs of `owner` in one statement, one second apart from SEED_START:
    job i is structured when i % 3 == 0 (else chat), succeeded when i is even (else canceled)."""
    with runtime().db.transaction() as session:
        session.execute(
            SEED, {"owner": owner, "count": count, "prompt": prompt, "start": SEED_START}
        )


def jsonl(response: Any) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "application/x-ndjson"
    return [json.loads(line) for line in response.get_data(as_text=True).splitlines()]


def test_the_job_list_exports_as_json_lines_newest_first(tenant: Tenant) -> None:
    seed_jobs(tenant.owner, 7, prompt=AWKWARD)
    lines = jsonl(tenant.get("/api/v1/jobs/export"))
    assert len(lines) == 7
    assert [line["created_at"] for line in lines] == sorted(
        (line["created_at"] for line in lines), reverse=True
    )
    for line in lines:
        shown = tenant.get(f"/api/v1/jobs/{line['id']}").get_json()
        assert line == {k: v for k, v in shown.items() if k not in ("input", "webhook")}
    full = jsonl(tenant.get("/api/v1/jobs/export?format=jsonl&include=input,output"))
    assert [line["id"] for line in full] == [line["id"] for line in lines]
    assert full[0]["input"]["prompt"] == f"{AWKWARD}7" and full[0]["output"] is None
    assert full[1]["output"] == {"text": f"{AWKWARD}6"}
    assert jsonl(tenant.get("/api/v1/jobs/export?include=output&include=input")) == full


def test_the_job_list_exports_as_csv_one_row_per_job(tenant: Tenant) -> None:
    seed_jobs(tenant.owner, 4, prompt=AWKWARD)
    response = tenant.get("/api/v1/jobs/export?format=csv&include=input")
    assert response.mimetype == "text/csv"
    assert response.headers["Content-Disposition"] == 'attachment; filename="jobs.csv"'
    rows = read_csv(response.get_data(as_text=True))
    assert len(rows) == 4
    assert list(rows[0]) == [*JOB_COLUMNS, "input"]
    assert "output" not in rows[0] and "links.self" not in rows[0]
    newest = rows[0]
    assert json.loads(newest["input"]) == {"prompt": f"{AWKWARD}4"}
    assert newest["status"] == "succeeded" and newest["kind"] == "chat"
    assert newest["usage.tokens_out"] == "8" and newest["usage.cost_usd"] == "0.00000600"
    assert newest["error.code"] == "" and newest["retry_of"] == ""
    shown = tenant.get(f"/api/v1/jobs/{newest['id']}").get_json()
    assert newest["created_at"] == shown["created_at"]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("status=succeeded", [i for i in range(1, 13) if i % 2 == 0]),
        ("kind=structured", [3, 6, 9, 12]),
        ("status=canceled&kind=structured", [3, 9]),
        # Job i was created at SEED_START + i seconds; both bounds are exclusive.
        ("created_after=2024-01-01T00:00:05Z&created_before=2024-01-01T00:00:09Z", [6, 7, 8]),
        ("created_after=2024-01-01T00:00:10", [11, 12]),  # no offset: UTC
        ("created_before=2024-01-01T02:00:03%2B02:00", [1, 2]),
        ("kind=image", []),
    ],
)
def test_the_job_list_export_filters(tenant: Tenant, query: str, expected: list[int]) -> None:
    seed_jobs(tenant.owner, 12)
    lines = jsonl(tenant.get(f"/api/v1/jobs/export?{query}&include=input"))
    assert [int(line["input"]["prompt"].removeprefix("write about")) for line in lines] == sorted(
        expected, reverse=True
    )
    # The paged list takes the same filters.
    page = tenant.get(f"/api/v1/jobs?{query}&limit=100").get_json()
    assert [job["id"] for job in page["items"]] == [line["id"] for line in lines]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("format=xml", "format"),
        ("format=json", "format"),
        ("status=done", "status"),
        ("kind=Not%20a%20kind", "kind"),
        ("created_after=yesterday", "created_after"),
        ("created_before=2024-13-01", "created_before"),
        ("created_after=2024-02-01&created_before=2024-01-01", "created_before"),
        ("created_after=2024-01-01&created_before=2024-01-01", "created_before"),
        ("include=prompt", "include.0"),
        ("include=input,secrets", "include.1"),
        ("limit=5", "limit"),
    ],
)
def test_a_bad_job_list_export_query_is_422_naming_the_field(
    tenant: Tenant, query: str, field: str
) -> None:
    assert_problem(tenant.get(f"/api/v1/jobs/export?{query}"), 422, field)


def test_the_job_list_export_holds_only_the_callers_jobs(tenant: Tenant, new_tenant: Any) -> None:
    seed_jobs(tenant.owner, 3)
    other = new_tenant()
    assert jsonl(other.get("/api/v1/jobs/export")) == []
    assert read_csv(other.get("/api/v1/jobs/export?format=csv").get_data(as_text=True)) == []
    assert len(jsonl(tenant.get("/api/v1/jobs/export"))) == 3
    assert_problem(tenant.client.get("/api/v1/jobs/export"), 401)


def test_a_process_streams_a_bounded_number_of_exports(app: Flask, tenant: Tenant) -> None:
    seed_jobs(tenant.owner, 3)
    limit = runtime().settings.export_max_streams
    held = [tenant.get("/api/v1/jobs/export", buffered=False) for _ in range(limit)]
    assert [response.status_code for response in held] == [200] * limit
    busy = assert_problem(tenant.get("/api/v1/jobs/export"), 503)
    assert busy["type"] == "/problems/exports-busy"
    # A single job's export holds no stream.
    assert tenant.get(f"/api/v1/jobs/{crafted_job(tenant.owner)}/export").status_code == 200
    # A client that goes away without reading frees its slot.
    held.pop().close()
    assert len(jsonl(tenant.get("/api/v1/jobs/export"))) == 4
    for response in held:
        response.close()


def streaming_queries() -> list[str]:
    """What the export's own connections (outside the pool) last ran."""
    with runtime().db.transaction() as session:
        return list(
            session.scalars(
                text(
                    "SELECT query FROM pg_stat_activity WHERE application_name = :name "
                    "AND datname = current_database()"
                ),
                {"name": STREAMING_APPLICATION_NAME},
            )
        )


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture(scope="module")
def big_export(settings: Settings, app: Flask) -> Iterator[tuple[WebServer, str]]:
    """A web process of its own (gunicorn, gevent worker, one worker process), whose memory
    only these exports touch, and an owner with 100,000 jobs."""
    owner = f"tenant-{uuid.uuid4().hex[:10]}"
    started = time.monotonic()
    seed_jobs(owner, BIG)
    print(f"seeded {BIG} jobs in {time.monotonic() - started:.1f} s")
    server = WebServer(settings).start()
    try:
        yield server, create_api_key(runtime().db, owner)
    finally:
        server.stop()
        with runtime().db.transaction() as session:
            session.execute(delete(Job).where(Job.owner == owner))


@pytest.mark.parametrize(("fmt", "header_lines"), [("csv", 1), ("jsonl", 0)])
def test_a_100k_job_export_streams_through_gunicorn_in_bounded_memory(
    big_export: tuple[WebServer, str], fmt: str, header_lines: int
) -> None:
    server, key = big_export
    [pid] = server.worker_pids()
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
        # Warm up: the first export of a process imports and compiles what every export uses,
        # and its first batches allocate what every later batch reuses: about 2 MB for CSV,
        # a tenth of what it sends, when the warm-up exported nothing.
        assert http.get("/api/v1/jobs/export?kind=none").text == ""
        with http.stream("GET", f"/api/v1/jobs/export?format={fmt}") as warm_up:
            for count, _ in enumerate(warm_up.iter_raw()):
                if count == 40:
                    break
        baseline = peak = resident_bytes(pid)
        lines = size = chunks = 0
        queries: list[str] = []
        started = time.monotonic()
        with http.stream("GET", f"/api/v1/jobs/export?format={fmt}") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith(
                "text/csv" if fmt == "csv" else "application/x-ndjson"
            )
            for chunk in response.iter_raw():
                chunks += 1
                lines += chunk.count(b"\n")
                size += len(chunk)
                if chunks % 20 == 0:
                    peak = max(peak, resident_bytes(pid))
                if chunks == 50:
                    queries = streaming_queries()
    growth = peak - baseline
    print(
        f"{fmt}: {size / 1e6:.1f} MB in {time.monotonic() - started:.1f} s, {chunks} chunks; "
        f"worker RSS {baseline / 1e6:.0f} MB, grew by at most {growth / 1e6:.2f} MB"
    )
    assert lines == BIG + header_lines
    # Mid-stream, PostgreSQL was handing over batches from a server-side cursor, on the
    # export's own connection.
    assert len(queries) == 1 and queries[0].startswith("FETCH FORWARD"), queries
    # A batch at a time: the process grew by a small fraction of what it sent.
    assert size > 15_000_000
    assert growth < size / 10, (growth, size)
    # The connection closes with the body.
    wait_until(lambda: streaming_queries() == [])


def test_a_client_that_disconnects_mid_export_frees_its_connection(
    big_export: tuple[WebServer, str],
) -> None:
    server, key = big_export
    headers = {"Authorization": f"Bearer {key}"}
    with (
        httpx.Client(base_url=server.url, headers=headers, timeout=30) as http,
        http.stream("GET", "/api/v1/jobs/export?format=csv") as response,
    ):
        chunks = response.iter_raw()
        for _ in range(5):
            next(chunks)
        assert len(streaming_queries()) == 1
    # The server's next write fails, and closing the response ends the cursor's connection.
    wait_until(lambda: streaming_queries() == [], timeout=20)
    # Its slot is free again: the limit's worth of exports run at once after it.
    with (
        httpx.Client(base_url=server.url, headers=headers, timeout=30) as http,
        ExitStack() as held,
    ):
        for _ in range(runtime().settings.export_max_streams):
            response = held.enter_context(http.stream("GET", "/api/v1/jobs/export"))
            assert response.status_code == 200
        assert http.get("/api/v1/jobs/export").status_code == 503
