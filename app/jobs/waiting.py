"""Jobs waiting for a provider's capacity (docs/reliability.md#provider-limits): they stay
`queued`, consume no attempt and say why in the API (`waiting`).

A wait longer than a slot may hold is a deferral through the scheduled-job machinery: `run_at`
becomes the job's turn, `dispatched_at` NULL, and the sweeper's release of due held jobs
(app/jobs/fairness.py, by priority then age, through its owner's window) publishes it when its
turn comes, so no message waits in the broker meanwhile. The claim clears the reason.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import text

from app.jobs.payloads import EventError, RetryingPayload

if TYPE_CHECKING:
    from app.db import Database
    from app.jobs.transitions import Claim, Jobs

# What the gate before the claim needs: whether a claim could win now, the job's model, and the
# size of its input (for the token estimate) without reading the input itself.
PEEK = text("""
SELECT model, wait_reason,
       status = 'queued' AND (retry_at IS NULL OR retry_at <= now())
       AND (run_at IS NULL OR run_at <= now()) AND (expires_at IS NULL OR expires_at > now())
       AND attempt < max_attempts AS claimable,
       octet_length(CAST(input AS text)) AS input_chars,
       CASE WHEN jsonb_typeof(input -> 'max_tokens') = 'number'
            THEN (input ->> 'max_tokens')::numeric::bigint END AS max_tokens
FROM jobs WHERE id = :id
""")

# Fenced on `queued`: a job claimed, canceled or deleted meanwhile is left alone.
DEFER = text("""
UPDATE jobs SET run_at = :until, dispatched_at = NULL, wait_reason = :reason,
                wait_endpoint = :endpoint, updated_at = now()
WHERE id = :id AND status = 'queued'
RETURNING id
""")


@dataclass(frozen=True)
class Peek:
    model: str | None
    wait_reason: str | None
    claimable: bool
    input_chars: int
    max_tokens: int | None


def peek(db: Database, job_id: uuid.UUID) -> Peek | None:
    with db.engine.connect() as connection:
        row = connection.execute(PEEK, {"id": job_id}).one_or_none()
    if row is None:
        return None
    return Peek(
        row.model, row.wait_reason, bool(row.claimable), int(row.input_chars), row.max_tokens
    )


def defer(db: Database, job_id: uuid.UUID, reason: str, until: float, endpoint: str) -> bool:
    """The queued job waits until `until` (epoch seconds) for `reason`; False if it is no
    longer queued."""
    with db.engine.begin() as connection:
        row = connection.execute(
            DEFER,
            {
                "id": job_id,
                "until": datetime.fromtimestamp(until, UTC),
                "reason": reason,
                "endpoint": endpoint,
            },
        ).one_or_none()
    return row is not None


def requeue(
    jobs: Jobs,
    claim: Claim,
    seq: int,
    *,
    reason: str,
    until: float,
    endpoint: str,
    message: str,
    calls: list[dict[str, Any]] | None = None,
) -> None:
    """A running attempt stopped for capacity (a provider's 429, a wait too long for a slot)
    goes back to `queued` until `until`, and the attempt is given back: `max_attempts` grows
    by one, so the attempt numbers that fence the writes still only ever increase."""
    at = datetime.fromtimestamp(until, UTC)
    delay = max(0.0, (at - datetime.now(UTC)).total_seconds())
    payload = RetryingPayload(
        attempt=claim.attempt,
        delay=round(delay, 3),
        retry_at=at,
        error=EventError(code=reason, message=message),
    )
    jobs.fenced_update(
        claim,
        seq,
        payload,
        calls=calls,
        status="queued",
        max_attempts=claim.max_attempts + 1,
        run_at=at,
        retry_at=None,
        dispatched_at=None,
        lease_expires_at=None,
        wait_reason=reason,
        wait_endpoint=endpoint,
    )
