"""Webhooks end to end: real jobs on the real worker, deliveries sent from the `webhooks` queue
to a real HTTP receiver that verifies every signature with the `standardwebhooks` library."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select, text

from app.jobs import webhooks
from app.jobs.states import WEBHOOK_EVENTS
from app.models import WebhookDelivery
from app.runtime import runtime
from app.webhooks import guard
from tests.conftest import Tenant, undispatched_job, wait_until
from tests.webhook_receiver import Receiver, Reply

pytestmark = pytest.mark.usefixtures("worker")

LOOPBACK = "127.0.0.1/32"
# A public address: accepted without a DNS lookup (the tests may run offline); never called.
PUBLIC_URL = "https://93.184.216.34/hook"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as running:
        yield running


@pytest.fixture
def configure(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Changes the settings the API and the worker's tasks read (both in this process)."""

    def apply(**overrides: Any) -> None:
        settings = runtime().settings.model_copy(update=overrides)
        monkeypatch.setattr(runtime(), "settings", settings)

    return apply


@pytest.fixture
def allow_loopback(configure: Callable[..., None]) -> None:
    """The receiver listens on 127.0.0.1, which only an allow-list lets webhooks reach."""
    configure(webhook_allowed_networks=[LOOPBACK])


@pytest.fixture
def dispatcher(app: Flask) -> Iterator[None]:
    """What beat does every CONVEYOR_WEBHOOK_DISPATCH_INTERVAL: publish the due deliveries."""
    stop = threading.Event()

    def run() -> None:
        with app.app_context():
            while not stop.is_set():
                policy = webhooks.Policy.of(runtime().settings)
                webhooks.dispatch_due(runtime().db, runtime().celery, policy)
                stop.wait(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join()


def job_deliveries(tenant: Tenant, job_id: str) -> list[dict[str, Any]]:
    response = tenant.get(f"/api/v1/jobs/{job_id}/webhook-deliveries")
    assert response.status_code == 200, response.get_json()
    return response.get_json()["items"]


def settled(tenant: Tenant, job_id: str, count: int = 1) -> list[dict[str, Any]]:
    """The job's deliveries once `count` exist and none is pending."""

    def done() -> list[dict[str, Any]] | None:
        found = job_deliveries(tenant, job_id)
        if len(found) >= count and all(d["status"] != "pending" for d in found):
            return found
        return None

    return wait_until(done, timeout=20)


def submit_with_webhook(tenant: Tenant, url: str, **webhook: Any) -> dict[str, Any]:
    return tenant.submit("chat", {"prompt": "hello"}, webhook={"url": url, **webhook})


@pytest.mark.usefixtures("allow_loopback", "dispatcher")
def test_a_finished_job_is_delivered_once_signed_in_the_standard_webhooks_format(
    tenant: Tenant, receiver: Receiver
) -> None:
    job = submit_with_webhook(tenant, receiver.url())
    tenant.wait_for(job["id"])
    [delivery] = settled(tenant, job["id"])
    time.sleep(0.5)  # a duplicate would have come by now
    [request] = receiver.requests
    secret = tenant.get("/api/v1/webhook-secret").get_json()["secret"]
    assert secret.startswith("whsec_")
    payload = request.verified(secret)
    assert not request.signed_by("whsec_" + "A" * 43)
    assert request.headers["webhook-id"] == delivery["message_id"]
    assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 30
    assert request.headers["webhook-signature"].startswith("v1,")
    assert request.headers["Content-Type"] == "application/json"
    assert payload["type"] == "job.succeeded"
    assert payload["data"]["job"] == {"id": job["id"], "kind": "chat", "status": "succeeded"}
    event = payload["data"]["event"]
    assert event["job_id"] == job["id"] and event["type"] == "job.succeeded"
    assert event["seq"] == delivery["event_seq"] and event["at"] == payload["timestamp"]
    assert tenant.key not in request.body.decode() and tenant.key not in str(request.headers)
    assert delivery["status"] == "succeeded" and delivery["attempts"] == 1
    [attempt] = delivery["attempt_log"]
    assert attempt["status_code"] == 200 and attempt["address"] == "127.0.0.1"
    assert attempt["response_body"] == "ok"
    assert tenant.get(f"/api/v1/jobs/{job['id']}").get_json()["webhook"] == {
        "url": receiver.url(),
        "events": ["job.succeeded", "job.failed", "job.canceled"],
    }


@pytest.mark.usefixtures("allow_loopback", "dispatcher")
def test_endpoints_get_the_events_they_filter_for_signed_with_their_own_secret(
    tenant: Tenant, new_tenant: Callable[[], Tenant], receiver: Receiver
) -> None:
    started = tenant.post(
        "/api/v1/webhooks", json={"url": receiver.url("/started"), "events": ["job.started"]}
    )
    assert started.status_code == 201, started.get_json()
    finished = tenant.post("/api/v1/webhooks", json={"url": receiver.url("/finished")})
    assert finished.get_json()["events"] == ["job.succeeded", "job.failed", "job.canceled"]
    other = new_tenant()
    assert other.post("/api/v1/webhooks", json={"url": receiver.url("/other")}).status_code == 201
    job = tenant.submit("chat", {"prompt": "hello"})
    tenant.wait_for(job["id"])
    settled(tenant, job["id"], count=2)
    [first] = receiver.for_path("/started")
    [last] = receiver.for_path("/finished")
    assert first.verified(started.get_json()["secret"])["type"] == "job.started"
    assert last.verified(finished.get_json()["secret"])["type"] == "job.succeeded"
    assert not first.signed_by(finished.get_json()["secret"])
    assert receiver.for_path("/other") == []
    listed = tenant.get("/api/v1/webhooks").get_json()["items"]
    assert len(listed) == 2 and all("secret" not in endpoint for endpoint in listed)
    log = tenant.get(started.get_json()["links"]["deliveries"]).get_json()["items"]
    assert [d["event_type"] for d in log] == ["job.started"]
    assert other.get(started.get_json()["links"]["self"]).status_code == 404


@pytest.mark.usefixtures("allow_loopback", "dispatcher")
def test_an_endpoint_that_is_disabled_or_deleted_gets_nothing(
    tenant: Tenant, receiver: Receiver
) -> None:
    created = tenant.post("/api/v1/webhooks", json={"url": receiver.url()}).get_json()
    changed = tenant.client.patch(
        created["links"]["self"], json={"enabled": False}, headers=tenant.headers
    )
    assert changed.status_code == 200 and changed.get_json()["enabled"] is False
    job = tenant.submit("chat", {"prompt": "hello"})
    tenant.wait_for(job["id"])
    assert tenant.delete(created["links"]["self"]).status_code == 204
    assert tenant.get(created["links"]["self"]).status_code == 404
    time.sleep(0.3)
    assert receiver.requests == [] and job_deliveries(tenant, job["id"]) == []


@pytest.mark.usefixtures("allow_loopback", "dispatcher")
def test_a_failing_receiver_is_retried_with_backoff_until_it_answers(
    tenant: Tenant, receiver: Receiver
) -> None:
    receiver.replies.extend([Reply(500, b"down"), Reply(503, b"still down")])
    job = submit_with_webhook(tenant, receiver.url())
    tenant.wait_for(job["id"])
    [delivery] = settled(tenant, job["id"])
    assert delivery["status"] == "succeeded" and delivery["attempts"] == 3
    codes = [attempt["status_code"] for attempt in delivery["attempt_log"]]
    assert codes == [500, 503, 200]
    assert delivery["attempt_log"][0]["response_body"] == "down"
    ids = {request.headers["webhook-id"] for request in receiver.requests}
    assert ids == {delivery["message_id"]}  # one message, three attempts
    # Backoff: 0.2 s doubling (jittered to 50-100 %), capped at 0.5 s in the tests' settings.
    first, second, third = (request.at for request in receiver.requests)
    assert second - first >= 0.1 and third - second >= 0.2


@pytest.mark.usefixtures("allow_loopback", "dispatcher")
@pytest.mark.parametrize(
    ("reply", "error", "status_code"),
    [
        (Reply(302, b"", headers={"Location": "/elsewhere"}), None, 302),
        (Reply(200, delay=3.0), "timeout", None),
        (Reply(404, b"no such hook"), None, 404),
    ],
    ids=["redirect", "timeout", "not-found"],
)
def test_a_delivery_that_keeps_failing_gives_up_after_its_window(
    tenant: Tenant,
    receiver: Receiver,
    configure: Callable[..., None],
    reply: Reply,
    error: str | None,
    status_code: int | None,
) -> None:
    configure(webhook_allowed_networks=[LOOPBACK], webhook_retry_window=1.5)
    receiver.default = reply
    job = submit_with_webhook(tenant, receiver.url())
    tenant.wait_for(job["id"])
    [delivery] = settled(tenant, job["id"])
    assert delivery["status"] == "failed" and delivery["finished_at"]
    assert delivery["attempts"] >= 1
    last = delivery["attempt_log"][-1]
    assert last["status_code"] == status_code
    assert (last["error"] or "").startswith(error or "") and (error is None) == (
        last["error"] is None
    )
    if error == "timeout":
        assert 1500 < last["duration_ms"] < 4000  # CONVEYOR_WEBHOOK_TIMEOUT is 2 s
    assert receiver.for_path("/elsewhere") == []  # a redirect is never followed


@pytest.mark.usefixtures("allow_loopback", "dispatcher")
def test_redelivery_sends_the_same_message_again(
    tenant: Tenant, new_tenant: Callable[[], Tenant], receiver: Receiver
) -> None:
    job = submit_with_webhook(tenant, receiver.url())
    tenant.wait_for(job["id"])
    [delivery] = settled(tenant, job["id"])
    assert new_tenant().post(delivery["links"]["redeliver"]).status_code == 404
    again = tenant.post(delivery["links"]["redeliver"])
    assert again.status_code == 202 and again.get_json()["status"] == "pending"
    [delivery] = wait_until(
        lambda: (
            [d for d in job_deliveries(tenant, job["id"]) if d["attempts"] == 2]
            and settled(tenant, job["id"])
        )
    )
    assert delivery["status"] == "succeeded" and delivery["redelivered_at"]
    first, second = receiver.requests
    assert first.body == second.body
    assert first.headers["webhook-id"] == second.headers["webhook-id"]


def test_redelivering_a_pending_delivery_is_a_conflict(tenant: Tenant) -> None:
    # No dispatcher runs here: the delivery stays pending.
    job_id = undispatched_job(tenant.owner)
    with runtime().db.transaction() as session:
        session.execute(
            text("UPDATE jobs SET webhook = CAST(:hook AS jsonb) WHERE id = :id"),
            {"hook": '{"url": "https://example.com/h", "events": ["job.canceled"]}', "id": job_id},
        )
    assert tenant.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 200
    [delivery] = job_deliveries(tenant, str(job_id))
    assert delivery["status"] == "pending"
    assert tenant.post(delivery["links"]["redeliver"]).status_code == 409


@pytest.mark.usefixtures("allow_loopback", "dispatcher")
@pytest.mark.parametrize("size", [4095, 4096, 4097, 1_000_000])
def test_a_receivers_response_is_read_up_to_the_cap(
    tenant: Tenant, receiver: Receiver, size: int
) -> None:
    receiver.default = Reply(200, b"y" * size)
    job = submit_with_webhook(tenant, receiver.url())
    tenant.wait_for(job["id"])
    [delivery] = settled(tenant, job["id"])
    stored = delivery["attempt_log"][0]["response_body"]
    assert stored == "y" * min(size, 4096)  # CONVEYOR_WEBHOOK_RESPONSE_MAX_BYTES
    assert delivery["status"] == "succeeded"


@pytest.mark.usefixtures("allow_loopback", "dispatcher")
def test_an_endless_response_does_not_hold_the_sender(tenant: Tenant, receiver: Receiver) -> None:
    receiver.default = Reply(200, endless=True)
    job = submit_with_webhook(tenant, receiver.url())
    tenant.wait_for(job["id"])
    [delivery] = settled(tenant, job["id"])
    [attempt] = delivery["attempt_log"]
    assert delivery["status"] == "succeeded" and len(attempt["response_body"]) == 4096
    assert attempt["duration_ms"] < 1000


# The SSRF guard ---------------------------------------------------------------------------------

REFUSED_URLS = [
    "http://127.0.0.1/hook",
    "http://localhost/hook",
    "http://10.0.0.1/hook",
    "http://192.168.1.10:8080/hook",
    "http://172.16.0.1/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://[::ffff:169.254.169.254]/hook",
    "http://[fe80::1]/hook",
    "http://[fd00::1]/hook",
    "http://[64:ff9b::a00:1]/hook",
    "http://0.0.0.0/hook",
    "http://224.0.0.1/hook",
    "http://100.64.0.1/hook",
    "ftp://example.com/hook",
    "file:///etc/passwd",
    "gopher://example.com/",
    "http://user:pass@example.com/hook",
    "not a url",
]


@pytest.mark.parametrize("url", REFUSED_URLS)
def test_a_job_webhook_to_a_refused_destination_is_a_422_naming_it(
    tenant: Tenant, url: str
) -> None:
    response = tenant.post(
        "/api/v1/jobs", json={"kind": "chat", "input": {"prompt": "x"}, "webhook": {"url": url}}
    )
    assert response.status_code == 422, response.get_json()
    problem = response.get_json()
    assert response.content_type == "application/problem+json"
    assert [error["field"] for error in problem["errors"]] == ["webhook.url"]


@pytest.mark.parametrize(
    ("webhook", "field"),
    [
        ({"url": "https://example.com/h", "events": ["job.progress"]}, "webhook.events.0"),
        ({"url": "https://example.com/h", "events": []}, "webhook.events"),
        ({"url": "https://example.com/h", "secret": "x"}, "webhook.secret"),
        ({"events": ["job.failed"]}, "webhook.url"),
        ({"url": "https://example.com/" + "a" * 2000}, "webhook.url"),
    ],
)
def test_a_bad_webhook_is_a_422_naming_the_field(
    tenant: Tenant, webhook: dict[str, Any], field: str
) -> None:
    response = tenant.post(
        "/api/v1/jobs", json={"kind": "chat", "input": {"prompt": "x"}, "webhook": webhook}
    )
    assert response.status_code == 422
    assert field in [error["field"] for error in response.get_json()["errors"]]


def test_refused_destinations_in_a_batch_and_an_endpoint_are_named(tenant: Tenant) -> None:
    items = [
        {"kind": "chat", "input": {"prompt": "a"}},
        {"kind": "chat", "input": {"prompt": "b"}, "webhook": {"url": "http://10.1.2.3/"}},
    ]
    response = tenant.post("/api/v1/batches", json={"items": items})
    assert response.status_code == 422
    assert [e["field"] for e in response.get_json()["errors"]] == ["items[1].webhook.url"]
    endpoint = tenant.post("/api/v1/webhooks", json={"url": "http://169.254.169.254/"})
    assert endpoint.status_code == 422
    assert [e["field"] for e in endpoint.get_json()["errors"]] == ["url"]


def test_an_allow_list_admits_a_private_network(
    tenant: Tenant, configure: Callable[..., None]
) -> None:
    body = {"kind": "chat", "input": {"prompt": "x"}, "webhook": {"url": "http://10.1.2.3/h"}}
    assert tenant.post("/api/v1/jobs", json=body).status_code == 422
    configure(webhook_allowed_networks=["10.0.0.0/8"])
    assert tenant.post("/api/v1/jobs", json=body).status_code == 202


@pytest.mark.usefixtures("dispatcher")
def test_a_name_that_resolves_elsewhere_at_send_time_is_refused_then(
    tenant: Tenant, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: public when the job was submitted, loopback when the webhook is sent."""
    answers = {"submit": guard.ipaddress.ip_address("93.184.216.34")}
    real = guard.resolve

    def rebinding(host: str, port: int) -> list[guard.IPAddress]:
        if host != "rebind.example.test":
            return real(host, port)
        return [answers.get("submit") or guard.ipaddress.ip_address("127.0.0.1")]

    monkeypatch.setattr(guard, "resolve", rebinding)
    job = submit_with_webhook(tenant, f"http://rebind.example.test:{receiver.port}/hook")
    answers.clear()
    tenant.wait_for(job["id"])
    [delivery] = settled(tenant, job["id"])
    assert delivery["status"] == "failed" and delivery["attempts"] == 1
    assert "127.0.0.1" in delivery["last_error"] and "loopback" in delivery["last_error"]
    assert delivery["attempt_log"][0]["address"] is None
    assert receiver.requests == []


@pytest.mark.usefixtures("allow_loopback", "dispatcher")
def test_the_sender_connects_to_the_address_it_checked(
    tenant: Tenant, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name is resolved once per attempt, by the guard; the connection goes to that address
    with the name in the Host header. Nothing else could resolve `hooks.example.test`."""
    lookups: list[str] = []
    real = guard.resolve

    def pinned(host: str, port: int) -> list[guard.IPAddress]:
        if host != "hooks.example.test":
            return real(host, port)
        lookups.append(host)
        return [guard.ipaddress.ip_address("127.0.0.1")]

    monkeypatch.setattr(guard, "resolve", pinned)
    job = submit_with_webhook(tenant, f"http://hooks.example.test:{receiver.port}/hook")
    tenant.wait_for(job["id"])
    [delivery] = settled(tenant, job["id"])
    assert delivery["status"] == "succeeded"
    [request] = receiver.requests
    assert request.headers["Host"] == f"hooks.example.test:{receiver.port}"
    assert lookups == ["hooks.example.test", "hooks.example.test"]  # at submit, at send


# The outbox ---------------------------------------------------------------------------------------


def test_a_delivery_is_made_in_the_transaction_of_its_event(tenant: Tenant) -> None:
    """A trigger on job_events: the event and its delivery commit or roll back together, so a
    crash after a state change cannot lose its webhook, whichever process made the change."""
    job_id = undispatched_job(tenant.owner)
    hook = '{"url": "https://example.com/h", "events": ["job.failed"]}'
    insert_event = text(
        "INSERT INTO job_events (job_id, seq, type, data) VALUES (:id, 2, 'job.failed', '{}')"
    )
    count = select(WebhookDelivery.id).where(WebhookDelivery.job_id == job_id)
    with runtime().db.transaction() as session:
        session.execute(
            text("UPDATE jobs SET webhook = CAST(:h AS jsonb) WHERE id = :id"),
            {"h": hook, "id": job_id},
        )
    session = runtime().db.new_session()
    with session.begin():
        session.execute(insert_event, {"id": job_id})
        assert len(session.scalars(count).all()) == 1
        session.rollback()
    with runtime().db.transaction() as session:
        assert session.scalars(count).all() == []
        session.execute(insert_event, {"id": job_id})
    with runtime().db.transaction() as session:
        [delivery] = session.scalars(
            select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
        ).all()
    assert delivery.status == "pending" and delivery.url == "https://example.com/h"
    assert delivery.payload["data"]["job"]["status"] == "failed"


@pytest.mark.usefixtures("allow_loopback")
def test_deliveries_wait_in_the_outbox_until_a_dispatcher_runs(
    tenant: Tenant, receiver: Receiver
) -> None:
    job = submit_with_webhook(tenant, receiver.url())
    tenant.wait_for(job["id"])
    time.sleep(0.3)
    [delivery] = job_deliveries(tenant, job["id"])
    assert delivery["status"] == "pending" and receiver.requests == []
    policy = webhooks.Policy.of(runtime().settings)
    wait_until(lambda: webhooks.dispatch_due(runtime().db, runtime().celery, policy) == 0)
    [delivery] = settled(tenant, job["id"])
    assert delivery["status"] == "succeeded" and len(receiver.requests) == 1


def test_a_duplicate_send_message_sends_nothing(tenant: Tenant, receiver: Receiver) -> None:
    job_id = undispatched_job(tenant.owner)
    with runtime().db.transaction() as session:
        session.execute(
            text("UPDATE jobs SET webhook = CAST(:h AS jsonb) WHERE id = :id"),
            {"h": f'{{"url": "{receiver.url()}", "events": ["job.canceled"]}}', "id": job_id},
        )
    tenant.post(f"/api/v1/jobs/{job_id}/cancel")
    [delivery] = job_deliveries(tenant, str(job_id))
    policy = webhooks.Policy.of(
        runtime().settings.model_copy(update={"webhook_allowed_networks": [LOOPBACK]})
    )
    delivery_id = uuid.UUID(delivery["id"])
    assert webhooks.deliver(runtime().db, policy, delivery_id, 0) == "succeeded"
    assert webhooks.deliver(runtime().db, policy, delivery_id, 0) == "skipped"
    assert len(receiver.requests) == 1


def test_the_outbox_trigger_fires_for_exactly_the_webhook_events(app: object) -> None:
    with runtime().db.transaction() as session:
        definition = session.scalar(
            text(
                "SELECT pg_get_triggerdef(oid) FROM pg_trigger "
                "WHERE tgname = 'job_events_webhook_outbox'"
            )
        )
    named = {event.value for event in WEBHOOK_EVENTS}
    assert definition is not None
    assert {name for name in named if f"'{name}'" in definition} == named
    assert definition.count("'job.") == len(named)


def test_a_tenant_may_have_as_many_endpoints_as_the_limit(
    tenant: Tenant, configure: Callable[..., None]
) -> None:
    configure(webhook_max_endpoints=2)
    for _ in range(2):
        created = tenant.post("/api/v1/webhooks", json={"url": PUBLIC_URL})
        assert created.status_code == 201
    refused = tenant.post("/api/v1/webhooks", json={"url": PUBLIC_URL})
    assert refused.status_code == 422
    assert refused.get_json()["type"] == "/problems/webhook-endpoint-limit"


def test_the_job_secret_rotates(tenant: Tenant) -> None:
    first = tenant.get("/api/v1/webhook-secret").get_json()["secret"]
    assert tenant.get("/api/v1/webhook-secret").get_json()["secret"] == first
    rotated = tenant.post("/api/v1/webhook-secret/rotate").get_json()["secret"]
    assert rotated != first and rotated.startswith("whsec_")
    assert tenant.get("/api/v1/webhook-secret").get_json()["secret"] == rotated
