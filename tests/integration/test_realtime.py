"""Socket.IO against the real web process (gunicorn, gevent worker) with a real python-socketio
client: authentication, tenancy, and resuming a stream after a disconnect with no gap and no
duplicate."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import socketio
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

from app.keys.tokens import SALT
from tests.conftest import Tenant, wait_until
from tests.webserver import WebServer

pytestmark = pytest.mark.usefixtures("worker")


class Feed:
    """What a client keeps: events applied once each, in seq order, whatever order and however
    many times they arrive (replay and live events may overlap after a resubscribe)."""

    def __init__(self) -> None:
        self.last_seq = 0
        self.applied: list[dict[str, Any]] = []
        self._early: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)

    def accept(self, event: dict[str, Any]) -> None:
        with self._lock:
            if event["seq"] <= self.last_seq or event["seq"] in self._early:
                return  # a duplicate
            self._early[event["seq"]] = event
            while (following := self._next()) is not None:
                self.applied.append(following)
                self.last_seq = following["seq"]
            self.changed.notify_all()

    def _next(self) -> dict[str, Any] | None:
        """The event that follows the last applied one: seq + 1, or one replayed from
        PostgreSQL that names it as `prev` (the deltas between them are gone)."""
        if (following := self._early.pop(self.last_seq + 1, None)) is not None:
            return following
        for seq, event in self._early.items():
            if event.get("prev") == self.last_seq:
                return self._early.pop(seq)
        return None

    def text(self) -> str:
        return "".join(e["data"]["text"] for e in self.applied if e["type"] == "job.output.delta")

    def types(self) -> list[str]:
        return [e["type"] for e in self.applied]

    def wait_for(self, predicate: Any, timeout: float = 30) -> None:
        with self._lock:
            assert self.changed.wait_for(lambda: predicate(self), timeout), "feed stalled"


def token(tenant: Tenant, job_id: str | None = None) -> str:
    response = tenant.post("/api/v1/realtime/token", json={"job_id": job_id} if job_id else {})
    assert response.status_code == 201, response.get_json()
    return response.get_json()["token"]


def connect(server: WebServer, auth: dict[str, str], feed: Feed | None = None) -> socketio.Client:
    client = socketio.Client(reconnection=False)
    if feed is not None:
        client.on("job_event", feed.accept)
    client.connect(server.url, auth=auth, transports=["websocket"], wait_timeout=10)
    return client


def refusal(server: WebServer, auth: dict[str, str]) -> str:
    """Connects with `auth`, expecting to be refused; returns the server's reason."""
    client = socketio.Client(reconnection=False)
    reasons: list[Any] = []
    client.on("connect_error", reasons.append)
    with pytest.raises(socketio.exceptions.ConnectionError):
        client.connect(server.url, auth=auth, transports=["websocket"], wait_timeout=10)
    return str(reasons)


@pytest.fixture
def clients() -> Iterator[list[socketio.Client]]:
    opened: list[socketio.Client] = []
    yield opened
    for client in opened:
        client.disconnect()


@pytest.mark.parametrize(
    "auth",
    [
        {},
        {"token": "not-a-token"},
        {"api_key": "cvk_unknown"},
    ],
    ids=["nothing", "garbage-token", "unknown-key"],
)
def test_bad_credentials_are_refused(web_server: WebServer, auth: dict[str, str]) -> None:
    assert "unauthorized" in refusal(web_server, auth)


def test_an_expired_token_is_refused(web_server: WebServer, tenant: Tenant, app) -> None:
    class SignedAnHourAgo(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - 3600

    claims = {"owner": tenant.owner, "role": "user", "key": str(uuid.uuid4()), "job": None}
    old = URLSafeTimedSerializer(app.config["SECRET_KEY"], salt=SALT, signer=SignedAnHourAgo).dumps(
        claims
    )
    assert "the token has expired" in refusal(web_server, {"token": old})


def test_a_token_signed_with_another_secret_is_refused(web_server: WebServer, tenant) -> None:
    claims = {"owner": tenant.owner, "role": "user", "key": str(uuid.uuid4()), "job": None}
    forged = URLSafeTimedSerializer("another-secret", salt=SALT).dumps(claims)
    assert "the token is not valid" in refusal(web_server, {"token": forged})


def test_another_origin_is_refused_and_so_is_long_polling(
    web_server: WebServer, tenant: Tenant
) -> None:
    client = socketio.Client(reconnection=False)
    with pytest.raises(socketio.exceptions.ConnectionError):
        client.connect(
            web_server.url,
            auth={"api_key": tenant.key},
            headers={"Origin": "http://elsewhere.example"},
            transports=["websocket"],
            wait_timeout=10,
        )
    # Same origin is allowed (CONVEYOR_ALLOWED_ORIGINS is empty here).
    connect(web_server, {"api_key": tenant.key}).disconnect()
    # Only the WebSocket transport is served: a long-polling handshake is refused.
    polling = httpx.get(f"{web_server.url}/socket.io/?EIO=4&transport=polling", timeout=10)
    assert polling.status_code == 400


def test_another_owners_job_is_refused_like_a_missing_one(
    web_server: WebServer, new_tenant, clients: list[socketio.Client]
) -> None:
    alice, mallory = new_tenant(), new_tenant()
    job_id = alice.submit("chat", {"prompt": "private"})["id"]
    client = connect(web_server, {"token": token(mallory)})
    clients.append(client)
    theirs = client.call("subscribe", {"job_id": job_id, "after_seq": 0}, timeout=10)
    missing = client.call("subscribe", {"job_id": str(uuid.uuid4()), "after_seq": 0}, timeout=10)
    assert theirs["ok"] is False and theirs["error"] == "not-found"
    assert {k: v for k, v in theirs.items() if k != "detail"} == {
        k: v for k, v in missing.items() if k != "detail"
    }
    bad = client.call("subscribe", {"job_id": "nope"}, timeout=10)
    assert bad == {"ok": False, "error": "bad-request", "detail": "send {job_id, after_seq}"}
    huge = client.call("subscribe", {"job_id": job_id, "after_seq": 10**30}, timeout=10)
    assert huge["ok"] is False and huge["error"] == "bad-request"
    assert client.connected  # refused with an answer, not a dropped connection


def test_a_job_scoped_token_sees_only_its_job(
    web_server: WebServer, tenant: Tenant, clients: list[socketio.Client]
) -> None:
    mine = tenant.submit("chat", {"prompt": "one"})["id"]
    other = tenant.submit("chat", {"prompt": "two"})["id"]
    client = connect(web_server, {"token": token(tenant, mine)})
    clients.append(client)
    assert client.call("subscribe", {"job_id": mine, "after_seq": 0}, timeout=10)["ok"] is True
    refused = client.call("subscribe", {"job_id": other, "after_seq": 0}, timeout=10)
    assert refused["error"] == "not-found"
    assert (
        tenant.post("/api/v1/realtime/token", json={"job_id": str(uuid.uuid4())}).status_code == 404
    )


def test_the_owner_room_sees_every_job_change_state(
    web_server: WebServer, tenant: Tenant, clients: list[socketio.Client]
) -> None:
    seen: list[dict[str, Any]] = []
    client = socketio.Client(reconnection=False)
    client.on("job_event", seen.append)
    client.connect(
        web_server.url, auth={"api_key": tenant.key}, transports=["websocket"], wait_timeout=10
    )
    clients.append(client)
    job_id = tenant.submit("chat", {"prompt": "watched from the list"})["id"]
    tenant.wait_for(job_id)
    wait_until(lambda: any(e["type"] == "job.succeeded" for e in seen), timeout=10)
    types = [e["type"] for e in seen if e["job_id"] == job_id]
    assert types[0] == "job.queued" and "job.started" in types
    assert "job.output.delta" not in types  # the owner room gets state changes, not tokens


def test_a_thousand_deltas_survive_a_disconnect_with_no_gap_and_no_duplicate(
    web_server: WebServer, tenant: Tenant, clients: list[socketio.Client]
) -> None:
    job_id = tenant.submit("chat", {"prompt": "[[sim tokens=1200 tps=300]] long answer"})["id"]
    feed = Feed()
    first = connect(web_server, {"token": token(tenant, job_id)}, feed)
    assert first.call("subscribe", {"job_id": job_id, "after_seq": 0}, timeout=10)["ok"]
    feed.wait_for(lambda f: f.types().count("job.output.delta") >= 300)
    first.disconnect()  # the connection drops mid-stream ...
    cut_at = feed.last_seq
    time.sleep(1.0)  # ... and events go on without this client for a while

    second = connect(web_server, {"token": token(tenant, job_id)}, feed)
    clients.append(second)
    ack = second.call("subscribe", {"job_id": job_id, "after_seq": feed.last_seq}, timeout=10)
    assert ack["ok"] and ack["source"] == "stream" and ack["replayed"] > 0
    feed.wait_for(lambda f: f.types()[-1:] == ["job.succeeded"], timeout=30)

    result = tenant.get(f"/api/v1/jobs/{job_id}/result").get_json()
    seqs = [e["seq"] for e in feed.applied]
    assert seqs == list(range(1, len(seqs) + 1))  # every seq once, in order
    assert not any("prev" in e for e in feed.applied)  # all from the stream or live
    assert feed.types().count("job.output.delta") >= 1000
    assert cut_at < seqs[-1] - 100  # a real share of the stream came after the cut
    assert feed.text() == result["output"]["text"]


def test_after_the_stream_expired_the_replay_comes_from_postgres_with_the_output(
    web_server: WebServer, tenant: Tenant, clients: list[socketio.Client]
) -> None:
    from app.jobs.events import stream_key
    from app.runtime import runtime

    job_id = tenant.submit("chat", {"prompt": "long ago"})["id"]
    tenant.wait_for(job_id)
    runtime().redis.delete(stream_key(job_id))
    feed = Feed()
    client = connect(web_server, {"token": token(tenant, job_id)}, feed)
    clients.append(client)
    ack = client.call("subscribe", {"job_id": job_id, "after_seq": 0}, timeout=10)
    assert ack["ok"] and ack["source"] == "database" and ack["status"] == "succeeded"
    feed.wait_for(lambda f: f.types()[-1:] == ["job.succeeded"])
    output = tenant.get(f"/api/v1/jobs/{job_id}/result").get_json()["output"]
    assert feed.applied[-1]["data"]["output"] == output
    assert "job.output.delta" not in feed.types()
