"""Fair dispatch's pure parts: the auto window from the workers' beats, and the releaser that
coalesces the owners poked while it works."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict

from app.jobs.fairness import Releaser, auto_window, live_slots
from app.jobs.presence import WorkerBeat


def beat(pid: int, concurrency: int, age: float, interval: float = 10.0) -> tuple[bytes, bytes]:
    record = WorkerBeat("w@h", "h", pid, "threads", concurrency, 0, interval, time.time() - age)
    return record.field.encode(), json.dumps(asdict(record)).encode()


def test_the_auto_window_is_every_live_slot_plus_a_quarter_with_a_floor() -> None:
    assert auto_window(100, 32) == 125
    assert auto_window(101, 32) == 127  # rounded up
    assert auto_window(8, 32) == 32
    assert auto_window(0, 32) == 32  # no worker has beaten: the floor


def test_only_fresh_beats_count_as_slots() -> None:
    raw = dict([beat(1, 100, age=1), beat(2, 50, age=5), beat(3, 200, age=31)])
    assert live_slots(raw) == 150  # the third missed three beats of 10 s
    raw[b"junk"] = b"not json"
    assert live_slots(raw) == 150


def test_the_releaser_coalesces_owners_poked_while_it_works() -> None:
    passes: list[list[str]] = []
    first_started, go_on = threading.Event(), threading.Event()

    def release(owners: list[str]) -> None:
        passes.append(owners)
        first_started.set()
        go_on.wait(5)

    releaser = Releaser(release)
    releaser.poke("a")
    assert first_started.wait(5)
    for owner in ("b", "c", "b", "a"):
        releaser.poke(owner)
    go_on.set()
    deadline = time.monotonic() + 5
    while len(passes) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert passes == [["a"], ["a", "b", "c"]]


def test_a_failed_release_does_not_stop_the_releaser() -> None:
    released: list[list[str]] = []
    failed, done = threading.Event(), threading.Event()

    def release(owners: list[str]) -> None:
        if owners == ["broken"]:
            failed.set()
            raise RuntimeError("database down")
        released.append(owners)
        done.set()

    releaser = Releaser(release)
    releaser.poke("broken")
    assert failed.wait(5)
    releaser.poke("fine")
    assert done.wait(5)
    assert released == [["fine"]]
