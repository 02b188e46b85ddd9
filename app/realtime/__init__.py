"""The Socket.IO server: browsers watch their jobs live and resume after a disconnect.

Runs in the web process (gunicorn's gevent worker; `threading` mode elsewhere, e.g. in tests).
Workers never talk to it directly: their events reach it on the Redis channel of the message
queue (app/jobs/events.py writes them in the format `SocketIO(message_queue=...)` uses), and
every web process relays them to its own clients' rooms.

WebSocket only, no long-polling transport: a WebSocket is one connection held by one gunicorn
worker, so several workers need no sticky sessions. A browser that cannot open one falls back
to polling the REST API (docs/events.md).

Protocol (docs/events.md):
- connect with `auth={"token": …}` (a subscription token from `POST /api/v1/realtime/token`)
  or `auth={"api_key": …}`; anything else is refused;
- `subscribe {job_id, after_seq}` joins the job's room, then replays what is newer than
  `after_seq`; live events follow. The client drops duplicates by `seq`;
- a connection that is not scoped to one job or batch is also in its owner's room and sees
  every one of its jobs change state (all events but token deltas);
- `subscribe {batch_id}` joins the batch's room, which gets every state change of the batch's
  jobs (all their events but token deltas); the ack carries the batch's counts by status at
  the moment of joining, so that a client counting the events that follow misses none;
- `subscribe {canvas_id}` joins the canvas's room, which hears its canvas jobs' notices and
  saved objects (app/jobs/canvases.py); only connections of the canvas's owner that are not
  limited to one job or batch may open it;
- when the API key behind a connection (directly, or as the minter of its token) is revoked,
  the server disconnects it within seconds (app/keys/watch.py).
"""

from __future__ import annotations

import logging
import uuid
from functools import partial
from typing import Any

from flask import Flask, request
from flask_socketio import ConnectionRefusedError, SocketIO, join_room, leave_room
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from app import metrics
from app.config import Settings
from app.db import Database
from app.jobs import batches, canvases, transitions
from app.jobs.events import (
    MAX_SEQ,
    SOCKET_EVENT,
    SOCKETIO_CHANNEL,
    batch_room,
    canvas_room,
    job_room,
    owner_room,
    replay,
)
from app.keys import watch
from app.keys.api_keys import JOBS_READ, Principal, principal_for_key
from app.keys.tokens import TokenError, read_token
from app.runtime import runtime

logger = logging.getLogger(__name__)

socketio = SocketIO()
# sid -> what its key holds open, for this process's connections.
_grants: dict[str, watch.Grant] = {}


def async_mode() -> str:
    """gevent where gevent has patched the process (gunicorn's gevent worker), else threads."""
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return "threading"
    return "gevent" if monkey.is_module_patched("socket") else "threading"


def init_app(app: Flask, settings: Settings, db: Database) -> None:
    socketio.init_app(
        app,
        message_queue=settings.redis_url,
        channel=SOCKETIO_CHANNEL,
        # None is same-origin only; "*" is never a default.
        cors_allowed_origins=settings.allowed_origins or None,
        async_mode=async_mode(),
        transports=["websocket"],
        manage_session=False,
    )
    watch.init_app(app, db, socketio.start_background_task, socketio.sleep)


def _principal(auth: Any) -> tuple[Principal, uuid.UUID | None, uuid.UUID | None]:
    """Who connects, and the one job or batch a scoped token limits them to."""
    auth = auth if isinstance(auth, dict) else {}
    if isinstance(token := auth.get("token"), str):
        claims = read_token(runtime().settings, runtime().db, token)
        return claims.principal, claims.job_id, claims.batch_id
    key = auth.get("api_key")
    if not isinstance(key, str):
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        key = key if scheme.lower() == "bearer" else None
    if key and (principal := principal_for_key(runtime().db, key.strip())) is not None:
        return principal, None, None
    raise ConnectionRefusedError("unauthorized: send a subscription token or an API key")


def _reader(auth: Any) -> tuple[Principal, uuid.UUID | None, uuid.UUID | None]:
    """`_principal`, if it may read jobs' events."""
    principal, only_job, only_batch = _principal(auth)
    if JOBS_READ not in principal.scopes:
        raise ConnectionRefusedError(f"forbidden: the API key lacks the {JOBS_READ!r} scope")
    return principal, only_job, only_batch


@socketio.on("connect")
def on_connect(auth: Any = None) -> None:
    try:
        principal, only_job, only_batch = _reader(auth)
    except TokenError as exc:
        raise ConnectionRefusedError(f"unauthorized: {exc}") from None
    except (OperationalError, PoolTimeout) as exc:
        # The key could not be checked: refuse with a reason the client can act on (retry),
        # not an unexplained error.
        logger.warning("connect refused, database unavailable: %s", exc)
        raise ConnectionRefusedError("unavailable: try again shortly") from None
    sid = request.sid  # type: ignore[attr-defined]
    session = {"owner": principal.owner, "only_job": only_job, "only_batch": only_batch}
    socketio.server.save_session(sid, session)
    if only_job is None and only_batch is None:
        join_room(owner_room(principal.owner))
    key_watch = watch.key_watch()
    _grants[sid] = key_watch.watch(principal.key_id, partial(_disconnect_revoked, sid))
    metrics.socketio_connected()


@socketio.on("disconnect")
def on_disconnect(reason: Any = None) -> None:
    grant = _grants.pop(request.sid, None)  # type: ignore[attr-defined]
    if grant is not None:
        # Only a connection `on_connect` accepted holds a grant, and only it was counted.
        metrics.socketio_disconnected()
        watch.key_watch().forget(grant)


def _disconnect_revoked(sid: str) -> None:
    logger.info("disconnecting %s: its API key has been revoked or has expired", sid)
    socketio.server.disconnect(sid)


@socketio.on("subscribe")
def on_subscribe(data: Any = None) -> dict[str, Any]:
    """Joins the job's room, then replays what the client missed; the ack says how it went."""
    session = socketio.server.get_session(request.sid)  # type: ignore[attr-defined]
    data = data if isinstance(data, dict) else {}
    if "batch_id" in data:
        return _subscribe_batch(session, data["batch_id"])
    if "canvas_id" in data:
        return _subscribe_canvas(session, data["canvas_id"])
    try:
        job_id = uuid.UUID(str(data.get("job_id")))
        after = int(data.get("after_seq") or 0)
    except (TypeError, ValueError):
        return {"ok": False, "error": "bad-request", "detail": "send {job_id, after_seq}"}
    if not 0 <= after <= MAX_SEQ:
        return {
            "ok": False,
            "error": "bad-request",
            "detail": f"after_seq must be from 0 to {MAX_SEQ}",
        }
    if session["only_job"] not in (None, job_id) or session["only_batch"] is not None:
        return _not_found(job_id)
    db, bus = runtime().db, runtime().bus
    try:
        with db.transaction() as tx:
            try:
                job = transitions.get_job(tx, session["owner"], job_id)
            except transitions.JobNotFound:
                return _not_found(job_id)
            # Join first, then read: an event published in between arrives twice (the client
            # drops it by seq) rather than not at all.
            join_room(job_room(job_id))
            items, source = replay(tx, bus, job, after)
            status, last_seq = job.status, job.last_seq
    except OperationalError as exc:
        logger.warning("subscribe failed, database unavailable: %s", exc)
        return {"ok": False, "error": "unavailable", "detail": "try again shortly"}
    for item in items:
        socketio.emit(SOCKET_EVENT, item, to=request.sid)  # type: ignore[attr-defined]
    return {
        "ok": True,
        "job_id": str(job_id),
        "status": status,
        "replayed": len(items),
        "source": source,
        "last_seq": max([last_seq, *(item["seq"] for item in items)]),
    }


def _subscribe_batch(session: dict[str, Any], raw_id: Any) -> dict[str, Any]:
    """Joins the batch's room; the ack has its counts by status as of the join."""
    try:
        batch_id = uuid.UUID(str(raw_id))
    except ValueError:
        return {"ok": False, "error": "bad-request", "detail": "send {batch_id}"}
    if session["only_job"] is not None or session["only_batch"] not in (None, batch_id):
        # A token limited to one job opens no batch (not even the job's own).
        return _batch_not_found(batch_id)
    try:
        with runtime().db.transaction() as tx:
            try:
                batches.get_batch(tx, session["owner"], batch_id)
            except batches.BatchNotFound:
                return _batch_not_found(batch_id)
            # Join first, then count: an event published in between is counted and also
            # arrives, rather than neither.
            join_room(batch_room(batch_id))
            summary = batches.summaries(tx, [batch_id])[batch_id]
    except OperationalError as exc:
        logger.warning("subscribe failed, database unavailable: %s", exc)
        return {"ok": False, "error": "unavailable", "detail": "try again shortly"}
    return {
        "ok": True,
        "batch_id": str(batch_id),
        "counts": {status.value: count for status, count in summary.counts.items()},
        "done": summary.finished == summary.total,
    }


def _subscribe_canvas(session: dict[str, Any], raw_id: Any) -> dict[str, Any]:
    """Joins the canvas's room: its owner's connections only, and none limited to a job or a
    batch (such a token opens what it names, nothing else)."""
    try:
        canvas_id = uuid.UUID(str(raw_id))
    except ValueError:
        return {"ok": False, "error": "bad-request", "detail": "send {canvas_id}"}
    not_found = {"ok": False, "error": "not-found", "detail": f"no canvas {canvas_id}"}
    if session["only_job"] is not None or session["only_batch"] is not None:
        return not_found
    try:
        with runtime().db.transaction() as tx:
            try:
                canvas = canvases.get_canvas(tx, session["owner"], canvas_id)
            except canvases.CanvasNotFound:
                return not_found
            join_room(canvas_room(canvas_id))
            count = canvas.object_count
    except OperationalError as exc:
        logger.warning("subscribe failed, database unavailable: %s", exc)
        return {"ok": False, "error": "unavailable", "detail": "try again shortly"}
    return {"ok": True, "canvas_id": str(canvas_id), "object_count": count}


_ROOMS = {"batch_id": batch_room, "canvas_id": canvas_room}


@socketio.on("unsubscribe")
def on_unsubscribe(data: Any = None) -> dict[str, Any]:
    data = data if isinstance(data, dict) else {}
    name = next((name for name in _ROOMS if name in data), "job_id")
    room = _ROOMS.get(name, job_room)
    try:
        resource_id = uuid.UUID(str(data.get(name)))
    except ValueError:
        return {
            "ok": False,
            "error": "bad-request",
            "detail": "send {job_id}, {batch_id} or {canvas_id}",
        }
    leave_room(room(resource_id))
    return {"ok": True}


def _not_found(job_id: uuid.UUID) -> dict[str, Any]:
    # Another owner's job is refused exactly like a missing one.
    return {"ok": False, "error": "not-found", "detail": f"no job {job_id}"}


def _batch_not_found(batch_id: uuid.UUID) -> dict[str, Any]:
    return {"ok": False, "error": "not-found", "detail": f"no batch {batch_id}"}
