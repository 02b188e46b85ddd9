"""A value each process computes at most once per `max_age` seconds, however many ask.

For checks that many callers poll at once (readiness, the operators' health view): callers
within `max_age` of a computation's start get its result; callers meanwhile share the one in
flight instead of each starting their own. Before this, every readiness call probed every
dependency itself, on a small shared thread pool, and under 20 concurrent callers the probes
queued behind each other past their deadline: 186 of 200 answers were 503 on a healthy system.

The computation runs on a thread of its own (a greenlet under gevent), so a caller waits for it
only as long as it chooses to, and a stalled dependency ties up that one thread, not one per
caller.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

T = TypeVar("T")


class SharedResult(Generic[T]):
    def __init__(self, compute: Callable[[], T], max_age: float, name: str) -> None:
        self._compute = compute
        self._max_age = max_age
        self._name = name
        self._lock = threading.Lock()
        self._latest: Future[T] | None = None
        self._latest_started = 0.0
        self._running: Future[T] | None = None

    def current(self) -> Future[T]:
        """The latest result if its computation started at most `max_age` ago, else the
        computation in flight, started now if there is none. Wait on it with a timeout."""
        with self._lock:
            latest = self._latest
            if latest is not None and time.monotonic() - self._latest_started <= self._max_age:
                return latest
            if self._running is None:
                self._running = Future()
                threading.Thread(
                    target=self._run,
                    args=(self._running,),
                    name=f"shared-{self._name}",
                    daemon=True,
                ).start()
            return self._running

    def _run(self, future: Future[T]) -> None:
        started = time.monotonic()
        try:
            value = self._compute()
        except Exception as exc:  # handed to every waiter, as the value would have been
            self._finish(future, started)
            future.set_exception(exc)
            return
        self._finish(future, started)
        future.set_result(value)

    def _finish(self, future: Future[T], started: float) -> None:
        with self._lock:
            self._latest, self._latest_started, self._running = future, started, None
