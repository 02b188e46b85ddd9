"""Waiting for a provider's capacity without burning attempts (docs/reliability.md).

Before the claim, a worker admits the job's first model call under its endpoint's limits
(app/llm/limits.py): admitted, the job is claimed and the call goes out with that admission;
not admitted for longer than a slot may wait, the job is deferred to its turn in the endpoint's
line and stays `queued` with its attempt unchanged. A call later in the job that must wait (or a
provider's 429) puts the job back the same way, with its attempt given back (waiting.requeue),
at most `provider_max_requeues` times per job.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

from app.jobs import waiting
from app.jobs.transitions import Jobs
from app.llm.limits import CapacityWait, ProviderLimits, Ticket, Wait

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Deferred:
    """The job was not claimed: it waits for `until` (epoch seconds) for `reason`."""

    reason: str
    until: float


def admit_before_claim(
    job_id: uuid.UUID, jobs: Jobs, limits: ProviderLimits
) -> Ticket | Deferred | None:
    """The admission of the job's first call, a deferral, or None when the job's endpoint
    has no limits or the job could not be claimed anyway (the claim then says so)."""
    job = waiting.peek(jobs.db, job_id)
    if job is None or not job.claimable or limits.governs(job.model) is None:
        return None
    assert job.model is not None
    # The input's JSON at about 4 characters a token, as a prompt is estimated.
    tokens = job.input_chars // 4 + 1 + (job.max_tokens or limits.default_output)
    try:
        # A job deferred before comes back at its turn: the line does not send it back.
        return limits.acquire(job.model, tokens, in_turn=job.wait_reason is not None)
    except CapacityWait as exc:
        return defer(jobs, job_id, limits, exc.wait, tokens)


def defer(
    jobs: Jobs, job_id: uuid.UUID, limits: ProviderLimits, wait: Wait, tokens: int
) -> Deferred:
    turn = limits.reserve_turn(wait, tokens)
    waiting.defer(jobs.db, job_id, wait.reason.value, turn, wait.endpoint)
    logger.info(
        "waiting %.1f s for %s of %s",
        turn - time.time(),
        wait.reason.value,
        wait.endpoint,
        extra={"job_id": job_id},
    )
    return Deferred(wait.reason.value, turn)
