"""The per-process shared check behind /ready and /health, and the presence records behind
/health's worker count: pure logic, no services."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import pytest

from app.jobs.presence import FORGET_AFTER, WorkerBeat, read_worker_beats
from app.shared_result import SharedResult


def test_concurrent_callers_share_the_computation_in_flight() -> None:
    release = threading.Event()
    runs = []

    def compute() -> int:
        runs.append(1)
        release.wait(10)
        return len(runs)

    shared = SharedResult(compute, max_age=60, name="test")
    with ThreadPoolExecutor(max_workers=20) as pool:
        futures = list(pool.map(lambda _: shared.current(), range(20)))
        assert not any(future.done() for future in futures)  # all wait on the one in flight
        release.set()
        wait(futures, timeout=10)
    assert [future.result() for future in futures] == [1] * 20
    assert len(runs) == 1
    assert shared.current().result(timeout=0) == 1  # fresh: answered from the cache


def test_a_stale_result_is_computed_again_and_an_error_reaches_every_waiter() -> None:
    outcomes = iter([1, RuntimeError("down")])

    def compute() -> int:
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    shared = SharedResult(compute, max_age=0, name="test")
    assert shared.current().result(timeout=10) == 1
    with pytest.raises(RuntimeError, match="down"):
        shared.current().result(timeout=10)


def beat(pid: int, at: float, interval: float = 10) -> WorkerBeat:
    return WorkerBeat("w@host", "host", pid, "threads", 8, 0, interval, at)


def raw(*beats: WorkerBeat) -> dict[bytes, bytes]:
    return {b.field.encode(): json.dumps(vars(b)).encode() for b in beats}


def test_worker_beats_are_alive_for_three_intervals_and_forgotten_after_an_hour() -> None:
    now = 10_000.0
    fresh, late, ancient = beat(1, now - 29), beat(2, now - 31), beat(3, now - FORGET_AFTER - 1)
    beats, forgotten = read_worker_beats({**raw(fresh, late, ancient), b"x:1": b"{"}, now)
    assert [b.pid for b in beats] == [1, 2]
    assert [b.alive(now) for b in beats] == [True, False]
    assert sorted(forgotten) == [ancient.field.encode(), b"x:1"]
