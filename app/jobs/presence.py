"""What workers and the sweeper leave in Redis to show they are alive, read by GET /health.

Written on ticks that happen anyway: every worker process's lease heartbeat (leases.py) and
every sweep. Reading them costs one round trip and asks nothing of the workers: a Celery ping
per request (the former readiness check) made every caller wait out the ping's timeout, and
under 20 concurrent callers readiness answered 503 on healthy replicas.

Times are wall-clock seconds of the writer; ages assume the hosts' clocks agree (NTP), and a
negative age (a writer's clock ahead) counts as zero.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis

WORKERS_KEY = "conveyor:workers"  # hash: "<node>:<pid>" -> WorkerBeat as JSON
SWEEP_KEY = "conveyor:sweeper"  # the last completed sweep, as JSON
# A process that stopped beating is dropped from the hash after this long, so restarts (a new
# pid each) do not grow it forever; until then it still tells when a worker was last seen.
FORGET_AFTER = 3600.0
# A worker is counted as alive while its last beat is younger than this many of its intervals,
# and the sweeper while its last sweep is.
MISSED_BEATS = 3


@dataclass(frozen=True)
class WorkerIdentity:
    node: str  # the Celery node name (`-n`), as Flower shows it
    pool: str  # prefork, threads, gevent, solo, ...
    concurrency: int  # jobs this process runs at once


@dataclass(frozen=True)
class WorkerBeat:
    node: str
    hostname: str
    pid: int
    pool: str
    concurrency: int
    running: int
    interval: float  # seconds between this process's beats
    at: float

    @property
    def field(self) -> str:
        return f"{self.node}:{self.pid}"

    def age(self, now: float) -> float:
        return max(0.0, now - self.at)

    def alive(self, now: float) -> bool:
        return self.age(now) <= MISSED_BEATS * self.interval


@dataclass(frozen=True)
class SweepRecord:
    at: float
    interval: float  # how often beat schedules a sweep
    republished: int
    recovered: int
    failed: int
    canceled: int
    # Defaults, so a record written before artifacts (or scheduled jobs) existed still reads.
    artifacts_swept: int = 0
    scheduled: int = 0
    expired: int = 0
    released: int = 0

    def age(self, now: float) -> float:
        return max(0.0, now - self.at)

    def overdue(self, now: float) -> bool:
        return self.age(now) > MISSED_BEATS * self.interval


def worker_beat(identity: WorkerIdentity, running: int, interval: float) -> WorkerBeat:
    return WorkerBeat(
        node=identity.node,
        hostname=socket.gethostname(),
        pid=os.getpid(),  # read at each beat: a prefork child is not its parent
        pool=identity.pool,
        concurrency=identity.concurrency,
        running=running,
        interval=interval,
        at=time.time(),
    )


def record_worker_beat(client: redis.Redis, beat: WorkerBeat) -> None:
    client.hset(WORKERS_KEY, beat.field, json.dumps(asdict(beat)))


def read_worker_beats(raw: dict[bytes, bytes], now: float) -> tuple[list[WorkerBeat], list[bytes]]:
    """The beats of an HGETALL of WORKERS_KEY, and the fields old enough to forget."""
    beats, forgotten = [], []
    for field, value in raw.items():
        try:
            beat = WorkerBeat(**json.loads(value))
        except (ValueError, TypeError):
            forgotten.append(field)  # written by another version; its writer rewrites it
            continue
        if beat.age(now) > FORGET_AFTER:
            forgotten.append(field)
        else:
            beats.append(beat)
    return beats, forgotten


def record_sweep(client: redis.Redis, interval: float, counts: dict[str, int]) -> None:
    record = SweepRecord(at=time.time(), interval=interval, **counts)
    client.set(SWEEP_KEY, json.dumps(asdict(record)))


def read_sweep(raw: bytes | None) -> SweepRecord | None:
    if raw is None:
        return None
    try:
        data: dict[str, Any] = json.loads(raw)
        return SweepRecord(**data)
    except (ValueError, TypeError):
        return None
