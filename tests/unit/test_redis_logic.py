"""The Redis side of Conveyor on fakeredis, Lua scripts included (lupa): the event script and the
job streams it writes, reading them back, the Socket.IO messages it publishes, cancel signals,
and the presence records of workers and the sweeper. No PostgreSQL, no app server: every test
gets a Redis of its own, in memory.

fakeredis cannot stand in for a stalled Redis (it accepts CLIENT PAUSE and pauses nothing) nor
for socket timeouts (it has no socket). The cases that need either are marked `real_redis` with
the reason: skipped here, and run on a real Redis by tests/integration/test_redis_logic.py.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import fakeredis
import pytest
import redis
import socketio

from app import config
from app.api.health import HealthMonitor
from app.execution.leases import ActiveJobs
from app.jobs import presence
from app.jobs.events import (
    CANCEL_CHANNEL,
    PUBLISH_WAIT_SECONDS,
    SOCKET_EVENT,
    SOCKETIO_CHANNEL,
    Event,
    EventBus,
    replay,
    stream_key,
)
from app.jobs.events import (
    MAX_BATCH as PUBLISH_MAX_BATCH,
)
from app.jobs.presence import SweepRecord, WorkerBeat, WorkerIdentity
from app.jobs.states import EventType
from app.jobs.transitions import SweepReport

OWNER = "owner-a"


@pytest.fixture
def fake_server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def redis_client(
    request: pytest.FixtureRequest, fake_server: fakeredis.FakeServer
) -> Iterator[redis.Redis]:
    marker = request.node.get_closest_marker("real_redis")
    if marker is not None:
        pytest.skip(marker.kwargs["reason"])
    client = fakeredis.FakeRedis(server=fake_server)
    yield client
    client.close()


@pytest.fixture
def bus(redis_client: redis.Redis) -> EventBus:
    return EventBus(config.testing_settings(), redis_client)


@dataclass(frozen=True)
class RawPayload:
    """A payload of any shape: what these tests check is the Redis side, which carries `data`
    as it is given (the payload models have their own tests: test_payloads.py)."""

    event_type: EventType
    fields: dict[str, Any]

    def as_data(self) -> dict[str, Any]:
        return dict(self.fields)


def event(
    job_id: uuid.UUID, seq: int, event_type: EventType = EventType.PROGRESS, **data: Any
) -> Event:
    return Event(job_id, OWNER, seq, RawPayload(event_type, data))  # type: ignore[arg-type]


def seqs_in_stream(client: redis.Redis, job_id: uuid.UUID) -> list[int]:
    return [int(entry_id.split(b"-")[1]) for entry_id, _ in client.xrange(stream_key(job_id))]


class Subscriber:
    """One channel's messages, as a Redis subscriber sees them."""

    def __init__(self, client: redis.Redis, channel: str) -> None:
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(channel)
        assert self._pubsub.get_message(timeout=1.0) is None  # the subscription's own notice

    def received(self) -> list[bytes]:
        found = []
        while (message := self._pubsub.get_message(timeout=0.05)) is not None:
            found.append(message["data"])
        return found


def wait_for(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# The event script: one stream per job, entry ids 0-<seq> --------------------------------------


def test_events_are_appended_to_their_jobs_stream_under_their_seq(
    bus: EventBus, redis_client: redis.Redis
) -> None:
    job_id = uuid.uuid4()
    first, second = event(job_id, 1, EventType.QUEUED), event(job_id, 2, EventType.STARTED)
    assert bus.publish([first, second]) is True
    entries = redis_client.xrange(stream_key(job_id))
    assert [entry_id for entry_id, _ in entries] == [b"0-1", b"0-2"]
    assert [json.loads(fields[b"e"]) for _, fields in entries] == [
        first.envelope(),
        second.envelope(),
    ]


def test_a_seq_not_newer_than_the_streams_last_is_refused_and_reaches_nobody(
    bus: EventBus, redis_client: redis.Redis
) -> None:
    job_id = uuid.uuid4()
    assert bus.publish([event(job_id, seq) for seq in (1, 2, 3)])
    socketio_channel = Subscriber(redis_client, SOCKETIO_CHANNEL)
    assert bus.publish([event(job_id, 3, note="again")]) is False
    assert bus.publish([event(job_id, 2, note="older")]) is False
    assert seqs_in_stream(redis_client, job_id) == [1, 2, 3]
    ((_, last),) = redis_client.xrevrange(stream_key(job_id), count=1)
    assert json.loads(last[b"e"])["data"] == {}  # the first seq 3, not the refused one
    assert socketio_channel.received() == []


def test_in_one_batch_only_the_stale_event_is_refused(
    bus: EventBus, redis_client: redis.Redis
) -> None:
    fenced, other = uuid.uuid4(), uuid.uuid4()
    assert bus.publish([event(fenced, 5)])
    socketio_channel = Subscriber(redis_client, SOCKETIO_CHANNEL)
    assert bus.publish([event(fenced, 4), event(other, 1), event(fenced, 6)]) is False
    assert seqs_in_stream(redis_client, fenced) == [5, 6]
    assert seqs_in_stream(redis_client, other) == [1]
    emitted = [json.loads(raw)["data"][0] for raw in socketio_channel.received()]
    assert [(e["job_id"], e["seq"]) for e in emitted] == [(str(other), 1), (str(fenced), 6)]


def test_a_refused_delta_is_handed_back_and_the_stream_shows_a_newer_writer(
    bus: EventBus,
) -> None:
    """What JobContext does with a refused delta: a stream tail past it means another attempt
    owns the job now, and this one must stop."""
    job_id = uuid.uuid4()
    assert bus.publish([event(job_id, seq) for seq in range(1, 8)])  # the newer attempt's
    refused: list[Event] = []
    stale = event(job_id, 5, EventType.OUTPUT_DELTA, text="late")
    fresh = event(job_id, 8, EventType.OUTPUT_DELTA, text="next")
    bus.publish_later([stale, fresh], on_refused=refused.append)
    assert bus.publish([event(job_id, 9)])  # queued behind them: they are done when it is
    assert refused == [stale]
    assert bus.stream_tail_seq(job_id) == 9


def test_stream_tail_seq_is_the_newest_seq_and_zero_without_a_stream(bus: EventBus) -> None:
    job_id = uuid.uuid4()
    assert bus.stream_tail_seq(job_id) == 0
    assert bus.publish([event(job_id, 3), event(job_id, 17)])
    assert bus.stream_tail_seq(job_id) == 17


def test_the_stream_ttl_is_set_by_durable_events_and_left_alone_by_deltas(
    bus: EventBus, redis_client: redis.Redis
) -> None:
    job_id = uuid.uuid4()
    key = stream_key(job_id)
    assert bus.publish([event(job_id, 1, EventType.QUEUED)])
    assert redis_client.ttl(key) == config.testing_settings().event_stream_ttl == 86_400
    redis_client.pexpire(key, 5_000)
    assert bus.publish([event(job_id, 2, EventType.OUTPUT_DELTA, text="a")])
    assert 0 < redis_client.pttl(key) <= 5_000
    assert bus.publish([event(job_id, 3, EventType.LOG, message="x")])
    assert redis_client.ttl(key) == 86_400


def test_a_long_stream_is_trimmed_to_about_maxlen_keeping_the_newest(
    redis_client: redis.Redis,
) -> None:
    bus = EventBus(config.testing_settings(event_stream_maxlen=100), redis_client)
    job_id = uuid.uuid4()
    for first in range(1, 401, 50):
        batch = [
            event(job_id, seq, EventType.OUTPUT_DELTA, text="tok")
            for seq in range(first, first + 50)
        ]
        assert bus.publish(batch)
    seqs = seqs_in_stream(redis_client, job_id)
    # `MAXLEN ~` drops whole stream nodes only: at least 100 stay, fewer than 400.
    assert 100 <= len(seqs) < 400
    assert seqs == list(range(401 - len(seqs), 401))
    assert bus.read_stream(job_id, 0) is None  # the start is gone: readers go to PostgreSQL
    tail = bus.read_stream(job_id, 300)
    assert tail is not None and [item["seq"] for item in tail] == list(range(301, 401))


def test_an_expired_stream_is_not_read_and_a_new_one_starts_with_the_next_event(
    bus: EventBus, redis_client: redis.Redis
) -> None:
    job_id = uuid.uuid4()
    assert bus.publish([event(job_id, seq) for seq in (1, 2, 3)])
    redis_client.pexpire(stream_key(job_id), 30)
    time.sleep(0.08)
    assert redis_client.exists(stream_key(job_id)) == 0
    assert bus.read_stream(job_id, 0) is None
    assert bus.stream_tail_seq(job_id) == 0
    assert bus.publish([event(job_id, 4, EventType.SUCCEEDED)])
    assert bus.read_stream(job_id, 0) is None  # 1 to 3 are in PostgreSQL only
    tail = bus.read_stream(job_id, 3)
    assert tail is not None and [item["seq"] for item in tail] == [4]


def test_delete_stream_removes_the_jobs_stream(bus: EventBus, redis_client: redis.Redis) -> None:
    job_id, kept = uuid.uuid4(), uuid.uuid4()
    assert bus.publish([event(job_id, 1), event(kept, 1)])
    bus.delete_stream(job_id)
    assert redis_client.exists(stream_key(job_id)) == 0
    assert redis_client.exists(stream_key(kept)) == 1


# Reading back: replay after a seq, and waiting for the next event -------------------------------


def test_read_stream_returns_the_events_after_a_seq_oldest_first(bus: EventBus) -> None:
    job_id = uuid.uuid4()
    published = [event(job_id, seq, n=seq) for seq in range(1, 6)]
    assert bus.publish(published)
    assert bus.read_stream(job_id, 0) == [e.envelope() for e in published]
    assert bus.read_stream(job_id, 2) == [e.envelope() for e in published[2:]]
    assert bus.read_stream(job_id, 2, count=2) == [e.envelope() for e in published[2:4]]
    assert bus.read_stream(job_id, 5) == []


def test_read_stream_refuses_a_stream_with_a_hole(bus: EventBus, redis_client: redis.Redis) -> None:
    """A worker killed between its commit and its publish leaves its event out of the stream."""
    job_id = uuid.uuid4()
    assert bus.publish([event(job_id, seq) for seq in range(1, 6)])
    redis_client.xdel(stream_key(job_id), "0-3")
    assert bus.read_stream(job_id, 0) is None
    assert bus.read_stream(job_id, 1) is None
    after_the_hole = bus.read_stream(job_id, 3)
    assert after_the_hole is not None and [item["seq"] for item in after_the_hole] == [4, 5]


def test_read_stream_refuses_a_stream_that_starts_after_the_seq_asked_for(
    bus: EventBus, redis_client: redis.Redis
) -> None:
    job_id = uuid.uuid4()
    assert bus.publish([event(job_id, seq) for seq in range(3, 6)])  # 1 and 2 never arrived
    assert bus.read_stream(job_id, 0) is None
    assert bus.read_stream(job_id, 1) is None
    from_two = bus.read_stream(job_id, 2)
    assert from_two is not None and [item["seq"] for item in from_two] == [3, 4, 5]


def test_replay_serves_a_whole_stream_without_the_database(bus: EventBus) -> None:
    job_id = uuid.uuid4()
    published = [
        event(job_id, 1, EventType.QUEUED),
        event(job_id, 2, EventType.OUTPUT_DELTA, text="hi"),
        event(job_id, 3, EventType.SUCCEEDED),
    ]
    assert bus.publish(published)
    job = SimpleNamespace(id=job_id, output=None)
    # No session: a whole stream must not reach for PostgreSQL.
    items, source = replay(None, bus, job, 1)  # type: ignore[arg-type]
    assert source == "stream"
    assert items == [e.envelope() for e in published[1:]]


def test_wait_stream_returns_when_an_event_after_the_seq_arrives(bus: EventBus) -> None:
    job_id = uuid.uuid4()
    assert bus.publish([event(job_id, 1)])
    threading.Timer(0.2, lambda: bus.publish([event(job_id, 2)])).start()
    started = time.monotonic()
    assert bus.wait_stream(job_id, 1, timeout=5) is True
    assert 0.15 < time.monotonic() - started < 2


def test_wait_stream_answers_at_once_when_the_stream_is_already_ahead(bus: EventBus) -> None:
    job_id = uuid.uuid4()
    assert bus.publish([event(job_id, 1), event(job_id, 2)])
    started = time.monotonic()
    assert bus.wait_stream(job_id, 1, timeout=5) is True
    assert time.monotonic() - started < 0.5


def test_wait_stream_gives_up_at_its_timeout_or_when_told_to_stop(bus: EventBus) -> None:
    job_id = uuid.uuid4()
    assert bus.publish([event(job_id, 1)])
    started = time.monotonic()
    assert bus.wait_stream(job_id, 1, timeout=0.3) is False
    assert 0.3 <= time.monotonic() - started < 1
    stops = iter([False, True])
    started = time.monotonic()
    # Asked before each slice of at most 1.5 s: the second slice never starts.
    assert bus.wait_stream(job_id, 1, timeout=30, stop=lambda: next(stops)) is False
    assert 1.4 < time.monotonic() - started < 2.5


# Socket.IO messages ---------------------------------------------------------------------------


class FakeRedisEmitter(socketio.RedisManager):
    """python-socketio's write-only Redis emitter (what Flask-SocketIO's `message_queue` uses),
    on a fakeredis connection instead of one it opens from a URL."""

    def __init__(self, client: redis.Redis, channel: str) -> None:
        super().__init__(channel=channel, write_only=True)
        self._client = client

    def _redis_connect(self) -> None:
        self.redis = self._client
        self.connected = True


def test_the_socketio_message_is_what_python_socketios_emitter_publishes(
    bus: EventBus, redis_client: redis.Redis
) -> None:
    job_id = uuid.uuid4()
    published = event(job_id, 1, EventType.QUEUED, kind="chat", text='"quoted" ünïcode')
    socketio_channel = Subscriber(redis_client, SOCKETIO_CHANNEL)
    assert bus.publish([published])
    FakeRedisEmitter(redis_client, SOCKETIO_CHANNEL).emit(
        SOCKET_EVENT, published.envelope(), namespace="/", to=[f"job:{job_id}", f"user:{OWNER}"]
    )
    ours, theirs = (json.loads(raw) for raw in socketio_channel.received())
    assert ours.pop("host_id") != theirs.pop("host_id")
    assert ours == theirs


def test_durable_events_go_to_the_job_and_owner_rooms_and_deltas_to_the_job_room_only(
    bus: EventBus, redis_client: redis.Redis
) -> None:
    job_id = uuid.uuid4()
    socketio_channel = Subscriber(redis_client, SOCKETIO_CHANNEL)
    published = [
        event(job_id, 1, EventType.STARTED),
        event(job_id, 2, EventType.OUTPUT_DELTA, text="to"),
        event(job_id, 3, EventType.SUCCEEDED),
    ]
    assert bus.publish(published)
    messages = [json.loads(raw) for raw in socketio_channel.received()]
    assert [m["room"] for m in messages] == [
        [f"job:{job_id}", f"user:{OWNER}"],
        [f"job:{job_id}"],
        [f"job:{job_id}", f"user:{OWNER}"],
    ]
    assert [m["data"] for m in messages] == [[e.envelope()] for e in published]
    assert {(m["method"], m["event"], m["namespace"]) for m in messages} == {
        ("emit", "job_event", "/")
    }
    assert len({m["host_id"] for m in messages}) == 1  # one emitter per process
    other_process = EventBus(config.testing_settings(), redis_client)
    assert other_process.publish([event(job_id, 4, EventType.LOG)])
    (later,) = (json.loads(raw) for raw in socketio_channel.received())
    assert later["host_id"] != messages[0]["host_id"]


def test_a_batch_jobs_state_changes_also_go_to_its_batch_room_and_deltas_do_not(
    bus: EventBus, redis_client: redis.Redis
) -> None:
    job_id, batch_id = uuid.uuid4(), uuid.uuid4()
    socketio_channel = Subscriber(redis_client, SOCKETIO_CHANNEL)
    published = [
        replace(event(job_id, 1, EventType.STARTED), batch_id=batch_id),
        replace(event(job_id, 2, EventType.OUTPUT_DELTA, text="to"), batch_id=batch_id),
        replace(event(job_id, 3, EventType.SUCCEEDED), batch_id=batch_id),
    ]
    assert bus.publish(published)
    rooms = [json.loads(raw)["room"] for raw in socketio_channel.received()]
    assert rooms == [
        [f"job:{job_id}", f"user:{OWNER}", f"batch:{batch_id}"],
        [f"job:{job_id}"],
        [f"job:{job_id}", f"user:{OWNER}", f"batch:{batch_id}"],
    ]


def test_more_events_than_one_script_call_takes_are_all_published_in_order(
    bus: EventBus, redis_client: redis.Redis
) -> None:
    job_ids = [uuid.uuid4() for _ in range(PUBLISH_MAX_BATCH * 2 + 7)]
    socketio_channel = Subscriber(redis_client, SOCKETIO_CHANNEL)
    assert bus.publish([event(job_id, 1, EventType.QUEUED) for job_id in job_ids])
    published = [json.loads(raw)["data"][0]["job_id"] for raw in socketio_channel.received()]
    assert published == [str(job_id) for job_id in job_ids]
    assert all(seqs_in_stream(redis_client, job_id) == [1] for job_id in job_ids)


# A Redis outage: the feed is best effort and says so ------------------------------------------


def test_while_redis_is_down_publishing_reports_failure_and_readers_fall_back(
    bus: EventBus, fake_server: fakeredis.FakeServer
) -> None:
    job_id = uuid.uuid4()
    assert bus.publish([event(job_id, 1), event(job_id, 2)])
    fake_server.connected = False
    refused: list[Event] = []
    delta = event(job_id, 3, EventType.OUTPUT_DELTA, text="lost")
    bus.publish_later([delta], on_refused=refused.append)
    assert bus.publish([event(job_id, 4)]) is False
    assert refused == [delta]
    # Unreadable is not "a newer attempt wrote past us": JobContext keeps its lease.
    assert bus.stream_tail_seq(job_id) == 0
    assert bus.read_stream(job_id, 0) is None
    started = time.monotonic()
    assert bus.wait_stream(job_id, 2, timeout=5) is False
    assert time.monotonic() - started < 0.5
    bus.signal_cancel(job_id)  # logged, not raised
    bus.delete_stream(job_id)
    fake_server.connected = True
    assert bus.publish([event(job_id, 5)])
    assert bus.stream_tail_seq(job_id) == 5


# Cancel signals -------------------------------------------------------------------------------


@dataclass
class RunningJob:
    """What the cancel listener needs of a JobContext."""

    job_id: uuid.UUID
    canceled: threading.Event = field(default_factory=threading.Event)

    def request_cancel(self) -> None:
        self.canceled.set()


def start_cancel_listener(server: fakeredis.FakeServer, *jobs: RunningJob) -> list[redis.Redis]:
    """A process's cancel listener on `server`, tracking `jobs`; returns the connections it
    opens. Its thread runs for the rest of the session, as it does for a worker's life."""
    connections: list[redis.Redis] = []

    def connect(_url: str) -> redis.Redis:
        connections.append(fakeredis.FakeRedis(server=server))
        return connections[-1]

    active = ActiveJobs(connect)
    for job in jobs:
        active.track(job)  # type: ignore[arg-type]
    jobs = SimpleNamespace(settings=config.testing_settings())
    # The listener alone: the heartbeat, its other half, renews leases in PostgreSQL.
    threading.Thread(target=active._listen_for_cancels, args=(jobs,), daemon=True).start()
    return connections


def subscribers(client: redis.Redis) -> int:
    return dict(client.pubsub_numsub(CANCEL_CHANNEL))[CANCEL_CHANNEL.encode()]


def test_signal_cancel_publishes_the_job_id_on_the_cancel_channel(
    bus: EventBus, redis_client: redis.Redis
) -> None:
    job_id = uuid.uuid4()
    channel = Subscriber(redis_client, CANCEL_CHANNEL)
    bus.signal_cancel(job_id)
    assert channel.received() == [str(job_id).encode()]


def test_signal_cancels_publishes_each_job_id_once(
    bus: EventBus, redis_client: redis.Redis
) -> None:
    job_ids = [uuid.uuid4() for _ in range(3)]
    channel = Subscriber(redis_client, CANCEL_CHANNEL)
    bus.signal_cancels(job_ids)
    bus.signal_cancels([])
    assert channel.received() == [str(job_id).encode() for job_id in job_ids]


def test_a_cancel_signal_stops_only_the_job_it_names(
    bus: EventBus, redis_client: redis.Redis, fake_server: fakeredis.FakeServer
) -> None:
    canceled, running = RunningJob(uuid.uuid4()), RunningJob(uuid.uuid4())
    start_cancel_listener(fake_server, running, canceled)
    wait_for(lambda: subscribers(redis_client) == 1)
    redis_client.publish(CANCEL_CHANNEL, "not-a-job-id")  # ignored; the listener lives on
    bus.signal_cancel(uuid.uuid4())  # a job this process does not run
    bus.signal_cancel(canceled.job_id)
    assert canceled.canceled.wait(3)
    assert not running.canceled.is_set()  # signals are handled in order: the others are done


def test_the_cancel_listener_subscribes_again_after_losing_redis(
    bus: EventBus, redis_client: redis.Redis, fake_server: fakeredis.FakeServer
) -> None:
    job = RunningJob(uuid.uuid4())
    connections = start_cancel_listener(fake_server, job)
    wait_for(lambda: subscribers(redis_client) == 1)
    fake_server.connected = False
    bus.signal_cancel(job.job_id)  # lost: the heartbeat delivers this one
    # fakeredis fails a subscriber's read only when it next polls (within 1 s), not at once
    # as a real Redis that goes away does.
    time.sleep(1.1)
    fake_server.connected = True
    wait_for(lambda: len(connections) >= 2)  # reconnected after its one-second pause
    assert not job.canceled.is_set()
    # Until it has subscribed again a signal can still be lost, so keep signalling.
    deadline = time.monotonic() + 5
    while not job.canceled.wait(0.2):
        assert time.monotonic() < deadline, "the listener never came back"
        bus.signal_cancel(job.job_id)


# Presence: worker heartbeats and the last sweep -----------------------------------------------


def test_a_worker_beat_is_one_hash_field_per_process_rewritten_each_beat(
    redis_client: redis.Redis,
) -> None:
    identity = WorkerIdentity("w1@host", "threads", 8)
    first = presence.worker_beat(identity, running=3, interval=10.0)
    presence.record_worker_beat(redis_client, first)
    later = presence.worker_beat(identity, running=5, interval=10.0)
    presence.record_worker_beat(redis_client, later)
    stored = redis_client.hgetall(presence.WORKERS_KEY)
    assert list(stored) == [f"w1@host:{first.pid}".encode()]
    assert json.loads(stored[first.field.encode()]) == asdict(later)
    (beat,), forgotten = presence.read_worker_beats(stored, time.time())
    assert forgotten == []
    assert (beat.node, beat.pool, beat.concurrency, beat.running) == ("w1@host", "threads", 8, 5)
    assert beat.alive(beat.at + 30) and not beat.alive(beat.at + 31)


def test_the_sweep_record_holds_its_counts_and_interval(redis_client: redis.Redis) -> None:
    # Every count the sweeper reports (a field SweepRecord lacked made every sweep raise).
    counts = asdict(SweepReport(republished=2, recovered=1, canceled=3, artifacts_swept=4))
    before = time.time()
    presence.record_sweep(redis_client, 5.0, counts)
    record = presence.read_sweep(redis_client.get(presence.SWEEP_KEY))
    assert record is not None
    assert asdict(record) | {"at": 0} == {"at": 0, "interval": 5.0, **counts}
    assert before <= record.at <= time.time()
    assert not record.overdue(record.at + 15) and record.overdue(record.at + 16)
    assert presence.read_sweep(None) is None


def test_the_health_figures_count_live_beats_and_forget_dead_processes(
    redis_client: redis.Redis,
) -> None:
    now = time.time()

    def beat(pid: int, age: float) -> WorkerBeat:
        return WorkerBeat("w@h", "h", pid, "gevent", 100, 0, 10.0, now - age)

    fresh, quiet, gone = beat(1, 5), beat(2, 600), beat(3, presence.FORGET_AFTER + 60)
    for one in (fresh, quiet, gone):
        presence.record_worker_beat(redis_client, one)
    redis_client.hset(presence.WORKERS_KEY, "old-version:9", "[1, 2]")
    presence.record_sweep(
        redis_client, 1.0, {"republished": 0, "recovered": 0, "failed": 0, "canceled": 0}
    )
    redis_client.rpush("conveyor", "m1", "m2")  # the broker's lists: priority 0 and 9
    redis_client.rpush("conveyor:9", "m3")
    # Only the Redis half: the figures of PostgreSQL are not asked for.
    rt = SimpleNamespace(settings=config.testing_settings(), redis=redis_client)
    monitor = HealthMonitor(rt)  # type: ignore[arg-type]
    gathered = monitor.redis_figures.current().result(timeout=5)
    assert gathered.error is None and gathered.value is not None
    figures = gathered.value
    assert sorted(b.pid for b in figures.beats) == [1, 2]
    assert [b.pid for b in figures.beats if b.alive(now)] == [1]
    assert sorted(redis_client.hkeys(presence.WORKERS_KEY)) == [b"w@h:1", b"w@h:2"]
    assert isinstance(figures.sweep, SweepRecord) and figures.sweep.interval == 1.0
    assert figures.broker == 3


# What fakeredis cannot stand in for (run on a real Redis by tests/integration) ----------------


@pytest.mark.real_redis(
    reason="fakeredis accepts CLIENT PAUSE but pauses nothing; "
    "run on a real Redis by tests/integration/test_redis_logic.py"
)
def test_a_publish_to_a_stalled_redis_fails_within_the_socket_timeout(
    redis_client: redis.Redis,
) -> None:
    """The client's socket timeout, not the caller's longer wait, bounds a stalled publish."""
    bus = EventBus(config.testing_settings(), redis_client)
    job_id = uuid.uuid4()
    assert bus.publish([event(job_id, 1)])
    redis_client.execute_command("CLIENT", "PAUSE", "10000", "WRITE")  # scripts included
    try:
        started = time.monotonic()
        assert bus.publish([event(job_id, 2)]) is False
        took = time.monotonic() - started
        assert bus.read_stream(job_id, 0) is not None  # reads still answer
    finally:
        redis_client.execute_command("CLIENT", "UNPAUSE")
    socket_timeout = redis_client.connection_pool.connection_kwargs["socket_timeout"]
    assert socket_timeout < took < socket_timeout + 1 < PUBLISH_WAIT_SECONDS
    assert bus.publish([event(job_id, 3)])


@pytest.mark.real_redis(
    reason="fakeredis has no socket, so no socket timeout for a blocking XREAD to outlast; "
    "run on a real Redis by tests/integration/test_redis_logic.py"
)
def test_a_wait_outlasts_the_clients_socket_timeout(redis_client: redis.Redis) -> None:
    """wait_stream blocks in slices shorter than the socket timeout, so a wait longer than it
    neither fails nor ends early."""
    bus = EventBus(config.testing_settings(), redis_client)
    job_id = uuid.uuid4()
    socket_timeout = redis_client.connection_pool.connection_kwargs["socket_timeout"]
    assert socket_timeout is not None
    arrives = socket_timeout + 0.5
    threading.Timer(arrives, lambda: bus.publish([event(job_id, 1)])).start()
    started = time.monotonic()
    assert bus.wait_stream(job_id, 0, timeout=socket_timeout + 5) is True
    assert arrives - 0.1 < time.monotonic() - started < arrives + 1
