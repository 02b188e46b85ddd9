"""`JobContext`: everything a kind may touch while it runs one attempt of a job.

`ctx.llm` (streaming calls that account tokens and cost and stop on cancellation),
`ctx.progress`, `ctx.log`, `ctx.emit`. The context also owns the attempt's event `seq`
counter (see transitions.py for why the lease holder allocates seqs locally) and the coalescing of
token deltas.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from app.config import Settings
from app.jobs.events import Event
from app.jobs.payloads import (
    EventPayload,
    LogPayload,
    OutputDeltaPayload,
    ProgressPayload,
    TerminalPayload,
)
from app.jobs.transitions import Claim, Jobs, LeaseLost
from app.llm.client import CallRecord, Completion, Interrupted, ModelClient

logger = logging.getLogger(__name__)


class JobCanceled(Exception):
    """The job's owner canceled it while it ran."""


class JobTimedOut(Exception):
    """The attempt ran past `job_soft_time_limit`.

    Enforced here rather than by Celery because Celery's time limits only work in the prefork
    pool, and model calls run in the threads pool."""


class JobContext:
    def __init__(self, claim: Claim, jobs: Jobs, model_client: ModelClient) -> None:
        self.claim = claim
        self.job_id = claim.job_id
        self.attempt = claim.attempt
        self.settings: Settings = jobs.settings
        self._jobs = jobs
        self._seq = claim.seq
        self._cancel = threading.Event()
        self._lease_lost = threading.Event()
        self._timed_out = threading.Event()
        self.deadline = time.monotonic() + self.settings.job_soft_time_limit
        self._closer: Callable[[], None] | None = None
        self._closer_lock = threading.Lock()
        self._pending: list[str] = []
        self._last_flush = 0.0
        self._progress = 0.0
        # The claim wrote progress 0 a moment ago: the first progress write is due one
        # interval after it, so a short job writes none (its deltas carry progress anyway).
        self._last_progress_write = time.monotonic()
        self.text_so_far: list[str] = []
        # Model calls not yet written: they ride on the attempt's next write (one statement).
        self.pending_calls: list[dict[str, Any]] = []
        # Set once the attempt's outcome is written: the heartbeat then stops expecting a lease.
        self.done = False
        self.tokens_streamed = 0
        self.llm = JobLLM(self, model_client)

    # Signals from other threads (lease keeper, cancel listener) --------------------------------

    def request_cancel(self) -> None:
        self._cancel.set()
        self._interrupt()

    def lose_lease(self) -> None:
        self._lease_lost.set()
        self._interrupt()

    def time_out(self) -> None:
        self._timed_out.set()
        self._interrupt()

    def _interrupt(self) -> None:
        with self._closer_lock:
            closer = self._closer
        if closer is not None:
            try:
                closer()
            except Exception:  # closing a half-read stream may raise; the reader handles it
                logger.debug("closing the model stream raised", exc_info=True)

    def set_closer(self, closer: Callable[[], None] | None) -> None:
        with self._closer_lock:
            self._closer = closer

    @property
    def interrupted(self) -> bool:
        return self._cancel.is_set() or self._lease_lost.is_set() or self._timed_out.is_set()

    def check(self) -> None:
        """Raises if the job must stop now: lease taken away, canceled, or out of time."""
        if self._lease_lost.is_set():
            raise LeaseLost(f"job {self.job_id} attempt {self.attempt} lost its lease")
        if self._cancel.is_set():
            raise JobCanceled
        if self._timed_out.is_set():
            raise JobTimedOut

    # What kinds call --------------------------------------------------------------------------

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def delta(self, text: str) -> None:
        """Streamed output; coalesced so a fast model does not flood browsers."""
        self._pending.append(text)
        self.text_so_far.append(text)
        self.tokens_streamed += 1
        if time.monotonic() - self._last_flush >= self.settings.delta_flush_interval:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending.clear()
        self._last_flush = time.monotonic()
        delta = OutputDeltaPayload(text=text, progress=round(self._progress, 2))
        event = Event(self.job_id, self.claim.owner, self.next_seq(), delta)
        self._jobs.bus.publish_later([event], on_refused=self._delta_refused)

    def _delta_refused(self, event: Event) -> None:
        if self._jobs.bus.stream_tail_seq(self.job_id) > event.seq:
            # Redis refused our seq because a newer attempt already wrote past it.
            self.lose_lease()

    def progress(self, percent: float, *, force: bool = False) -> None:
        """Progress on the 0-100 scale. Kept in memory at every call and written (with its
        event) at most every `progress_write_interval` seconds."""
        self._progress = min(100.0, max(0.0, float(percent)))
        due = time.monotonic() - self._last_progress_write >= self.settings.progress_write_interval
        if force or due:
            self.flush()
            self._last_progress_write = time.monotonic()
            self._jobs.fenced_update(
                self.claim,
                self.next_seq(),
                ProgressPayload(progress=round(self._progress, 2)),
                calls=self.take_calls(),
                progress=self._progress,
            )

    def log(self, message: str, level: str = "info", **fields: Any) -> None:
        """A line of the job's log; `fields` (JSON values) are stored with it."""
        self.emit(LogPayload(level=level, message=message, **fields))
        logger.log(logging.getLevelName(level.upper()), message, extra={"job_id": self.job_id})

    def emit(self, payload: EventPayload) -> None:
        """A durable event. A kind that needs an event of its own (e.g. `character.section`)
        adds its type to `EventType` and its model to app/jobs/payloads.py."""
        self.flush()
        self._jobs.fenced_update(self.claim, self.next_seq(), payload, calls=self.take_calls())

    # What the runner calls --------------------------------------------------------------------

    def finish(self, payload: TerminalPayload, **values: Any) -> None:
        self.flush()
        self._jobs.finish_job(
            self.claim, self.next_seq(), payload, calls=self.take_calls(), **values
        )
        self.done = True

    def schedule_retry(self, delay: float, code: str, message: str) -> None:
        self.flush()
        self._jobs.schedule_retry(
            self.claim, self.next_seq(), delay, code, message, calls=self.take_calls()
        )
        self.done = True

    def take_calls(self) -> list[dict[str, Any]]:
        calls, self.pending_calls = self.pending_calls, []
        return calls

    def record_pending_calls(self) -> None:
        """For an attempt that ends without a write of its own (lease lost)."""
        self._jobs.record_model_calls(self.claim, self.take_calls())


class JobLLM:
    """Model calls bound to one job attempt: every call is recorded with its tokens and cost,
    whatever its outcome, and stops when the job is canceled or its lease is lost."""

    def __init__(self, ctx: JobContext, models: ModelClient) -> None:
        self._ctx = ctx
        self._models = models

    def model_for_job(self) -> str:
        return self._ctx.claim.model or self._ctx.settings.model_for(self._ctx.claim.kind)

    def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        stream_deltas: bool = True,
        progress_of: Callable[[int], float] | None = None,
        **options: Any,
    ) -> Completion:
        ctx = self._ctx
        ctx.check()

        def on_delta(text: str) -> None:
            if stream_deltas:
                ctx.delta(text)
            if progress_of is not None:
                ctx.progress(progress_of(ctx.tokens_streamed))

        record: CallRecord | None = None
        try:
            completion = self._models.stream_chat(
                model=options.pop("model", None) or self.model_for_job(),
                messages=messages,
                on_delta=on_delta,
                interrupted=lambda: ctx.interrupted,
                register_closer=ctx.set_closer,
                **options,
            )
            record = completion.record
            return completion
        except Interrupted as exc:
            record = exc.record  # type: ignore[attr-defined]
            ctx.check()
            raise
        except Exception as exc:
            record = getattr(exc, "record", None)
            raise
        finally:
            if record is not None:
                ctx.pending_calls.append(record.as_row(self._models.prices))


def token_progress(expected_tokens: int | None) -> Callable[[int], float]:
    """Progress estimated from streamed tokens: linear against max_tokens when known, else an
    asymptote that never claims 100% before the model says it is done."""
    if expected_tokens:
        return lambda n: min(99.0, 100.0 * n / expected_tokens)
    return lambda n: 95.0 * (1.0 - math.exp(-n / 150.0))
