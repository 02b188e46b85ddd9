"""`JobContext`: everything a kind may touch while it runs one attempt of a job.

`ctx.llm` (streaming calls that account tokens and cost and stop on cancellation),
`ctx.run_step` (a checkpointed step, see docs/kinds.md), `ctx.progress`, `ctx.log`,
`ctx.emit`. The context also owns the attempt's event `seq` counter (see transitions.py for why
the lease holder allocates seqs locally) and the coalescing of token deltas.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

from pydantic import BaseModel

from app import metrics
from app.config import Settings
from app.db import Database
from app.jobs import provider_batches, waiting
from app.jobs.artifacts import SavedArtifact, publish_effect
from app.jobs.events import Event
from app.jobs.payloads import (
    EventPayload,
    LogPayload,
    OutputDeltaPayload,
    ProgressPayload,
    ProviderBatchPayload,
    StepPayload,
    SucceededPayload,
    TerminalPayload,
)
from app.jobs.sql import Effect, progress_event_effect
from app.jobs.transitions import Checkpoint, Claim, Jobs, LeaseLost, call_cost
from app.kinds.base import Step
from app.llm.cache import CachedAnswer, ResponseCache
from app.llm.cache import cache_key as response_cache_key
from app.llm.client import CallRecord, Completion, Interrupted, ModelClient
from app.llm.errors import ModelError
from app.llm.limits import CapacityWait, Ticket
from app.storage import StoreError

logger = logging.getLogger(__name__)

T = TypeVar("T")
USD_PLACES = Decimal("0.00000001")


def usd_text(amount: Decimal) -> str:
    return f"{amount.quantize(USD_PLACES):f}"


@dataclass
class RunningStep:
    """The step this attempt is running: its share of the progress scale and its calls."""

    spec: Step
    start: float  # the job's progress where it begins and ends, 0-100
    end: float
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    calls: list[dict[str, Any]] = field(default_factory=list)

    def usage(self) -> tuple[int, int, Decimal]:
        return (
            sum(call["tokens_in"] for call in self.calls),
            sum(call["tokens_out"] for call in self.calls),
            sum((call_cost(call) for call in self.calls), Decimal(0)),
        )


class JobCanceled(Exception):
    """The job's owner canceled it while it ran."""


class JobBudgetExceeded(Exception):
    """The job's cost passed its `max_cost_usd`, or its owner's spend passed a budget."""

    def __init__(self, limit: str) -> None:
        super().__init__(limit)
        self.limit = limit  # "max_cost_usd", "daily" or "monthly"


class JobTimedOut(Exception):
    """The attempt ran past its time limit: the job's `timeout_seconds`, or else
    `job_soft_time_limit`.

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
        self._over_budget: str | None = None
        # The owner's tightest budget, ("daily" | "monthly", USD left), as of the claim and then
        # of each heartbeat (leases.py): read once per beat for all the process's jobs, never
        # per token.
        self.tenant_limit: tuple[str, Decimal] | None = claim.tenant_limit
        # What the job has spent: its earlier attempts, and this one's calls so far.
        self.spent: Decimal = claim.cost_usd
        # The job's own timeout_seconds when it asked for one (the API holds it under the
        # deployment's limit), else the deployment's.
        self.time_limit: float = min(
            self.settings.job_soft_time_limit,
            claim.timeout_seconds or self.settings.job_soft_time_limit,
        )
        self.deadline = time.monotonic() + self.time_limit
        self._closer: Callable[[], None] | None = None
        self._closer_lock = threading.Lock()
        self._pending: list[str] = []
        self._last_flush = 0.0
        self._progress = 0.0
        # The claim wrote progress 0 a moment ago: the first progress event is due one
        # interval after it, so a short job sends none (its deltas carry progress anyway).
        self._last_progress_write = time.monotonic()
        # The newest job.progress event not yet in PostgreSQL: live at once, made durable by the
        # process's next heartbeat or by the attempt's next write of its own, whichever is first.
        self._unwritten_progress: Event | None = None
        self._progress_lock = threading.Lock()
        self.text_so_far: list[str] = []
        # Model calls not yet written: they ride on the attempt's next write (one statement).
        self.pending_calls: list[dict[str, Any]] = []
        # Set once the attempt's outcome is written: the heartbeat then stops expecting a lease.
        self.done = False
        self.tokens_streamed = 0
        self.llm = JobLLM(self, model_client)
        # The admission of the job's first call under its endpoint's provider limits, taken
        # before the claim (app/execution/capacity.py): the first call to that model uses it.
        self.prepaid: Ticket | None = None
        self.steps: tuple[Step, ...] = ()
        self.step: RunningStep | None = None
        self._steps_run: set[str] = set()
        # Writes that happen in the statement of a successful finish, and only then.
        self.success_effects: dict[str, Effect] = {}
        self._after_finish: list[Callable[[TerminalPayload], None]] = []

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
    def over_budget(self) -> str | None:
        """The limit the job passed ("max_cost_usd", "daily", "monthly"), if it did."""
        return self._over_budget

    def exceed_budget(self, limit: str) -> None:
        """Called by the streaming thread itself: the stream stops at its next chunk."""
        self._over_budget = limit

    @property
    def interrupted(self) -> bool:
        return (
            self._cancel.is_set()
            or self._lease_lost.is_set()
            or self._timed_out.is_set()
            or self._over_budget is not None
        )

    def spend_limit(self) -> tuple[str, Decimal] | None:
        """The tightest limit on what the next call may cost: the job's `max_cost_usd` less
        what it has spent, or its owner's budget left; None: no limit."""
        limits = []
        if self.claim.max_cost_usd is not None:
            limits.append(("max_cost_usd", self.claim.max_cost_usd - self.spent))
        if self.tenant_limit is not None:
            limits.append(self.tenant_limit)
        return min(limits, key=lambda limit: limit[1]) if limits else None

    def check(self) -> None:
        """Raises if the job must stop now: lease taken away, canceled, or out of time."""
        if self._lease_lost.is_set():
            raise LeaseLost(f"job {self.job_id} attempt {self.attempt} lost its lease")
        if self._cancel.is_set():
            raise JobCanceled
        if self._timed_out.is_set():
            raise JobTimedOut
        if self._over_budget is not None:
            raise JobBudgetExceeded(self._over_budget)

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
        """Progress on the 0-100 scale; inside a step, of that step (mapped onto its share of
        the job's). Kept in memory at every call; a job.progress event goes out at most every
        `progress_write_interval` seconds. It is live at once and written to PostgreSQL with
        the process's next lease renewal (one statement for all its jobs) or the attempt's next
        write, so a long answer costs no transaction of its own per progress event
        (docs/performance.md). `force` writes it now, in a transaction of its own."""
        percent = min(100.0, max(0.0, float(percent)))
        if self.step is not None:
            percent = self.step.start + (self.step.end - self.step.start) * percent / 100
        self._progress = percent
        due = time.monotonic() - self._last_progress_write >= self.settings.progress_write_interval
        if not (force or due):
            return
        self.flush()
        self._last_progress_write = time.monotonic()
        payload = ProgressPayload(progress=round(self._progress, 2))
        if force:
            self._write(payload, progress=self._progress)
            return
        event = Event(
            self.job_id, self.claim.owner, self.next_seq(), payload, batch_id=self.claim.batch_id
        )
        # Behind this attempt's earlier deltas in the process's one publish queue, so the
        # stream sees its seqs in order.
        self._jobs.bus.publish_later([event], on_refused=self._delta_refused)
        with self._progress_lock:
            self._unwritten_progress = event

    def take_unwritten_progress(self) -> Event | None:
        """For the heartbeat: the progress event to write with the lease renewal, if any."""
        with self._progress_lock:
            event, self._unwritten_progress = self._unwritten_progress, None
        return event

    def _write(self, payload: EventPayload, **values: Any) -> None:
        """A write of this attempt's own: its event, its calls, the progress event still
        unwritten (an effect of the same statement, so it lands only if the write wins)."""
        self._jobs.fenced_update(
            self.claim,
            self.next_seq(),
            payload,
            calls=self.take_calls(),
            effects=self._progress_effects(),
            **values,
        )

    def _progress_effects(self) -> tuple[Effect, ...]:
        event = self.take_unwritten_progress()
        return () if event is None else (progress_event_effect(event),)

    def log(self, message: str, level: str = "info", **fields: Any) -> None:
        """A line of the job's log; `fields` (JSON values) are stored with it."""
        self.emit(LogPayload(level=level, message=message, **fields))
        logger.log(logging.getLevelName(level.upper()), message, extra={"job_id": self.job_id})

    def emit(self, payload: EventPayload) -> None:
        """A durable event. A kind that needs an event of its own (e.g. `character.section`)
        adds its type to `EventType` and its model to app/jobs/payloads.py."""
        self.flush()
        self._write(payload)

    def save_artifact(
        self,
        name: str,
        data: bytes,
        content_type: str,
        *,
        width: int | None = None,
        height: int | None = None,
    ) -> SavedArtifact:
        """Stores a binary output (an image). Users see it once the job succeeds, in the same
        statement that writes its output; an attempt that does not succeed never publishes it
        (app/jobs/artifacts.py)."""
        self.check()
        try:
            saved = self._jobs.artifacts.save(
                self.job_id, self.attempt, name, data, content_type, width=width, height=height
            )
        except StoreError as exc:
            # Retried like a model outage: the store may be back for the next attempt, and
            # what this attempt stored is never published.
            raise ModelError("artifact_store_unavailable", str(exc), retryable=True) from exc
        if saved is None:
            raise LeaseLost(f"job {self.job_id} attempt {self.attempt} lost its lease")
        self.success_effects.setdefault("artifacts", publish_effect())
        return saved

    def on_success(self, name: str, effect: Effect) -> None:
        """`effect` is written by the statement that finishes the job successfully, and only
        if the attempt still holds it (e.g. a canvas job's objects); one effect per name."""
        self.success_effects[name] = effect

    def after_finish(self, callback: Callable[[TerminalPayload], None]) -> None:
        """`callback(payload)` runs once this attempt's outcome (succeeded, failed or canceled)
        is written; for notices outside the job's own events. It must not raise: the outcome
        is already committed (an exception is logged)."""
        self._after_finish.append(callback)

    @property
    def db(self) -> Database:
        """The database, for a kind's own short reads outside the job's row (a canvas, say):
        one `with ctx.db.transaction()` each, never held across a model call."""
        return self._jobs.db

    def broadcast(self, rooms: list[str], event: str, data: dict[str, Any]) -> None:
        """A live Socket.IO message to `rooms`, outside the job's timeline (not replayed)."""
        self._jobs.bus.broadcast(rooms, event, data)

    # Steps ----------------------------------------------------------------------------------

    def declare_steps(self, steps: tuple[Step, ...]) -> None:
        """The kind's steps (its module's `STEPS`), given by the runner before `run`."""
        self.steps = steps

    def run_step(self, name: str, fn: Callable[[], T]) -> T:
        """Runs the declared step `name` (`fn()`, which returns its output) and checkpoints its
        output, or, when an earlier attempt of the job finished it, returns that attempt's
        output without calling `fn`: its model calls are not made, nor paid for, again.

        The output is stored as JSON: a pydantic model when the step declares `output`, else
        any JSON value. Inside `fn`, `ctx.llm` calls the model of the step's role and
        `ctx.progress` is the step's own 0-100."""
        spec, start, end = self._locate(name)
        if name in self._steps_run:
            raise RuntimeError(f"step {name!r} already ran in this attempt")
        self._steps_run.add(name)
        checkpoint = self.claim.checkpoints.get(name)
        if checkpoint is not None:
            self._reuse(spec, checkpoint, end)
            return self._restore(spec, checkpoint.output)  # type: ignore[no-any-return]
        self.step = RunningStep(spec, start, end)
        try:
            self._write_step(StepPayload(**self._step_fields(spec, "started", start)))
            result = fn()
            self.check()
            self._finish_step(self.step, result)
        finally:
            self.step = None
        return result

    def _locate(self, name: str) -> tuple[Step, float, float]:
        total = sum(step.weight for step in self.steps)
        before = 0.0
        for step in self.steps:
            if step.name == name:
                return step, 100 * before / total, 100 * (before + step.weight) / total
            before += step.weight
        declared = ", ".join(step.name for step in self.steps) or "none"
        raise RuntimeError(f"step {name!r} is not declared by the kind (its steps: {declared})")

    def _step_fields(self, spec: Step, status: str, progress: float) -> dict[str, Any]:
        return {
            "step": spec.name,
            "status": status,
            "role": spec.role,
            "attempt": self.attempt,
            "progress": round(progress, 2),
        }

    def _write_step(self, payload: StepPayload, checkpoint: dict[str, Any] | None = None) -> None:
        self.flush()
        self._progress = payload.progress
        self._last_progress_write = time.monotonic()
        self._write(payload, checkpoint=checkpoint, progress=payload.progress)

    def _finish_step(self, step: RunningStep, result: Any) -> None:
        spec = step.spec
        if spec.output is not None and not isinstance(result, spec.output):
            raise TypeError(
                f"step {spec.name!r} returned {type(result).__name__}, "
                f"not its declared {spec.output.__name__}"
            )
        output = result.model_dump(mode="json") if isinstance(result, BaseModel) else result
        tokens_in, tokens_out, cost = step.usage()
        usage = {"tokens_in": tokens_in, "tokens_out": tokens_out}
        payload = StepPayload(
            **self._step_fields(spec, "finished", step.end), **usage, cost_usd=usd_text(cost)
        )
        checkpoint = {
            "name": spec.name,
            "output": output,
            **usage,
            "cost_usd": str(cost),
            "started_at": step.started_at.isoformat(),
        }
        self._write_step(payload, checkpoint)

    def _reuse(self, spec: Step, checkpoint: Checkpoint, end: float) -> None:
        fields = self._step_fields(spec, "reused", end) | {"attempt": checkpoint.attempt}
        payload = StepPayload(
            **fields,
            tokens_in=checkpoint.tokens_in,
            tokens_out=checkpoint.tokens_out,
            cost_usd=usd_text(checkpoint.cost_usd),
        )
        self._write_step(payload)

    @staticmethod
    def _restore(spec: Step, output: Any) -> Any:
        return output if spec.output is None else spec.output.model_validate(output)

    # What the runner calls --------------------------------------------------------------------

    def finish(self, payload: TerminalPayload, **values: Any) -> None:
        self.flush()
        effects = self.success_effects if isinstance(payload, SucceededPayload) else {}
        self._jobs.finish_job(
            self.claim,
            self.next_seq(),
            payload,
            calls=self.take_calls(),
            effects=(*effects.values(), *self._progress_effects()),
            **values,
        )
        self.done = True
        for callback in self._after_finish:
            try:
                callback(payload)
            except Exception:
                logger.exception("after-finish callback failed", extra={"job_id": self.job_id})

    def schedule_retry(self, delay: float, code: str, message: str) -> None:
        self.flush()
        self._jobs.schedule_retry(
            self.claim, self.next_seq(), delay, code, message, calls=self.take_calls()
        )
        self.done = True

    def hand_over_to_provider_batch(self, model: str, body: dict[str, Any]) -> None:
        """The job waits for a provider batch (app/jobs/provider_batches.py): its request is
        stored and its lease cleared, in one fenced write; this attempt's worker is done."""
        self.check()
        self.flush()
        self._jobs.fenced_update(
            self.claim,
            self.next_seq(),
            ProviderBatchPayload(phase="pending", progress=0.0),
            calls=self.take_calls(),
            effects=(provider_batches.hand_over(self.attempt, model, body),),
            lease_expires_at=None,
        )
        self.done = True
        # Without a lease it no longer holds a place in its owner's dispatch window.
        self._jobs.intake.release_soon(self.claim.owner)

    def requeue_for_capacity(self, reason: str, until: float, endpoint: str, message: str) -> None:
        """Back to `queued` until `until` to wait for a provider's capacity, this attempt given
        back (app/jobs/waiting.py)."""
        self.flush()
        waiting.requeue(
            self._jobs,
            self.claim,
            self.next_seq(),
            reason=reason,
            until=until,
            endpoint=endpoint,
            message=message,
            calls=self.take_calls(),
        )
        self.done = True

    def take_calls(self) -> list[dict[str, Any]]:
        calls, self.pending_calls = self.pending_calls, []
        return calls

    def record_pending_calls(self) -> None:
        """For an attempt that ends without a write of its own (lease lost)."""
        self._jobs.record_model_calls(self.claim, self.take_calls())


@dataclass
class DeltaSink:
    """A call's delta handler and what it counts; the budget guard is set once the call is
    known to be made (a cached answer has none)."""

    on_delta: Callable[[str], None] = lambda _: None
    over_budget: Callable[[int], bool] = lambda _: False
    streamed: int = 0


class JobLLM:
    """Model calls bound to one job attempt: every call is recorded with its tokens and cost,
    whatever its outcome, and stops when the job is canceled or its lease is lost."""

    def __init__(self, ctx: JobContext, models: ModelClient) -> None:
        self._ctx = ctx
        self._models = models
        # Model calls of this attempt (chat and images, whatever their outcome), and how many of
        # them the response cache answered.
        self.calls = 0
        self.cache_hits = 0

    @property
    def all_cached(self) -> bool:
        """Whether every model call of the attempt was answered from the response cache."""
        return self.calls > 0 and self.cache_hits == self.calls

    @property
    def client(self) -> ModelClient:
        """The process's model client, for calls other than chat (images); record each with
        `record`."""
        return self._models

    def record(self, record: CallRecord) -> None:
        """A model call, `chat`'s or one made outside it (an image request): written with the
        attempt's next write, its cost counted in the job's (and the step's) usage."""
        row = record.as_row(self._models.prices)
        self.calls += 1
        self.cache_hits += record.outcome == "cached"
        metrics.model_call(row, self._ctx.claim.owner)
        self._ctx.spent += call_cost(row)
        self._ctx.pending_calls.append(row)
        if self._ctx.step is not None:
            self._ctx.step.calls.append(row)

    def model_for_job(self) -> str:
        return self._ctx.claim.model or self._ctx.settings.model_for(self._ctx.claim.kind)

    def model_for_role(self, role: str | None) -> str:
        """The model pinned for `role` when the job was created (the request's choice or the
        configuration's then), else the configuration's now (a job created before its kind
        named the role). Without a role, the job's model."""
        if role is None:
            return self.model_for_job()
        claim = self._ctx.claim
        return claim.models.get(role) or self._ctx.settings.model_for(claim.kind, role)

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
        step = ctx.step
        role = options.pop("role", None) or (step.spec.role if step is not None else None)
        model = options.pop("model", None) or self.model_for_role(role)
        cache = self._models.cache if options.pop("cache", False) else None
        if cache is None:
            sink = self._sink(stream_deltas, progress_of)
            return self._call(model, messages, step, role, sink, **options)
        key = response_cache_key(ctx.claim.owner, model, messages, options)
        if (hit := cache.get(key)) is not None:
            self._release_prepaid(model)
            # A cached answer costs nothing: no budget can stop it.
            return self._replay(hit, model, step, role, self._sink(stream_deltas, progress_of))
        deltas: list[str] = []
        sink = self._sink(stream_deltas, progress_of, deltas)
        completion = self._call(model, messages, step, role, sink, **options)
        self._store_on_success(cache, key, deltas, completion.finish_reason)
        return completion

    def _sink(
        self,
        stream_deltas: bool,
        progress_of: Callable[[int], float] | None,
        deltas: list[str] | None = None,
    ) -> DeltaSink:
        """Where a call's deltas go: the job's events (unless `stream_deltas` is off), its
        progress, and `deltas` when the answer is to be cached; none past the budget."""
        ctx = self._ctx
        sink = DeltaSink()

        def on_delta(text: str) -> None:
            sink.streamed += 1
            if sink.over_budget(sink.streamed):
                return
            if deltas is not None:
                deltas.append(text)
            if stream_deltas:
                ctx.delta(text)
            if progress_of is not None:
                ctx.progress(progress_of(sink.streamed))

        sink.on_delta = on_delta
        return sink

    def _call(
        self,
        model: str,
        messages: list[dict[str, Any]],
        step: RunningStep | None,
        role: str | None,
        sink: DeltaSink,
        **options: Any,
    ) -> Completion:
        """One call to the model, recorded whatever its outcome."""
        ctx = self._ctx
        sink.over_budget = self._budget_guard(model, messages)
        record: CallRecord | None = None
        ticket = ctx.prepaid if ctx.prepaid is not None and ctx.prepaid.endpoint == model else None
        if ticket is not None:
            ctx.prepaid = None
        try:
            completion = self._models.stream_chat(
                ticket=ticket,
                model=model,
                messages=messages,
                step=step.spec.name if step is not None else None,
                role=role,
                on_delta=sink.on_delta,
                interrupted=lambda: ctx.interrupted,
                register_closer=ctx.set_closer,
                **options,
            )
            record = completion.record
            return completion
        except Interrupted as exc:
            record = exc.record  # type: ignore[attr-defined]
            if ctx.over_budget is not None:
                record.outcome = "budget_exceeded"
            ctx.check()
            raise
        except Exception as exc:
            record = getattr(exc, "record", None)
            if isinstance(exc, CapacityWait):
                # A job canceled while it waited for capacity ends canceled, not queued again.
                ctx.check()
            raise
        finally:
            if record is not None:
                self.record(record)

    def _replay(
        self,
        hit: CachedAnswer,
        model: str,
        step: RunningStep | None,
        role: str | None,
        sink: DeltaSink,
    ) -> Completion:
        """A cache hit streams its deltas as the call did, and is recorded as a model call of
        outcome `cached` that used no tokens and cost nothing."""
        started = time.perf_counter()
        for text in hit.deltas:
            self._ctx.check()
            sink.on_delta(text)
        record = CallRecord(
            model=model,
            provider=self._models.provider,
            step=step.spec.name if step is not None else None,
            role=role,
            fixed_cost=Decimal(0),
            outcome="cached",
        )
        record.latency_ms = (time.perf_counter() - started) * 1000
        self.record(record)
        return Completion(hit.text, hit.finish_reason, record)

    def _release_prepaid(self, model: str) -> None:
        """The admission taken for the job's first call, under its endpoint's provider limits,
        given back: a cached answer makes no call."""
        ticket, limits = self._ctx.prepaid, self._models.limits
        if ticket is not None and ticket.endpoint == model and limits is not None:
            self._ctx.prepaid = None
            limits.release(ticket)

    def _store_on_success(
        self, cache: ResponseCache, key: str, deltas: list[str], finish_reason: str | None
    ) -> None:
        """The answer is cached once the job has succeeded, not when the call returns: an
        answer its kind then rejected (JSON that fails the schema) would otherwise be served
        again to every retry."""
        answer = CachedAnswer(list(deltas), finish_reason)

        def store(payload: TerminalPayload) -> None:
            if isinstance(payload, SucceededPayload):
                cache.put(key, answer)

        self._ctx.after_finish(store)

    def _budget_guard(self, model: str, messages: list[dict[str, Any]]) -> Callable[[int], bool]:
        """`over(streamed)`: whether the call, having streamed that many tokens, passed the
        job's or its owner's limit (the job is then told to stop, and the stream stops at its
        next chunk). Checked before the call too: a job already at its limit calls nothing."""
        ctx, price = self._ctx, self._models.prices.price_of(model)
        tokens_in = sum(len(str(m.get("content", ""))) for m in messages) // 4 + 1

        def over(streamed: int) -> bool:
            limit = ctx.spend_limit()
            if limit is None or price is None:
                return False
            if price.cost(tokens_in, streamed) <= limit[1] and limit[1] > 0:
                return False
            ctx.exceed_budget(limit[0])
            return True

        if over(0):
            ctx.check()
        return over


def token_progress(expected_tokens: int | None) -> Callable[[int], float]:
    """Progress estimated from streamed tokens: linear against max_tokens when known, else an
    asymptote that never claims 100% before the model says it is done."""
    if expected_tokens:
        return lambda n: min(99.0, 100.0 * n / expected_tokens)
    return lambda n: 95.0 * (1.0 - math.exp(-n / 150.0))
