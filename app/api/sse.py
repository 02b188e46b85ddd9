"""A job's events as Server-Sent Events, for clients that are not browsers (the `conveyor`
CLI, backends, curl). The same resumable feed as Socket.IO: `id` is the event's seq, so a
client that reconnects with `Last-Event-ID` continues after the last event it saw.

The connection holds no database connection while it waits: it blocks on the job's Redis
Stream (XREAD) and asks PostgreSQL only when the stream cannot prove it holds everything (then
replaying from there) and, every keep-alive period, whether a quiet job has ended.

It ends early, without a terminal event, once `revoked()` says the caller's API key has been
revoked (asked between events and between the slices of every wait).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response

from app.db import Database
from app.jobs import transitions
from app.jobs.events import TERMINAL_EVENT_TYPES, EventBus, replay
from app.jobs.states import TERMINAL

SSE_TYPE = "text/event-stream"
KEEPALIVE_SECONDS = 15.0
RETRY_MS = 1000


def event_stream_response(
    db: Database,
    bus: EventBus,
    owner: str,
    job_id: uuid.UUID,
    after: int,
    revoked: Callable[[], bool],
) -> Response:
    return Response(
        _frames(db, bus, owner, job_id, after, revoked),
        mimetype=SSE_TYPE,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _frame(event: dict[str, Any]) -> str:
    data = json.dumps(event, separators=(",", ":"), default=str)
    return f"id: {event['seq']}\nevent: {event['type']}\ndata: {data}\n\n"


def _frames(
    db: Database,
    bus: EventBus,
    owner: str,
    job_id: uuid.UUID,
    after: int,
    revoked: Callable[[], bool],
) -> Iterator[str]:
    yield f"retry: {RETRY_MS}\n\n"
    while not revoked():
        items = bus.read_stream(job_id, after)
        finished = False
        if items is None:
            with db.transaction() as session:
                try:
                    job = transitions.get_job(session, owner, job_id)
                except transitions.JobNotFound:  # deleted meanwhile
                    return
                items, _source = replay(session, bus, job, after)
                finished = job.status in TERMINAL and job.last_seq <= max(
                    [after, *(item["seq"] for item in items)]
                )
        for item in items:
            yield _frame(item)
            after = item["seq"]
            if item["type"] in TERMINAL_EVENT_TYPES:
                return
        if finished:
            return
        if (
            not items
            and not bus.wait_stream(job_id, after, KEEPALIVE_SECONDS, revoked)
            and not revoked()
        ):
            # Quiet for a whole period: say we are alive, and stop if the job has ended
            # without its last events in the stream (Redis lost them).
            yield ": keep-alive\n\n"
            if _ended(db, owner, job_id, after):
                return


def _ended(db: Database, owner: str, job_id: uuid.UUID, after: int) -> bool:
    with db.transaction() as session:
        try:
            job = transitions.get_job(session, owner, job_id)
        except transitions.JobNotFound:
            return True
        return job.status in TERMINAL and job.last_seq <= after
