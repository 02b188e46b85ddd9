"""Runs one delivery of a job: claim, run the kind, record the outcome.

Called by the thin Celery task. Every outcome is written as a fenced transition; an error is
recorded first and then either retried (a new attempt, visible as `job.retrying`) or failed
with a precise code. Nothing is swallowed: an unexpected exception is recorded as
`internal_error` and re-raised so Celery and the logs see it too.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from enum import StrEnum

from pydantic import BaseModel, ValidationError

from app import logs
from app.execution.capacity import Deferred, admit_before_claim
from app.execution.leases import active_jobs
from app.jobs import transitions
from app.jobs.payloads import CanceledPayload, EventError, FailedPayload, SucceededPayload
from app.jobs.transitions import Jobs, LeaseLost
from app.kinds import Kind, KindError, get_kind
from app.kinds.context import JobBudgetExceeded, JobCanceled, JobContext, JobTimedOut
from app.llm.client import ModelClient
from app.llm.errors import ModelError
from app.llm.limits import CapacityWait, WaitReason

logger = logging.getLogger(__name__)


class Outcome(StrEnum):
    SKIPPED = "skipped"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RETRYING = "retrying"
    CANCELED = "canceled"
    LEASE_LOST = "lease_lost"
    WAITING = "waiting"  # queued again for a provider's capacity, no attempt consumed
    BATCHED = "batched"  # handed to a provider batch (app/execution/provider_batches.py)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def execute_job(job_id: uuid.UUID, jobs: Jobs, model_client: ModelClient) -> Outcome:
    limits = model_client.limits
    ticket = None
    if limits is not None:
        admission = admit_before_claim(job_id, jobs, limits)
        if isinstance(admission, Deferred):
            return Outcome.WAITING
        ticket = admission
    claim = jobs.claim_job(job_id, worker_name())
    if claim is None:
        if ticket is not None and limits is not None:
            limits.release(ticket)
        logger.info(
            "not claimable (duplicate delivery, canceled or early retry)", extra={"job_id": job_id}
        )
        return Outcome.SKIPPED
    active_jobs.ensure_started(jobs)
    ctx = JobContext(claim, jobs, model_client)
    ctx.prepaid = ticket
    active_jobs.track(ctx)
    try:
        with logs.job_context(job_id, claim.attempt, claim.kind, claim.owner):
            return _run_attempt(ctx)
    except LeaseLost:
        # Raised while recording an outcome: the sweeper took the job meanwhile, and the newer
        # attempt's state is the one that counts.
        logger.warning("outcome not recorded: lease lost", extra={"job_id": job_id})
        return Outcome.LEASE_LOST
    finally:
        active_jobs.untrack(ctx)
        ctx.record_pending_calls()


def _run_attempt(ctx: JobContext) -> Outcome:
    claim = ctx.claim
    try:
        kind = get_kind(claim.kind)
        ctx.declare_steps(kind.steps)
        job_input = kind.Input.model_validate(claim.input)
        if kind.batch_request is not None and getattr(job_input, "batched", False):
            return _hand_to_provider_batch(ctx, kind, job_input)
        output = kind.run(ctx, job_input)
        ctx.check()
        ctx.finish(
            SucceededPayload(attempt=claim.attempt),
            output=output.model_dump(mode="json"),
            progress=100.0,
            error_code=None,
            error_message=None,
            cached=ctx.llm.all_cached,
        )
        return Outcome.SUCCEEDED
    except LeaseLost:
        logger.warning("stopped: lease lost", extra={"job_id": ctx.job_id})
        return Outcome.LEASE_LOST
    except JobCanceled:
        ctx.finish(
            CanceledPayload(reason="requested", attempt=claim.attempt), output=partial_output(ctx)
        )
        return Outcome.CANCELED
    except CapacityWait as exc:
        return _wait_for_capacity(ctx, exc)
    except ModelError as exc:
        return _model_failure(ctx, exc)
    except (ValidationError, KindError) as exc:
        _fail(ctx, "invalid_input", str(exc))
        return Outcome.FAILED
    except JobBudgetExceeded as exc:
        _fail(ctx, "budget_exceeded", _budget_message(ctx, exc.limit), partial_output(ctx))
        return Outcome.FAILED
    except JobTimedOut:
        limit = "its timeout_seconds" if ctx.claim.timeout_seconds else "the time limit"
        _fail(
            ctx,
            "time_limit_exceeded",
            f"the job ran longer than {limit} ({ctx.time_limit:g} s)",
        )
        return Outcome.FAILED
    except Exception as exc:
        _fail(ctx, "internal_error", f"{type(exc).__name__}: {exc}")
        raise


def _hand_to_provider_batch(ctx: JobContext, kind: Kind, job_input: BaseModel) -> Outcome:
    """A job of `service_tier: "batch"`: its request waits for a provider batch, and the slot
    is free at once (the job stays running, without a lease, until its batch answers)."""
    assert kind.batch_request is not None
    model = ctx.llm.model_for_job()
    ctx.hand_over_to_provider_batch(model, {"model": model, **kind.batch_request(job_input)})
    limits = ctx.llm.client.limits
    if ctx.prepaid is not None and limits is not None:
        # Admitted under the endpoint's limits before the claim, for a call it does not make.
        limits.release(ctx.prepaid)
        ctx.prepaid = None
    logger.info("handed to a provider batch", extra={"job_id": ctx.job_id})
    return Outcome.BATCHED


def _model_failure(ctx: JobContext, exc: ModelError) -> Outcome:
    attempts_left = ctx.attempt < ctx.claim.max_attempts
    if exc.retryable and attempts_left:
        settings = ctx.settings
        delay = transitions.retry_delay(
            ctx.attempt, settings.retry_base_delay, settings.retry_max_delay, exc.retry_after
        )
        logger.info("retrying in %.2f s after %s", delay, exc.code, extra={"job_id": ctx.job_id})
        ctx.schedule_retry(delay, exc.code, exc.message)
        return Outcome.RETRYING
    message = exc.message
    if exc.retryable:
        message = f"{message} (gave up after {ctx.attempt} attempts)"
    _fail(ctx, exc.code, message)
    return Outcome.FAILED


def _wait_for_capacity(ctx: JobContext, exc: CapacityWait) -> Outcome:
    """Back to `queued` until the job's turn, its attempt given back, unless it has been given
    back too often already (a provider that answers nothing but 429): then the wait is an
    ordinary retryable failure, which consumes the attempt."""
    limits = ctx.llm.client.limits
    wait = exc.wait
    if limits is None or ctx.attempt > ctx.settings.provider_max_requeues:
        delay = max(0.0, wait.until - time.time())
        return _model_failure(
            ctx, ModelError("model_rate_limited", exc.message, retryable=True, retry_after=delay)
        )
    # A call the provider refused had been admitted in its turn: the job comes back when the
    # pause ends, in its turn still, rather than at the end of the line. A wait for capacity
    # that never came takes a turn.
    until = wait.until if wait.reason is WaitReason.PAUSED else limits.reserve_turn(wait, 0)
    ctx.requeue_for_capacity(wait.reason.value, until, wait.endpoint, exc.message)
    logger.info(
        "queued again for %s of %s, attempt given back",
        wait.reason.value,
        wait.endpoint,
        extra={"job_id": ctx.job_id},
    )
    return Outcome.WAITING


def partial_output(ctx: JobContext) -> dict[str, str] | None:
    partial = "".join(ctx.text_so_far)
    return {"partial_text": partial} if partial else None


def _budget_message(ctx: JobContext, limit: str) -> str:
    if limit == "max_cost_usd":
        return f"the job's cost passed its max_cost_usd ({ctx.claim.max_cost_usd} US dollars)"
    return f"the {limit} budget of the job's owner was used up"


def _fail(ctx: JobContext, code: str, message: str, output: dict[str, str] | None = None) -> None:
    """The job fails with `code`; `output` (a budget's stop keeps the partial text) is kept."""
    logger.warning("failed: %s: %s", code, message, extra={"job_id": ctx.job_id})
    values = {"output": output} if output is not None else {}
    ctx.finish(
        FailedPayload(attempt=ctx.attempt, error=EventError(code=code, message=message)),
        error_code=code,
        error_message=message[:4000],
        **values,
    )
