"""Canvases: the API (CRUD, 422s naming the field, tenancy), the `canvas` kind against the
simulator through a real worker, its room on the real web process, and the save fenced by the
attempt (stale, duplicated and retried finishes never save twice or half)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import socketio
from flask import current_app
from sqlalchemy import delete, func, select, text, update

from app.jobs import canvases
from app.jobs.canvas_shapes import MAX_OBJECTS, Rectangle
from app.jobs.payloads import SucceededPayload
from app.jobs.transitions import LeaseLost
from app.models import Artifact, Canvas, CanvasObject, Job
from app.runtime import runtime
from tests.conftest import Tenant, undispatched_job, wait_until
from tests.webserver import WebServer

pytestmark = pytest.mark.usefixtures("worker")

RECTANGLE = {"type": "rectangle", "x": 10, "y": 20, "width": 100, "height": 50, "fill": "#2563eb"}
ARROW = {"type": "arrow", "x": 120, "y": 45, "width": 80, "height": -30}
NOTE = {"type": "sticky_note", "x": 300, "y": 40, "width": 120, "height": 120, "text": "todo"}


def create_canvas(tenant: Tenant, **body: Any) -> dict[str, Any]:
    response = tenant.post("/api/v1/canvases", json={"name": "board", **body})
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def objects_in_db(canvas_id: str | uuid.UUID) -> list[CanvasObject]:
    with runtime().db.transaction() as session:
        return canvases.objects_of(session, uuid.UUID(str(canvas_id)))


def canvas_job(tenant: Tenant, canvas_id: str, prompt: str = "a flow chart", **extra: Any) -> str:
    job_input = {"canvas_id": canvas_id, "prompt": f"{prompt} {uuid.uuid4()}", **extra}
    return tenant.submit("canvas", job_input)["id"]


def unchecked_canvas_job(owner: str, canvas_id: str, **extra: Any) -> str:
    """A canvas job stored without the API's submit-time checks, as if the canvas had changed
    between the submit and the run."""
    job_input = {"canvas_id": canvas_id, "max_objects": 1, **extra}
    job_id = undispatched_job(owner, kind="canvas", extra_input=job_input)
    assert runtime().jobs.dispatch(job_id)
    return str(job_id)


# The API ----------------------------------------------------------------------------------------


def test_create_get_list_and_delete(tenant: Tenant) -> None:
    created = create_canvas(tenant, width=800, height=600, objects=[RECTANGLE, ARROW, NOTE])
    assert created["object_count"] == 3 and created["width"] == 800
    assert [o["type"] for o in created["objects"]] == ["rectangle", "arrow", "sticky_note"]
    assert [o["z"] for o in created["objects"]] == [0, 1, 2]
    note = created["objects"][2]
    assert note["fill"] == "#fde68a" and note["text"] == "todo" and note["job_id"] is None
    assert created["objects"][1]["height"] == -30  # a line may run up and left

    got = tenant.get(created["links"]["self"])
    assert got.status_code == 200 and got.get_json()["objects"] == created["objects"]

    second = create_canvas(tenant)
    assert second["objects"] == [] and (second["width"], second["height"]) == (1920, 1080)
    page = tenant.get("/api/v1/canvases?limit=1").get_json()
    assert [c["id"] for c in page["items"]] == [second["id"]]
    rest = tenant.get(f"/api/v1/canvases?limit=5&cursor={page['next_cursor']}").get_json()
    assert [c["id"] for c in rest["items"]] == [created["id"]] and rest["next_cursor"] is None

    assert tenant.delete(created["links"]["self"]).status_code == 204
    assert tenant.get(created["links"]["self"]).status_code == 404
    assert tenant.delete(created["links"]["self"]).status_code == 404
    assert objects_in_db(created["id"]) == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": ""}, "name"),
        ({"width": 0}, "width"),
        ({"objects": [{**RECTANGLE, "width": -5}]}, "objects.0.width"),
        ({"objects": [RECTANGLE, {**RECTANGLE, "fill": "blue"}]}, "objects.1.fill"),
        ({"objects": [{**RECTANGLE, "type": "hexagon"}]}, "objects.0"),
        ({"objects": [{**RECTANGLE, "rotation": 360}]}, "objects.0.rotation"),
        ({"objects": [{**ARROW, "width": 0, "height": 0}]}, "objects.0"),
        (
            {"objects": [{"type": "text", "x": 0, "y": 0, "width": 9, "height": 9}]},
            "objects.0.text",
        ),
        ({"objects": [{**NOTE, "text": "x" * 2001}]}, "objects.0.text"),
        ({"objects": [{**RECTANGLE, "x": 10**7}]}, "objects.0.x"),
        ({"objects": [RECTANGLE] * (MAX_OBJECTS + 1)}, "objects"),
        ({"objects": [{**RECTANGLE, "spin": 3}]}, "objects.0.spin"),
        ({"objects": [{**NOTE, "text": "nul\u0000"}]}, "objects.0.text"),
    ],
)
def test_bad_canvases_are_422s_naming_the_field(
    tenant: Tenant, body: dict[str, Any], field: str
) -> None:
    response = tenant.post("/api/v1/canvases", json=body)
    assert response.status_code == 422, response.get_json()
    problem = response.get_json()
    assert response.content_type == "application/problem+json"
    assert field in [error["field"] for error in problem["errors"]], problem


def test_an_image_must_be_a_published_artifact_of_the_owner(tenant: Tenant, new_tenant) -> None:
    artifact_id = published_artifact(tenant.owner)
    image = {"type": "image", "x": 0, "y": 0, "width": 64, "height": 64}
    created = create_canvas(tenant, objects=[{**image, "artifact_id": str(artifact_id)}])
    assert created["objects"][0]["artifact_id"] == str(artifact_id)

    other = new_tenant()
    refused = other.post(
        "/api/v1/canvases",
        json={"objects": [RECTANGLE, {**image, "artifact_id": str(artifact_id)}]},
    )
    assert refused.status_code == 422
    assert [e["field"] for e in refused.get_json()["errors"]] == ["objects.1.artifact_id"]
    missing = {**image, "artifact_id": str(uuid.uuid4())}
    assert tenant.post("/api/v1/canvases", json={"objects": [missing]}).status_code == 422


def published_artifact(owner: str) -> uuid.UUID:
    job_id = undispatched_job(owner)
    artifact_id = uuid.uuid4()
    with runtime().db.transaction() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="succeeded"))
        session.add(
            Artifact(
                id=artifact_id,
                job_id=job_id,
                owner=owner,
                attempt=1,
                position=0,
                name="cat.png",
                content_type="image/png",
                size=3,
                sha256="0" * 64,
                storage_key=f"jobs/{job_id}/1/{artifact_id}.png",
                published_at=datetime.now(UTC),
            )
        )
    return artifact_id


def test_another_tenants_canvas_is_a_404(tenant: Tenant, new_tenant) -> None:
    created = create_canvas(tenant, objects=[RECTANGLE])
    other = new_tenant()
    url = created["links"]["self"]
    assert other.get(url).status_code == 404
    assert other.delete(url).status_code == 404
    assert other.get("/api/v1/canvases").get_json()["items"] == []
    assert tenant.get(url).get_json()["object_count"] == 1


# The kind ---------------------------------------------------------------------------------------


def test_a_canvas_job_saves_its_objects(tenant: Tenant) -> None:
    canvas = create_canvas(tenant, width=800, height=600, objects=[RECTANGLE])
    job_id = canvas_job(tenant, canvas["id"], max_objects=3)
    job = tenant.wait_for(job_id)
    assert job["status"] == "succeeded", job["error"]
    output = tenant.get(f"/api/v1/jobs/{job_id}/result").get_json()["output"]
    assert output["canvas_id"] == canvas["id"] and 1 <= len(output["object_ids"]) <= 3

    got = tenant.get(canvas["links"]["self"]).get_json()
    made = [o for o in got["objects"] if o["job_id"] == job_id]
    assert [o["id"] for o in made] == output["object_ids"]
    assert got["object_count"] == 1 + len(made) == len(got["objects"])
    assert [o["z"] for o in made] == list(range(1, 1 + len(made)))  # above what was there
    for obj in made:
        assert obj["type"] in {"rectangle", "ellipse", "line", "arrow", "text", "sticky_note"}
        assert 0 <= obj["x"] <= 800 and 0 <= obj["rotation"] < 360


def test_a_canvas_job_on_another_tenants_canvas_fails_and_tells_its_room_nothing(
    web_server: WebServer, tenant: Tenant, new_tenant, rooms: list[Room]
) -> None:
    canvas = create_canvas(tenant)
    room = open_room(web_server, {"api_key": tenant.key}, rooms)
    assert room.subscribe(canvas["id"])["ok"] is True
    thief = new_tenant()
    refused = thief.post(
        "/api/v1/jobs",
        json={"kind": "canvas", "input": {"canvas_id": canvas["id"], "prompt": "mine now"}},
    )
    assert refused.status_code == 422
    assert refused.get_json()["errors"][0]["field"] == "input.canvas_id"
    # Past the submit check (stored directly), the worker refuses it too.
    job_id = unchecked_canvas_job(thief.owner, canvas["id"])
    job = thief.wait_for(job_id, timeout=30)
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_input"
    mine = canvas_job(tenant, canvas["id"], max_objects=1)  # the room's next messages
    wait_until(lambda: "ai_generation_completed" in room.names(mine))
    assert room.names(job_id) == []
    assert all(o.job_id == uuid.UUID(mine) for o in objects_in_db(canvas["id"]))


def test_canvas_input_is_checked_at_submit(tenant: Tenant) -> None:
    body = {"kind": "canvas", "input": {"canvas_id": "nope", "prompt": "x", "max_objects": 99}}
    response = tenant.post("/api/v1/jobs", json=body)
    assert response.status_code == 422
    fields = {e["field"] for e in response.get_json()["errors"]}
    assert fields == {"input.canvas_id", "input.max_objects"}
    missing = {"canvas_id": str(uuid.uuid4()), "prompt": "x"}
    response = tenant.post("/api/v1/jobs", json={"kind": "canvas", "input": missing})
    assert response.status_code == 422
    assert response.get_json()["errors"][0]["field"] == "input.canvas_id"
    canvas = create_canvas(tenant)
    stranger = {"canvas_id": canvas["id"], "prompt": "x", "artifact_ids": [str(uuid.uuid4())]}
    response = tenant.post("/api/v1/jobs", json={"kind": "canvas", "input": stranger})
    assert response.status_code == 422
    assert response.get_json()["errors"][0]["field"] == "input.artifact_ids"


def test_a_full_canvas_refuses_the_job(tenant: Tenant) -> None:
    canvas = create_canvas(tenant, objects=[NOTE] * MAX_OBJECTS)
    body = {"kind": "canvas", "input": {"canvas_id": canvas["id"], "prompt": "more"}}
    refused = tenant.post("/api/v1/jobs", json=body)
    assert refused.status_code == 422
    assert refused.get_json()["errors"][0]["field"] == "input.canvas_id"
    assert "full" in refused.get_json()["errors"][0]["message"]
    # Filled between its submit and its run (stored directly): the job fails.
    job = tenant.wait_for(unchecked_canvas_job(tenant.owner, canvas["id"]), timeout=30)
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_input"
    assert "full" in job["error"]["message"]


# The room ---------------------------------------------------------------------------------------


class Room:
    """A client's view of one canvas room: every message, by name, in arrival order."""

    NAMES = ("ai_generation_started", "objects_added", "ai_generation_completed", "ai_job_error")

    def __init__(self, server: WebServer, auth: dict[str, str]) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self.client = socketio.Client(reconnection=False)
        for name in self.NAMES:
            self.client.on(name, self._keeper(name))
        self.client.connect(server.url, auth=auth, transports=["websocket"], wait_timeout=10)

    def _keeper(self, name: str) -> Any:
        def keep(data: dict[str, Any]) -> None:
            with self._lock:
                self.messages.append((name, data))

        return keep

    def names(self, job_id: str) -> list[str]:
        with self._lock:
            return [name for name, data in self.messages if data["job_id"] == job_id]

    def of(self, name: str) -> dict[str, Any]:
        with self._lock:
            return next(data for seen, data in self.messages if seen == name)

    def subscribe(self, canvas_id: str) -> dict[str, Any]:
        return self.client.call("subscribe", {"canvas_id": canvas_id}, timeout=10)


@pytest.fixture
def rooms() -> Iterator[list[Room]]:
    opened: list[Room] = []
    yield opened
    for room in opened:
        room.client.disconnect()


def open_room(server: WebServer, auth: dict[str, str], rooms: list[Room]) -> Room:
    room = Room(server, auth)
    rooms.append(room)
    return room


def test_the_room_hears_the_start_the_objects_and_the_end(
    web_server: WebServer, tenant: Tenant, rooms: list[Room]
) -> None:
    canvas = create_canvas(tenant)
    room = open_room(web_server, {"api_key": tenant.key}, rooms)
    ack = room.subscribe(canvas["id"])
    assert ack == {"ok": True, "canvas_id": canvas["id"], "object_count": 0}
    job_id = canvas_job(tenant, canvas["id"], max_objects=4)
    assert tenant.wait_for(job_id)["status"] == "succeeded"
    wait_until(lambda: "ai_generation_completed" in room.names(job_id))
    assert room.names(job_id) == [
        "ai_generation_started",
        "objects_added",
        "ai_generation_completed",
    ]
    saved = tenant.get(canvas["links"]["self"]).get_json()["objects"]
    assert room.of("objects_added")["objects"] == saved
    completed = room.of("ai_generation_completed")
    assert completed["object_ids"] == [o["id"] for o in saved]
    assert completed["generated"] == len(saved) and completed["canvas_id"] == canvas["id"]
    assert room.of("ai_generation_started")["attempt"] == 1

    assert room.client.call("unsubscribe", {"canvas_id": canvas["id"]}, timeout=10) == {"ok": True}
    second = canvas_job(tenant, canvas["id"], max_objects=1)
    tenant.wait_for(second)
    other_canvas = create_canvas(tenant)  # a message to another room, to wait on
    assert room.subscribe(other_canvas["id"])["ok"] is True
    third = canvas_job(tenant, other_canvas["id"], max_objects=1)
    wait_until(lambda: "ai_generation_completed" in room.names(third))
    assert room.names(second) == []


def test_a_failing_canvas_job_is_an_ai_job_error(
    web_server: WebServer, tenant: Tenant, rooms: list[Room]
) -> None:
    canvas = create_canvas(tenant)
    room = open_room(web_server, {"api_key": tenant.key}, rooms)
    assert room.subscribe(canvas["id"])["ok"] is True
    job_id = canvas_job(tenant, canvas["id"], prompt="[[sim fault=400]] boxes")
    assert tenant.wait_for(job_id)["status"] == "failed"
    wait_until(lambda: "ai_job_error" in room.names(job_id))
    assert room.names(job_id) == ["ai_generation_started", "ai_job_error"]
    error = room.of("ai_job_error")
    assert error["status"] == "failed" and error["code"] == "model_bad_request"
    assert objects_in_db(canvas["id"]) == []


def test_only_the_owners_unscoped_connections_open_the_room(
    web_server: WebServer, tenant: Tenant, new_tenant, rooms: list[Room]
) -> None:
    canvas = create_canvas(tenant)
    other = new_tenant()
    stranger = open_room(web_server, {"api_key": other.key}, rooms)
    refused = stranger.subscribe(canvas["id"])
    assert refused["ok"] is False and refused["error"] == "not-found"
    missing = stranger.subscribe(str(uuid.uuid4()))
    assert {k: v for k, v in missing.items() if k != "detail"} == {
        k: v for k, v in refused.items() if k != "detail"
    }
    assert stranger.subscribe("nope")["error"] == "bad-request"

    job_id = tenant.submit("chat", {"prompt": "scoped"})["id"]
    for scope in ({"job_id": job_id}, {"batch_id": str(batch_of(tenant))}):
        minted = tenant.post("/api/v1/realtime/token", json=scope)
        assert minted.status_code == 201, minted.get_json()
        scoped = open_room(web_server, {"token": minted.get_json()["token"]}, rooms)
        assert scoped.subscribe(canvas["id"])["error"] == "not-found"

    unscoped = tenant.post("/api/v1/realtime/token", json={}).get_json()["token"]
    owner = open_room(web_server, {"token": unscoped}, rooms)
    assert owner.subscribe(canvas["id"])["ok"] is True


def batch_of(tenant: Tenant) -> uuid.UUID:
    response = tenant.post(
        "/api/v1/batches", json={"items": [{"kind": "chat", "input": {"prompt": "b"}}]}
    )
    assert response.status_code == 202, response.get_json()
    return uuid.UUID(response.get_json()["id"])


# Fencing and the canvas's lifetime --------------------------------------------------------------


def claimed_canvas_job(tenant: Tenant, canvas_id: str) -> Any:
    job_id = undispatched_job(
        tenant.owner, kind="canvas", extra_input={"canvas_id": canvas_id, "max_objects": 2}
    )
    claim = runtime().jobs.claim_job(job_id, "canvas-test")
    assert claim is not None
    return claim


def finish_with_objects(claim: Any, seq: int, count: int = 2) -> list[str]:
    """What the kind does when it succeeds: `count` objects saved by the finish."""
    rows = [
        Rectangle(**RECTANGLE, text=f"o{i}").row() | {"id": str(uuid.uuid4())} for i in range(count)
    ]
    effect = canvases.save_effect(uuid.UUID(claim.input["canvas_id"]), claim.owner, rows)
    runtime().jobs.finish_job(
        claim,
        seq,
        SucceededPayload(attempt=claim.attempt),
        output={"object_ids": [row["id"] for row in rows]},
        effects=(effect,),
    )
    return [row["id"] for row in rows]


def test_a_stale_attempt_saves_nothing(tenant: Tenant) -> None:
    canvas = create_canvas(tenant)
    stale = claimed_canvas_job(tenant, canvas["id"])
    with runtime().db.transaction() as session:  # the sweeper gave the job to attempt 2
        session.execute(update(Job).where(Job.id == stale.job_id).values(attempt=2))
    with pytest.raises(LeaseLost):
        finish_with_objects(stale, stale.seq + 1)
    assert objects_in_db(canvas["id"]) == []
    assert tenant.get(canvas["links"]["self"]).get_json()["object_count"] == 0


def test_a_duplicate_finish_or_delivery_never_saves_twice(tenant: Tenant) -> None:
    canvas = create_canvas(tenant)
    claim = claimed_canvas_job(tenant, canvas["id"])
    saved = finish_with_objects(claim, claim.seq + 1)
    with pytest.raises(LeaseLost):  # the same attempt's finish, delivered again
        finish_with_objects(claim, claim.seq + 2)
    assert runtime().jobs.claim_job(claim.job_id, "duplicate-delivery") is None
    assert sorted(str(o.id) for o in objects_in_db(canvas["id"])) == sorted(saved)
    assert tenant.get(canvas["links"]["self"]).get_json()["object_count"] == 2


def test_a_retried_job_saves_only_the_winning_attempts_objects(tenant: Tenant) -> None:
    canvas = create_canvas(tenant)
    job_id = undispatched_job(
        tenant.owner,
        kind="canvas",
        extra_input={"canvas_id": canvas["id"], "max_objects": 2},
    )
    lost = runtime().jobs.claim_job(job_id, "worker-that-died")
    assert lost is not None
    with runtime().db.transaction() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_expires_at=func.now() - timedelta(seconds=1))
        )
    runtime().jobs.sweep()  # attempt 2 goes to the real worker
    job = tenant.wait_for(str(job_id))
    assert job["status"] == "succeeded" and job["attempt"] == 2
    with pytest.raises(LeaseLost):  # attempt 1 comes back from the dead
        finish_with_objects(lost, lost.seq + 1)
    output = tenant.get(f"/api/v1/jobs/{job_id}/result").get_json()["output"]
    saved = objects_in_db(canvas["id"])
    assert sorted(str(o.id) for o in saved) == sorted(output["object_ids"])
    assert {o.job_id for o in saved} == {job_id}


def test_the_canvas_bound_holds_across_jobs(tenant: Tenant) -> None:
    canvas = create_canvas(tenant, objects=[NOTE] * (MAX_OBJECTS - 3))
    first = claimed_canvas_job(tenant, canvas["id"])
    second = claimed_canvas_job(tenant, canvas["id"])
    finish_with_objects(first, first.seq + 1, count=2)
    finish_with_objects(second, second.seq + 1, count=2)  # room for one more only
    with runtime().db.transaction() as session:
        stored = session.get_one(Canvas, uuid.UUID(canvas["id"]))
        count = session.scalar(
            select(func.count()).where(CanvasObject.canvas_id == uuid.UUID(canvas["id"]))
        )
    assert stored.object_count == count == MAX_OBJECTS
    assert [o.job_id for o in objects_in_db(canvas["id"])][-3:] == [
        first.job_id,
        first.job_id,
        second.job_id,
    ]


def test_a_canvas_deleted_before_the_finish_gets_nothing_and_the_job_succeeds(
    tenant: Tenant,
) -> None:
    canvas = create_canvas(tenant)
    claim = claimed_canvas_job(tenant, canvas["id"])
    assert tenant.delete(canvas["links"]["self"]).status_code == 204
    finish_with_objects(claim, claim.seq + 1)  # no foreign key error
    assert tenant.get(f"/api/v1/jobs/{claim.job_id}").get_json()["status"] == "succeeded"
    with runtime().db.transaction() as session:
        assert (
            session.scalars(select(CanvasObject).where(CanvasObject.job_id == claim.job_id)).all()
            == []
        )


def test_a_canvas_deleted_while_its_job_runs(
    web_server: WebServer, tenant: Tenant, rooms: list[Room]
) -> None:
    canvas = create_canvas(tenant)
    room = open_room(web_server, {"api_key": tenant.key}, rooms)
    assert room.subscribe(canvas["id"])["ok"] is True
    job_id = canvas_job(tenant, canvas["id"], prompt="[[sim ttft=1.5]] slowly")
    wait_until(lambda: "ai_generation_started" in room.names(job_id))
    assert tenant.delete(canvas["links"]["self"]).status_code == 204
    job = tenant.wait_for(job_id)
    assert job["status"] == "succeeded", job["error"]
    wait_until(lambda: "ai_generation_completed" in room.names(job_id))
    completed = room.of("ai_generation_completed")
    assert completed["object_ids"] == [] and completed["generated"] >= 1
    assert "objects_added" not in room.names(job_id)
    assert objects_in_db(canvas["id"]) == []


def finishes_waiting_on_the_canvas(canvas_id: str, claims: list[Any], count: int) -> Any:
    """Starts each claim's finish in a thread while another transaction holds the canvas row,
    so every finish has taken its snapshot before any of them saves; yields that transaction,
    then joins the threads. What they raised is in the returned list."""
    errors: list[BaseException] = []
    app = current_app._get_current_object()  # type: ignore[attr-defined]

    def finish(claim: Any) -> None:
        with app.app_context():
            try:
                finish_with_objects(claim, claim.seq + 1, count=count)
            except BaseException as exc:
                errors.append(exc)

    session = runtime().db.new_session()
    session.begin()
    session.execute(select(Canvas).where(Canvas.id == uuid.UUID(canvas_id)).with_for_update())
    threads = [threading.Thread(target=finish, args=(claim,)) for claim in claims]
    for thread in threads:
        thread.start()
    wait_until(lambda: waiting_on_locks() >= len(claims))
    return session, threads, errors


def waiting_on_locks() -> int:
    """Statements waiting for a lock (the test's finishes: nothing else here takes locks
    long enough to be seen waiting)."""
    query = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE wait_event_type = 'Lock' AND query LIKE '%WITH changed AS%'"
    )
    with runtime().db.transaction() as session:
        return int(session.scalar(query) or 0)


def test_concurrent_finishes_on_one_canvas_stay_within_its_bound(tenant: Tenant) -> None:
    canvas = create_canvas(tenant, objects=[NOTE] * (MAX_OBJECTS - 4))
    claims = [claimed_canvas_job(tenant, canvas["id"]) for _ in range(2)]
    session, threads, errors = finishes_waiting_on_the_canvas(canvas["id"], claims, count=3)
    session.commit()  # both finishes go, one after the other
    session.close()
    for thread in threads:
        thread.join(timeout=10)
    assert errors == []
    with runtime().db.transaction() as check:
        stored = check.get_one(Canvas, uuid.UUID(canvas["id"]))
        count = check.scalar(
            select(func.count()).where(CanvasObject.canvas_id == uuid.UUID(canvas["id"]))
        )
    assert stored.object_count == count == MAX_OBJECTS
    zs = [o.z for o in objects_in_db(canvas["id"])]
    assert len(set(zs)) == len(zs)  # the second job stacked above the first


def test_a_canvas_deleted_under_a_waiting_finish_fails_nothing(tenant: Tenant) -> None:
    canvas = create_canvas(tenant)
    claim = claimed_canvas_job(tenant, canvas["id"])
    session, threads, errors = finishes_waiting_on_the_canvas(canvas["id"], [claim], count=2)
    session.execute(delete(Canvas).where(Canvas.id == uuid.UUID(canvas["id"])))
    session.commit()
    session.close()
    threads[0].join(timeout=10)
    assert errors == []  # no foreign key violation
    assert tenant.get(f"/api/v1/jobs/{claim.job_id}").get_json()["status"] == "succeeded"
    with runtime().db.transaction() as check:
        found = check.scalars(select(CanvasObject).where(CanvasObject.job_id == claim.job_id))
        assert found.all() == []
