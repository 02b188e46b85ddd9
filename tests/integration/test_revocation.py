"""Revoking an API key ends what it authorized, in the real web process (gunicorn, gevent):
the subscription tokens it minted, and its open Socket.IO connections, event streams and
long-polls, within the key cache's window (app/keys/api_keys.py CACHE_SECONDS).

The key is revoked in this test process, as `flask keys revoke` does from another one: the web
process learns of it only from PostgreSQL."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import socketio
from flask import Flask
from httpx_sse import connect_sse

from app import realtime
from app.keys.api_keys import CACHE_SECONDS, create_api_key, principal_for_key, revoke_api_key
from app.keys.watch import KeyWatch
from app.runtime import runtime
from devtools.processes import free_port
from tests.conftest import Tenant, undispatched_job, wait_until
from tests.integration.test_realtime import connect, refusal, token
from tests.webserver import WebServer

pytestmark = pytest.mark.usefixtures("worker")

TERMINAL = ("job.succeeded", "job.failed", "job.canceled")


def revoke(tenant: Tenant) -> float:
    """Revokes the tenant's key; returns when, on the monotonic clock."""
    assert revoke_api_key(runtime().db, tenant.key[:12]) == 1
    return time.monotonic()


@pytest.fixture
def colleague(tenant: Tenant, app: Flask) -> Tenant:
    """A second key of the same tenant, which stays valid: it submits and cleans up."""
    return Tenant(tenant.owner, create_api_key(runtime().db, tenant.owner), app.test_client())


def test_a_token_minted_before_its_key_was_revoked_is_refused(
    web_server: WebServer, tenant: Tenant
) -> None:
    owner_wide = token(tenant)
    job_scoped = token(tenant, tenant.submit("chat", {"prompt": "x"})["id"])
    revoke(tenant)
    assert "revoked" in refusal(web_server, {"token": owner_wide})
    assert "revoked" in refusal(web_server, {"token": job_scoped})
    assert "unauthorized" in refusal(web_server, {"api_key": tenant.key})


def test_a_token_whose_key_cannot_be_checked_is_refused_as_unavailable(
    settings, tenant: Tenant
) -> None:
    """A web process that cannot reach PostgreSQL cannot tell a revoked key from a good one: it
    refuses the connection with a reason to retry, not an unexplained error."""
    nobody_listens = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/conveyor"
    server = WebServer(settings.model_copy(update={"database_url": nobody_listens})).start()
    try:
        minted = tenant.post("/api/v1/realtime/token", json={}).get_json()["token"]
        assert "unavailable: try again shortly" in refusal(server, {"token": minted})
    finally:
        server.stop()


@pytest.mark.parametrize("credential", ["api_key", "token"])
def test_an_open_connection_of_a_revoked_key_is_cut_off(
    web_server: WebServer, tenant: Tenant, colleague: Tenant, credential: str
) -> None:
    auth = {"api_key": tenant.key} if credential == "api_key" else {"token": token(tenant)}
    seen: list[dict[str, Any]] = []
    cut_off = threading.Event()
    client = socketio.Client(reconnection=False)
    client.on("job_event", seen.append)
    client.on("disconnect", lambda *_reason: cut_off.set())
    client.connect(web_server.url, auth=auth, transports=["websocket"], wait_timeout=10)
    # A witness on the colleague's key sees every event of the tenant that the cut-off one
    # could have seen.
    witnessed: list[dict[str, Any]] = []
    witness = connect(web_server, {"api_key": colleague.key})
    witness.on("job_event", witnessed.append)
    try:
        before = colleague.submit("chat", {"prompt": "seen live"})["id"]
        wait_until(lambda: _has(seen, before, "job.succeeded"), timeout=30)

        revoked_at = revoke(tenant)
        assert cut_off.wait(CACHE_SECONDS + 20), "the connection outlived its key"
        took = time.monotonic() - revoked_at
        assert took <= CACHE_SECONDS, f"disconnected {took:.1f} s after the revocation"

        after = colleague.submit("chat", {"prompt": "after the revocation"})["id"]
        wait_until(lambda: _has(witnessed, after, "job.succeeded"), timeout=30)
        assert not [e for e in seen if e["job_id"] == after]
    finally:
        client.disconnect()
        witness.disconnect()


@dataclass
class BackgroundStream:
    """A Server-Sent Events stream read on a thread until the server ends it."""

    events: list[dict[str, Any]] = field(default_factory=list)
    ended_at: float | None = None
    ended: threading.Event = field(default_factory=threading.Event)

    def read(self, server: WebServer, tenant: Tenant, job_id: str) -> threading.Thread:
        def run() -> None:
            headers = {**tenant.headers, "Accept": "text/event-stream"}
            try:
                with (
                    httpx.Client(base_url=server.url, timeout=60) as client,
                    connect_sse(
                        client, "GET", f"/api/v1/jobs/{job_id}/events", headers=headers
                    ) as source,
                ):
                    for message in source.iter_sse():
                        if message.data:
                            self.events.append(json.loads(message.data))
            finally:
                self.ended_at = time.monotonic()
                self.ended.set()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread


QUIET = "quiet"  # nothing happens while the stream waits (a job no worker has picked up)
BUSY = "busy"  # events keep coming (a long answer streaming)


@pytest.mark.parametrize("activity", [QUIET, BUSY])
def test_an_event_stream_of_a_revoked_key_ends(
    web_server: WebServer, tenant: Tenant, colleague: Tenant, activity: str
) -> None:
    if activity == QUIET:
        job_id, opened_after = str(undispatched_job(tenant.owner)), 1  # job.queued
    else:
        prompt = "[[sim tokens=800 tps=100]] a long answer"
        job_id, opened_after = tenant.submit("chat", {"prompt": prompt})["id"], 20  # deltas
    stream = BackgroundStream()
    thread = stream.read(web_server, tenant, job_id)
    try:
        wait_until(lambda: len(stream.events) >= opened_after or stream.ended.is_set(), timeout=30)
        assert not stream.ended.is_set()

        revoked_at = revoke(tenant)
        assert stream.ended.wait(CACHE_SECONDS + 20), "the stream outlived its key"
        assert stream.ended_at is not None
        took = stream.ended_at - revoked_at
        assert took <= CACHE_SECONDS, f"the stream ended {took:.1f} s after the revocation"
        assert not [e for e in stream.events if e["type"] in TERMINAL]  # cut off, not finished
    finally:
        colleague.post(f"/api/v1/jobs/{job_id}/cancel")  # ends the stream of a failing run
        thread.join(30)


def test_a_long_poll_of_a_revoked_key_answers_401(
    web_server: WebServer, tenant: Tenant, colleague: Tenant
) -> None:
    job_id = undispatched_job(tenant.owner)  # quiet: the poll waits its whole time
    url = f"{web_server.url}/api/v1/jobs/{job_id}/events"
    # The web process now holds the key in its cache, so the poll is let in even if it
    # arrives after the revocation: only the check while it waits can end it.
    assert httpx.get(url, headers=tenant.headers, timeout=10).status_code == 200
    answer: dict[str, Any] = {}

    def poll() -> None:
        response = httpx.get(
            url, params={"after": 1, "wait": 25}, headers=tenant.headers, timeout=60
        )
        answer.update(response=response, at=time.monotonic())

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        revoked_at = revoke(tenant)
        thread.join(CACHE_SECONDS + 30)
        response = answer["response"]
        took = answer["at"] - revoked_at
        assert response.status_code == 401, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert "revoked while" in response.json()["detail"]
        assert took <= CACHE_SECONDS, f"answered {took:.1f} s after the revocation"
    finally:
        colleague.post(f"/api/v1/jobs/{job_id}/cancel")
        thread.join(30)


def test_the_key_watch_works_in_threading_mode_and_starts_once(
    app: Flask, tenant: Tenant, colleague: Tenant
) -> None:
    """The test process runs Socket.IO in threading mode (gunicorn's worker runs gevent)."""
    started: list[object] = []

    def start_task(target: Callable[[], None]) -> object:
        started.append(target)
        return realtime.socketio.start_background_task(target)

    watch = KeyWatch(runtime().db, start_task, realtime.socketio.sleep)
    key_id = principal_for_key(runtime().db, tenant.key).key_id
    other_id = principal_for_key(runtime().db, colleague.key).key_id
    cut: list[str] = []
    first = watch.watch(key_id, lambda: cut.append("first"))
    second = watch.watch(key_id, lambda: cut.append("second"))
    unaffected = watch.watch(other_id, lambda: cut.append("unaffected"))
    assert len(started) == 1

    revoked_at = revoke(tenant)
    wait_until(lambda: len(cut) == 2, timeout=CACHE_SECONDS + 20)
    assert time.monotonic() - revoked_at <= CACHE_SECONDS
    assert sorted(cut) == ["first", "second"]
    assert first.revoked and second.revoked and not unaffected.revoked
    watch.forget(unaffected)


def _has(events: list[dict[str, Any]], job_id: str, event_type: str) -> bool:
    return any(e["job_id"] == job_id and e["type"] == event_type for e in events)
