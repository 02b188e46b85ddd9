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
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

import redis
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from app import metrics
from app.batching import GroupCommit, WaitTimedOut
from app.config import Settings
from app.jobs.payloads import EventPayload
from app.jobs.states import EPHEMERAL_EVENTS, TERMINAL_EVENTS, EventType
from app.models import Job, JobEvent

logger = logging.getLogger(__name__)

SOCKET_EVENT = "job_event"
SOCKETIO_CHANNEL = "conveyor-socketio"
CANCEL_CHANNEL = "conveyor:cancel"
TERMINAL_EVENT_TYPES = frozenset(str(event_type) for event_type in TERMINAL_EVENTS.values())
# A job's seqs are PostgreSQL `integer`s: a larger `after` could never match, and would
# overflow the query's parameter.
MAX_SEQ = 2**31 - 1


def stream_key(job_id: uuid.UUID | str) -> str:
    return f"conveyor:events:{job_id}"


def job_room(job_id: uuid.UUID | str) -> str:
    return f"job:{job_id}"


def owner_room(owner: str) -> str:
    return f"user:{owner}"


def batch_room(batch_id: uuid.UUID | str) -> str:
    return f"batch:{batch_id}"


def canvas_room(canvas_id: uuid.UUID | str) -> str:
    """Everyone allowed on the canvas (its owner's connections) who subscribed to it."""
    return f"canvas:{canvas_id}"


@dataclass(frozen=True)
class Event:
    """One event of one job. Its `data` comes from its payload model (payloads.py), which also
    says its type: no publisher writes a payload dict by hand."""

    job_id: uuid.UUID
    owner: str
    seq: int
    payload: EventPayload
    at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # The job's batch, if any: its room gets the job's state changes (not its token deltas).
    batch_id: uuid.UUID | None = None

    @property
    def type(self) -> EventType:
        return self.payload.event_type

    @cached_property
    def data(self) -> dict[str, Any]:
        # Cached: a state change writes it to PostgreSQL and then to Redis.
        return self.payload.as_data()

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


# Appends each event to its job's stream and, only if the stream accepted its seq, publishes it
# to Socket.IO: one round trip for a whole batch, and a fenced-off worker's stale seq reaches
# nobody. KEYS: one stream per event. ARGV: maxlen, channel, then (seq, envelope, ttl, message)
# per event. Returns 1 or 0 per event.
_APPEND_AND_EMIT = """
local accepted = {}
for i, key in ipairs(KEYS) do
  local at = 2 + (i - 1) * 4
  local added = redis.pcall('XADD', key, 'MAXLEN', '~', ARGV[1], '0-' .. ARGV[at + 1], 'e',
                            ARGV[at + 2])
  if type(added) == 'table' and added.err then
    accepted[i] = 0
  else
    if ARGV[at + 3] ~= '0' then redis.call('EXPIRE', key, ARGV[at + 3]) end
    redis.call('PUBLISH', ARGV[2], ARGV[at + 4])
    accepted[i] = 1
  end
end
return accepted
"""

# The most events sent as one script call; a longer queue goes out in several.
MAX_BATCH = 500
# How long a caller of `publish` waits for its batch before reporting failure. Redis calls time
# out sooner (the client's socket timeout); this bounds a stall of the publisher itself.
PUBLISH_WAIT_SECONDS = 5.0


@dataclass(eq=False)
class _Submission:
    events: list[Event]
    on_refused: Callable[[Event], None] | None = None


class EventBus:
    """Publishes committed events to the live feed. Best effort by design: a Redis outage must
    not fail a state change that PostgreSQL already committed; readers fall back to PostgreSQL.

    Every event of a process goes through one group commit (app/batching.py): a worker with
    hundreds of streaming jobs makes one script call for all the events that gathered instead
    of one per token delta, which was a third of its CPU (docs/performance.md). One queue also
    keeps each job's events in seq order, which the stream requires. `publish` waits until its
    events are in Redis, as a state change's event must be visible when the change returns;
    `publish_later` (token deltas) does not.

    Socket.IO messages are written in python-socketio's message-queue format (what
    `SocketIO(message_queue=...).emit()` publishes) by the same script that appends the event
    to its stream, rather than through a second round trip of the write-only emitter."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self._settings = settings
        self._redis = client
        self._append_and_emit = client.register_script(_APPEND_AND_EMIT)
        self._host_id = uuid.uuid4().hex
        self._publisher: GroupCommit[_Submission, bool] = GroupCommit(
            "event-publisher",
            self._publish_batch,
            max_batch=MAX_BATCH,
            weight=lambda submission: len(submission.events),
        )

    def publish(self, events: list[Event]) -> bool:
        """Returns once the events are published: False when the stream refused one (a stale
        seq) or Redis failed."""
        if len(events) > MAX_BATCH:
            # A batch's thousands of events as several script calls: one call with them all
            # would hold Redis (which runs a script alone) for tens of milliseconds.
            chunks = [events[i : i + MAX_BATCH] for i in range(0, len(events), MAX_BATCH)]
            return all([self.publish(chunk) for chunk in chunks])
        if not events:
            return True
        try:
            return self._publisher.call(_Submission(events), PUBLISH_WAIT_SECONDS)
        except WaitTimedOut:
            logger.warning("event publish timed out", extra={"job_id": events[0].job_id})
            return False

    def publish_later(self, events: list[Event], on_refused: Callable[[Event], None]) -> None:
        """Queues events behind every earlier one of this process; `on_refused` is called (on
        the publisher thread) for each event the stream did not accept."""
        self._publisher.call_later(_Submission(events, on_refused))

    def _publish_batch(self, batch: list[_Submission]) -> list[bool]:
        events = [event for submission in batch for event in submission.events]
        try:
            accepted = [bool(flag) for flag in self._append_and_emit(*self._script_args(events))]
        except redis.RedisError as exc:
            logger.warning("event publish failed: %s", exc, extra={"job_id": events[0].job_id})
            accepted = [False] * len(events)
        metrics.events_published(
            str(event.type) for event, ok in zip(events, accepted, strict=True) if ok
        )
        results, position = [], 0
        for submission in batch:
            flags = accepted[position : position + len(submission.events)]
            position += len(submission.events)
            results.append(all(flags))
            if submission.on_refused is not None:
                for event, ok in zip(submission.events, flags, strict=True):
                    if not ok:
                        submission.on_refused(event)
        return results

    def _script_args(self, events: list[Event]) -> tuple[list[str], list[object]]:
        keys: list[str] = []
        args: list[object] = [self._settings.event_stream_maxlen, SOCKETIO_CHANNEL]
        for event in events:
            envelope = json.dumps(event.envelope(), separators=(",", ":"))
            durable = event.type not in EPHEMERAL_EVENTS
            rooms = [job_room(event.job_id)]
            if durable:
                rooms.append(owner_room(event.owner))
                if event.batch_id is not None:
                    rooms.append(batch_room(event.batch_id))
            keys.append(stream_key(event.job_id))
            # The TTL is refreshed by durable events only; a job's deltas sit between them.
            args += [
                event.seq,
                envelope,
                self._settings.event_stream_ttl if durable else 0,
                self._socketio_message(envelope, rooms),
            ]
        return keys, args

    def broadcast(self, rooms: list[str], event: str, data: dict[str, Any]) -> None:
        """A Socket.IO message outside any job's timeline (no seq, no stream, no replay): for
        rooms that follow something other than a job, such as a canvas. Best effort, like
        every live message; the resource itself (GET) is the durable truth."""
        message = self._socketio_message(json.dumps(data, separators=(",", ":")), rooms, event)
        try:
            self._redis.publish(SOCKETIO_CHANNEL, message)
        except redis.RedisError as exc:
            logger.warning("broadcast of %s failed: %s", event, exc)

    def _socketio_message(self, envelope: str, rooms: list[str], event: str = SOCKET_EVENT) -> str:
        # The envelope is already JSON: spliced in rather than encoded a second time.
        return (
            f'{{"method":"emit","event":{json.dumps(event)},"data":[{envelope}],"binary":false,'
            f'"namespace":"/","room":{json.dumps(rooms)},"skip_sid":null,"callback":null,'
            f'"host_id":"{self._host_id}"}}'
        )

    # Reading ----------------------------------------------------------------------------------

    def read_stream(self, job_id: uuid.UUID, after: int, count: int = 1000) -> list[dict] | None:
        """Events newer than `after` from the stream, or None when the stream cannot prove it
        holds all of them: expired, trimmed, Redis unavailable, or a hole in it (a worker
        killed between its commit and its publish, or a publish lost to a Redis outage,
        leaves one: the event is in PostgreSQL only)."""
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
        seqs = [_seq_of(entry_id) for entry_id, _fields in entries]
        if seqs and (seqs[0] > after + 1 or seqs[-1] - seqs[0] != len(seqs) - 1):
            return None
        return [json.loads(fields[b"e"]) for _id, fields in entries]

    def wait_stream(
        self,
        job_id: uuid.UUID,
        after: int,
        timeout: float,
        stop: Callable[[], bool] | None = None,
    ) -> bool:
        """Blocks until the stream has an entry newer than `after` (True) or the timeout passes,
        Redis fails or `stop()` turns true (False).

        Blocks in slices shorter than the client's socket timeout, which stays short so that
        every other Redis call fails fast when Redis stalls; `stop` is asked before each."""
        deadline = time.monotonic() + timeout
        key = stream_key(job_id)
        while (remaining := deadline - time.monotonic()) > 0:
            if stop is not None and stop():
                return False
            block_ms = max(1, int(min(remaining, 1.5) * 1000))
            try:
                if self._redis.xread({key: f"0-{after}"}, count=1, block=block_ms):
                    return True
            except redis.RedisError as exc:
                logger.warning("event stream wait failed: %s", exc, extra={"job_id": job_id})
                return False
        return False

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

    def delete_streams(self, job_ids: list[uuid.UUID]) -> None:
        """`delete_stream` for many jobs (the retention purge's), in one pipeline; UNLINK frees
        the memory in Redis's background thread."""
        try:
            pipe = self._redis.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.unlink(stream_key(job_id))
            pipe.execute()
        except redis.RedisError as exc:
            # They expire anyway, CONVEYOR_EVENT_STREAM_TTL after their job's last event.
            logger.warning("event streams delete failed: %s", exc)

    def signal_cancel(self, job_id: uuid.UUID) -> None:
        """Tells the worker running the job to stop now; the heartbeat is the fallback."""
        try:
            self._redis.publish(CANCEL_CHANNEL, str(job_id))
        except redis.RedisError as exc:
            logger.warning("cancel signal failed: %s", exc, extra={"job_id": job_id})

    def signal_cancels(self, job_ids: list[uuid.UUID]) -> None:
        """`signal_cancel` for many jobs (a batch), in one pipeline."""
        if not job_ids:
            return
        try:
            pipe = self._redis.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.publish(CANCEL_CHANNEL, str(job_id))
            pipe.execute()
        except redis.RedisError as exc:
            logger.warning("cancel signal of %d jobs failed: %s", len(job_ids), exc)


def replay(
    session: Session, bus: EventBus, job: Job, after: int, limit: int = 1000
) -> tuple[list[dict[str, Any]], str]:
    """A job's events with seq > `after`, oldest first, and where they came from.

    From the Redis Stream while it holds every one of them (token deltas included); otherwise
    from PostgreSQL, which has no deltas: there the seqs have holes where the deltas were, so
    each event names the one before it in `prev` (the first names `after`), and the terminal
    event carries the stored output, which stands in for the deltas that expired with the
    stream."""
    items = bus.read_stream(job.id, after, limit)
    if items is not None:
        return items, "stream"
    rows = session.scalars(
        select(JobEvent)
        .where(JobEvent.job_id == job.id, JobEvent.seq > after)
        .order_by(JobEvent.seq)
        .limit(limit)
    )
    items, prev = [], after
    for row in rows:
        items.append(
            {
                "job_id": str(row.job_id),
                "seq": row.seq,
                "prev": prev,
                "type": row.type,
                "at": row.at.isoformat(),
                "data": row.data,
            }
        )
        prev = row.seq
    if items and items[-1]["type"] in TERMINAL_EVENT_TYPES and job.output is not None:
        items[-1]["data"] = {**items[-1]["data"], "output": job.output}
    return items, "database"


def _seq_of(stream_id: bytes | str) -> int:
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    return int(text.partition("-")[2])
