"""Group commit: many threads hand work to one writer thread, which does everything that has
gathered meanwhile as one batch.

Used where a per-item round trip is the cost: job creation (one INSERT and one commit for all
the jobs that arrived together, one Redis pipeline for their Celery messages) and live events
(one Redis script call for every event a worker process has pending). Under no load a batch
is one item and the only cost is a hand-off between threads; under load the batch grows by
itself, with no timer and no added delay: whatever arrives while a batch is being written goes
into the next one.

Works with real threads and with gevent's monkey-patched ones alike. The writer thread is
started on first use in each process, so a process that forks (gunicorn, Celery prefork)
starts its own instead of waiting on its parent's, which did not survive the fork.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class WaitTimedOut(Exception):
    """The writer did not finish the batch in time (it may still do so later)."""


@dataclass(eq=False)
class _Pending(Generic[Item, Result]):
    item: Item
    waiter: threading.Event | None
    result: Result | None = None
    error: BaseException | None = None
    weight: int = 1


class GroupCommit(Generic[Item, Result]):
    """`write(items)` runs on one thread per process and returns one result per item, in order;
    an exception it raises becomes every waiting caller's exception."""

    def __init__(
        self,
        name: str,
        write: Callable[[list[Item]], Sequence[Result]],
        *,
        max_batch: int,
        weight: Callable[[Item], int] = lambda _item: 1,
    ) -> None:
        self._name = name
        self._write = write
        self._max_batch = max_batch
        self._weight = weight
        self._queue: list[_Pending[Item, Result]] = []
        self._wakeup = threading.Condition()
        self._pid: int | None = None

    def call(self, item: Item, timeout: float) -> Result:
        """Submits `item` and waits for its result."""
        pending = self._submit(item, threading.Event())
        if not pending.waiter.wait(timeout):  # type: ignore[union-attr]
            raise WaitTimedOut(f"{self._name}: no result within {timeout:g} s")
        if pending.error is not None:
            raise pending.error
        return pending.result  # type: ignore[return-value]

    def call_later(self, item: Item) -> None:
        """Submits `item` without waiting; `write` still sees it in submission order."""
        self._submit(item, None)

    def _submit(self, item: Item, waiter: threading.Event | None) -> _Pending[Item, Result]:
        pending: _Pending[Item, Result] = _Pending(item, waiter, weight=self._weight(item))
        with self._wakeup:
            if self._pid != os.getpid():
                self._queue.clear()
                self._pid = os.getpid()
                threading.Thread(target=self._run, name=self._name, daemon=True).start()
            self._queue.append(pending)
            self._wakeup.notify()
        return pending

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._queue:
                    self._wakeup.wait()
                batch = self._take()
            self._write_batch(batch)

    def _take(self) -> list[_Pending[Item, Result]]:
        taken, weight = 0, 0
        while taken < len(self._queue) and (taken == 0 or weight < self._max_batch):
            weight += self._queue[taken].weight
            taken += 1
        batch, self._queue[:taken] = self._queue[:taken], []
        return batch

    def _write_batch(self, batch: list[_Pending[Item, Result]]) -> None:
        try:
            results = self._write([pending.item for pending in batch])
            for pending, result in zip(batch, results, strict=True):
                pending.result = result
        except BaseException as exc:  # handed to every caller; the writer thread lives on
            if any(pending.waiter is None for pending in batch):
                logger.warning("%s: a batch failed: %r", self._name, exc)
            for pending in batch:
                pending.error = exc
        for pending in batch:
            if pending.waiter is not None:
                pending.waiter.set()
