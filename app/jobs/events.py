"""Job events: the envelope, the durable row, and the live feed (Redis Stream + Socket.IO).

PostgreSQL (`job_events`) is the durable timeline. Each job also has a Redis Stream whose entry
ids are `0-<seq>`, so a resume is one `XRANGE (0-<after> +` and Redis itself refuses an event
whose seq is not newer than the last one (a fenced-off worker cannot interleave old seqs).
Socket.IO messages go out on the Redis channel a Flask-SocketIO server listens to, in the
format its write-only emitter uses, so any process may emit and the web process relays them.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis
from sqlalchemy import insert
from sqlalchemy.orm import Session

from app.config import Settings
from app.jobs.states import EPHEMERAL_EVENTS, EventType
from app.models import JobEvent

logger = logging.getLogger(__name__)

SOCKET_EVENT = "job_event"
SOCKETIO_CHANNEL = "conveyor-socketio"
CANCEL_CHANNEL = "conveyor:cancel"


def stream_key(job_id: uuid.UUID | str) -> str:
    return f"conveyor:events:{job_id}"


def job_room(job_id: uuid.UUID | str) -> str:
    return f"job:{job_id}"


def owner_room(owner: str) -> str:
    return f"user:{owner}"


@dataclass(frozen=True)
class Event:
    job_id: uuid.UUID
    owner: str
    seq: int
    type: EventType
    data: dict[str, Any] = field(default_factory=dict)
    at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def envelope(self) -> dict[str, Any]:
        return {
            "job_id": str(self.job_id),
            "seq": self.seq,
            "type": str(self.type),
            "at": self.at.isoformat(),
            "data": self.data,
        }


def record_event(session: Session, event: Event) -> Event:
    """Append a durable event in the caller's transaction (deltas are never stored here)."""
    assert event.type not in EPHEMERAL_EVENTS, "token deltas are not stored in PostgreSQL"
    session.execute(
        insert(JobEvent).values(
            job_id=event.job_id, seq=event.seq, type=str(event.type), at=event.at, data=event.data
        )
    )
    return event


# Appends one event to its job's stream and, only if the stream accepted its seq, publishes it
# to Socket.IO: one round trip, and a fenced-off worker's stale seq reaches nobody.
_APPEND_AND_EMIT = """
local added = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '0-' .. ARGV[1], 'e', ARGV[2])
if type(added) == 'table' and added.err then return 0 end
if ARGV[4] ~= '0' then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
"""


class EventBus:
    """Publishes committed events to the live feed. Best effort by design: a Redis outage must
    not fail a state change that PostgreSQL already committed; readers fall back to PostgreSQL.

    Socket.IO messages are written in python-socketio's message-queue format (what
    `SocketIO(message_queue=...).emit()` publishes) by the same Redis script that appends the
    event to its stream, rather than through a second round trip of the write-only emitter:
    token deltas are the hottest path of a worker (docs/performance.md)."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self._settings = settings
        self._redis = client
        self._append_and_emit = client.register_script(_APPEND_AND_EMIT)
        self._host_id = uuid.uuid4().hex

    def publish(self, events: list[Event]) -> bool:
        """Returns False when the stream refused an event (a stale seq) or Redis failed."""
        if not events:
            return True
        try:
            if len(events) == 1:
                return bool(self._send(events[0], self._redis))
            pipe = self._redis.pipeline(transaction=False)
            for event in events:
                self._send(event, pipe)
            return all(pipe.execute())
        except redis.RedisError as exc:
            logger.warning("event publish failed: %s", exc, extra={"job_id": events[0].job_id})
            return False

    def _send(self, event: Event, client: redis.Redis | redis.client.Pipeline) -> object:
        envelope = event.envelope()
        durable = event.type not in EPHEMERAL_EVENTS
        rooms = [job_room(event.job_id)]
        if durable:
            rooms.append(owner_room(event.owner))
        message = {
            "method": "emit",
            "event": SOCKET_EVENT,
            "data": [envelope],
            "binary": False,
            "namespace": "/",
            "room": rooms,
            "skip_sid": None,
            "callback": None,
            "host_id": self._host_id,
        }
        return self._append_and_emit(
            keys=[stream_key(event.job_id)],
            args=[
                event.seq,
                json.dumps(envelope, separators=(",", ":")),
                self._settings.event_stream_maxlen,
                # The TTL is refreshed by durable events only; a job's deltas sit between them.
                self._settings.event_stream_ttl if durable else 0,
                SOCKETIO_CHANNEL,
                json.dumps(message, separators=(",", ":")),
            ],
            client=client,
        )

    # Reading ----------------------------------------------------------------------------------

    def read_stream(self, job_id: uuid.UUID, after: int, count: int = 1000) -> list[dict] | None:
        """Events newer than `after` from the stream, or None when the stream cannot prove it
        holds all of them (expired, trimmed, or Redis unavailable)."""
        key = stream_key(job_id)
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.xrange(key, "-", "+", count=1)
            pipe.xrange(key, f"(0-{after}", "+", count=count)
            first, entries = pipe.execute()
        except redis.RedisError as exc:
            logger.warning("event stream read failed: %s", exc, extra={"job_id": job_id})
            return None
        if not first or _seq_of(first[0][0]) > after + 1:
            return None
        return [json.loads(fields[b"e"]) for _id, fields in entries]

    def wait_stream(self, job_id: uuid.UUID, after: int, timeout: float) -> None:
        """Blocks until the stream has an entry newer than `after` or the timeout passes.

        Blocks in slices shorter than the client's socket timeout, which stays short so that
        every other Redis call fails fast when Redis stalls."""
        deadline = time.monotonic() + timeout
        key = stream_key(job_id)
        while (remaining := deadline - time.monotonic()) > 0:
            block_ms = max(1, int(min(remaining, 1.5) * 1000))
            try:
                if self._redis.xread({key: f"0-{after}"}, count=1, block=block_ms):
                    return
            except redis.RedisError as exc:
                logger.warning("event stream wait failed: %s", exc, extra={"job_id": job_id})
                return

    def stream_tail_seq(self, job_id: uuid.UUID) -> int:
        """The newest seq in the job's stream (0 when empty or unreadable)."""
        try:
            last = self._redis.xrevrange(stream_key(job_id), "+", "-", count=1)
        except redis.RedisError:
            return 0
        return _seq_of(last[0][0]) if last else 0

    def delete_stream(self, job_id: uuid.UUID) -> None:
        try:
            self._redis.delete(stream_key(job_id))
        except redis.RedisError as exc:
            logger.warning("event stream delete failed: %s", exc, extra={"job_id": job_id})

    def signal_cancel(self, job_id: uuid.UUID) -> None:
        """Tells the worker running the job to stop now; the heartbeat is the fallback."""
        try:
            self._redis.publish(CANCEL_CHANNEL, str(job_id))
        except redis.RedisError as exc:
            logger.warning("cancel signal failed: %s", exc, extra={"job_id": job_id})


def _seq_of(stream_id: bytes | str) -> int:
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    return int(text.partition("-")[2])
