"""Server-Sent Events from the real web process: the whole feed to the end, resuming with
Last-Event-ID, and its errors."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from app.jobs.events import stream_key
from app.runtime import runtime
from tests.conftest import Tenant
from tests.webserver import WebServer

pytestmark = pytest.mark.usefixtures("worker")


def read_events(
    server: WebServer, tenant: Tenant, job_id: str, last_id: int | None = None, stop: int = 0
) -> list[dict[str, Any]]:
    """Events until the server ends the stream, or until `stop` events were read."""
    headers = {**tenant.headers, "Accept": "text/event-stream"}
    if last_id is not None:
        headers["Last-Event-ID"] = str(last_id)
    events: list[dict[str, Any]] = []
    with (
        httpx.Client(base_url=server.url, timeout=30) as client,
        connect_sse(client, "GET", f"/api/v1/jobs/{job_id}/events", headers=headers) as source,
    ):
        assert source.response.headers["content-type"].startswith("text/event-stream")
        for message in source.iter_sse():
            if not message.data:  # the `retry:` advice comes as a message of its own
                continue
            event = json.loads(message.data)
            assert message.id == str(event["seq"]) and message.event == event["type"]
            events.append(event)
            if len(events) == stop:
                break
    return events


def delta_text(events: list[dict[str, Any]]) -> str:
    return "".join(e["data"]["text"] for e in events if e["type"] == "job.output.delta")


def test_the_feed_runs_to_the_end_and_resumes_from_last_event_id(
    web_server: WebServer, tenant: Tenant
) -> None:
    job_id = tenant.submit("chat", {"prompt": "[[sim tokens=300 tps=200]] resumable"})["id"]
    first = read_events(web_server, tenant, job_id, stop=40)
    assert [e["seq"] for e in first] == list(range(1, 41))
    rest = read_events(web_server, tenant, job_id, last_id=first[-1]["seq"])
    events = first + rest
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "job.succeeded"
    output = tenant.get(f"/api/v1/jobs/{job_id}/result").get_json()["output"]
    assert delta_text(events) == output["text"]


def test_a_finished_job_whose_stream_expired_is_served_from_postgres_with_its_output(
    web_server: WebServer, tenant: Tenant
) -> None:
    job_id = tenant.submit("chat", {"prompt": "expired stream"})["id"]
    tenant.wait_for(job_id)
    runtime().redis.delete(stream_key(job_id))
    events = read_events(web_server, tenant, job_id)
    assert "job.output.delta" not in [e["type"] for e in events]
    assert events[-1]["type"] == "job.succeeded"
    output = tenant.get(f"/api/v1/jobs/{job_id}/result").get_json()["output"]
    assert events[-1]["data"]["output"] == output


def test_sse_errors_are_problems(web_server: WebServer, new_tenant) -> None:
    alice, mallory = new_tenant(), new_tenant()
    job_id = alice.submit("chat", {"prompt": "mine"})["id"]
    sse = {"Accept": "text/event-stream"}
    url = f"{web_server.url}/api/v1/jobs/{job_id}/events"
    theirs = httpx.get(url, headers={**mallory.headers, **sse})
    assert theirs.status_code == 404
    bad = httpx.get(url, headers={**alice.headers, **sse, "Last-Event-ID": "x"})
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "Last-Event-ID"
    # Seqs beyond what the database holds are refused before the stream starts.
    huge = str(10**30)
    beyond = httpx.get(url, headers={**alice.headers, **sse, "Last-Event-ID": huge})
    assert beyond.status_code == 422
    assert beyond.json()["errors"][0]["field"] == "Last-Event-ID"
    beyond = httpx.get(url, params={"after": huge}, headers={**alice.headers, **sse})
    assert beyond.status_code == 422
    assert beyond.json()["errors"][0]["field"] == "after"
