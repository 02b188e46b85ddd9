"""The group commit behind job creation and event publishing, with real threads."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.batching import GroupCommit, WaitTimedOut


def test_each_caller_gets_its_own_result_and_concurrent_calls_share_batches() -> None:
    batches: list[list[int]] = []
    gate = threading.Event()

    def write(items: list[int]) -> list[int]:
        gate.wait(5)  # the first batch holds the writer, so the others gather meanwhile
        batches.append(items)
        return [item * 10 for item in items]

    group: GroupCommit[int, int] = GroupCommit("test", write, max_batch=100)
    with ThreadPoolExecutor(max_workers=20) as pool:
        futures = [pool.submit(group.call, n, 5.0) for n in range(20)]
        threading.Timer(0.2, gate.set).start()
        results = [future.result() for future in futures]
    assert results == [n * 10 for n in range(20)]
    assert sorted(item for batch in batches for item in batch) == list(range(20))
    assert len(batches) < 20  # batched, not one write per call


def test_batches_keep_submission_order_and_respect_the_weight_limit() -> None:
    seen: list[list[str]] = []
    gate, writing = threading.Event(), threading.Event()

    def write(items: list[str]) -> list[None]:
        writing.set()
        gate.wait(5)
        seen.append(items)
        return [None] * len(items)

    group: GroupCommit[str, None] = GroupCommit("test", write, max_batch=4, weight=len)
    group.call_later("x")  # the writer takes this one and waits at the gate
    assert writing.wait(5)
    for item in ["ab", "cd", "e", "fgh", "ij", "last"]:
        group.call_later(item)  # these gather behind it
    gate.set()
    group.call("end", 5.0)
    # In submission order, and a batch stops growing once it reaches the weight limit
    # (4 characters here).
    assert seen == [["x"], ["ab", "cd"], ["e", "fgh"], ["ij", "last"], ["end"]]


def test_an_error_in_a_batch_reaches_every_waiting_caller_and_the_writer_survives() -> None:
    calls = {"n": 0}

    def write(items: list[int]) -> list[int]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("database went away")
        return items

    group: GroupCommit[int, int] = GroupCommit("test", write, max_batch=10)
    with pytest.raises(ConnectionError, match="went away"):
        group.call(1, 5.0)
    assert group.call(2, 5.0) == 2


def test_a_caller_stops_waiting_after_its_timeout() -> None:
    release = threading.Event()

    def write(items: list[int]) -> list[int]:
        release.wait(5)
        return items

    group: GroupCommit[int, int] = GroupCommit("test", write, max_batch=10)
    with pytest.raises(WaitTimedOut):
        group.call(1, 0.2)
    release.set()
    assert group.call(2, 5.0) == 2
