"""Jobs of `service_tier: "batch"`: their requests waiting for, and sent in, provider batches.

A worker that claims such a job does not call the model. It hands the job over in one fenced
write (`hand_over`): a `provider_batch_items` row with the request, a `job.provider_batch`
event (phase `pending`), and the job's lease cleared. The job stays `running`, but with no
lease it holds no worker slot, is never taken back by the sweeper (which recovers expired
leases only) and holds no place in its tenant's dispatch window (app/models.py OUTSTANDING).
Its item row is what owns it from then on; it ends when the job does (`ended_at`).

While a job is handed over, its writer is whoever holds its provider batch's row lock (the
beat task, app/execution/provider_batches.py) or a cancel, which locks the job's row; each
write is still fenced by the job's attempt and `running`, so a result and a cancel racing
each other end the job once.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

from app.db import Database
from app.jobs.sql import Effect
from app.jobs.transitions import Claim

CREATING = "creating"
SUBMITTED = "submitted"
ENDED = "ended"


def hand_over(attempt: int, model: str, body: dict[str, Any]) -> Effect:
    """The item row, written by the fenced write that hands the job over (and only if it
    wins)."""
    return Effect(
        """pb_item AS (
    INSERT INTO provider_batch_items (job_id, attempt, model, body)
    SELECT id, :pb_attempt, :pb_model, CAST(:pb_body AS jsonb) FROM changed
)""",
        {"pb_attempt": attempt, "pb_model": model, "pb_body": json.dumps(body)},
    )


def end_item(attempt: int) -> Effect:
    """Ends the job's item, in the statement that ends the job."""
    return Effect(
        """pb_end AS (
    UPDATE provider_batch_items SET ended_at = now()
    WHERE job_id IN (SELECT id FROM changed) AND attempt = :pb_end_attempt AND ended_at IS NULL
)""",
        {"pb_end_attempt": attempt},
    )


# Collecting ---------------------------------------------------------------------------------

DUE_MODELS = text("""
SELECT model FROM provider_batch_items
WHERE provider_batch IS NULL AND ended_at IS NULL
GROUP BY model
HAVING min(created_at) <= now() - make_interval(secs => :window) OR count(*) >= :max_size
""")

PICK = text("""
SELECT job_id, attempt FROM provider_batch_items
WHERE provider_batch IS NULL AND ended_at IS NULL AND model = :model
ORDER BY created_at
LIMIT :max_size
FOR UPDATE SKIP LOCKED
""")


def collect(db: Database, window: float, max_size: int, max_batches: int = 20) -> list[uuid.UUID]:
    """Groups pending items into new provider batches, per model: a model's items once its
    oldest has waited `window` seconds, or once it has `max_size` of them. Each batch row is
    committed, in state `creating` with its items, before anything is sent (the caller sends
    it). Two processes collecting at once never take the same items (SKIP LOCKED)."""
    with db.engine.begin() as connection:
        params = {"window": window, "max_size": max_size}
        models = connection.execute(DUE_MODELS, params).scalars().all()
    made: list[uuid.UUID] = []
    for model in models:
        while len(made) < max_batches:
            batch_id = _collect_one(db, model, max_size)
            if batch_id is None:
                break
            made.append(batch_id)
            if not _has_full_batch(db, model, max_size):
                break
    return made


def _collect_one(db: Database, model: str, max_size: int) -> uuid.UUID | None:
    with db.engine.begin() as connection:
        picked = connection.execute(PICK, {"model": model, "max_size": max_size}).all()
        if not picked:
            return None
        batch_id = uuid.uuid4()
        connection.execute(
            text(
                "INSERT INTO provider_batches (id, model, state, request_count) "
                "VALUES (:id, :model, 'creating', :count)"
            ),
            {"id": batch_id, "model": model, "count": len(picked)},
        )
        connection.execute(
            text(
                "UPDATE provider_batch_items SET provider_batch = :batch "
                "WHERE (job_id, attempt) IN (SELECT * FROM unnest(CAST(:ids AS uuid[]), "
                "CAST(:attempts AS int[])))"
            ),
            {
                "batch": batch_id,
                "ids": [row.job_id for row in picked],
                "attempts": [row.attempt for row in picked],
            },
        )
    return batch_id


def _has_full_batch(db: Database, model: str, max_size: int) -> bool:
    with db.engine.begin() as connection:
        count = connection.execute(
            text(
                "SELECT count(*) FROM (SELECT 1 FROM provider_batch_items WHERE model = :model "
                "AND provider_batch IS NULL AND ended_at IS NULL LIMIT :max_size) AS pending"
            ),
            {"model": model, "max_size": max_size},
        ).scalar_one()
    return bool(count >= max_size)


# A batch's row and its open jobs --------------------------------------------------------------


@dataclass(frozen=True)
class BatchRow:
    id: uuid.UUID
    model: str
    state: str
    provider_batch_id: str | None
    provider_status: str | None
    request_count: int
    completed: int
    failed: int
    created_at: datetime
    submitted_at: datetime | None
    cancel_requested_at: datetime | None


def lock_batch(connection: Connection, batch_id: uuid.UUID, state: str) -> BatchRow | None:
    """The batch's row, locked for the caller's transaction, if it is in `state` and no other
    process holds it."""
    row = connection.execute(
        text(
            "SELECT id, model, state, provider_batch_id, provider_status, request_count, "
            "completed, failed, created_at, submitted_at, cancel_requested_at "
            "FROM provider_batches WHERE id = :id AND state = :state FOR UPDATE SKIP LOCKED"
        ),
        {"id": batch_id, "state": state},
    ).one_or_none()
    return None if row is None else BatchRow(**row._mapping)


def open_batches(db: Database, state: str, limit: int = 100) -> list[uuid.UUID]:
    with db.engine.begin() as connection:
        return list(
            connection.execute(
                text(
                    "SELECT id FROM provider_batches WHERE state = :state "
                    "ORDER BY polled_at NULLS FIRST, created_at LIMIT :limit"
                ),
                {"state": state, "limit": limit},
            ).scalars()
        )


@dataclass(frozen=True)
class OpenItem:
    """A job of the batch that has not ended, as its row is now."""

    claim: Claim
    body: dict[str, Any]
    cancel_requested: bool

    @property
    def custom_id(self) -> str:
        return custom_id(self.claim.job_id, self.claim.attempt)


def custom_id(job_id: uuid.UUID, attempt: int) -> str:
    """A request's id in the batch: the job and its attempt, so a line maps back to exactly
    the attempt that handed it over."""
    return f"{job_id}:{attempt}"


OPEN_ITEMS = text("""
SELECT j.id, j.owner, j.kind, j.input, j.attempt, j.max_attempts, j.priority, j.model,
       j.models, j.last_seq, j.batch_id, j.cost_usd, j.started_at, j.max_cost_usd,
       j.cancel_requested_at, i.body
FROM provider_batch_items i JOIN jobs j ON j.id = i.job_id AND j.attempt = i.attempt
WHERE {where} AND i.ended_at IS NULL
  AND j.status = 'running' AND j.lease_expires_at IS NULL
ORDER BY i.created_at
""")


def open_items(connection: Connection, batch_id: uuid.UUID) -> list[OpenItem]:
    """The batch's jobs that are still running, handed over to it."""
    rows = connection.execute(
        text(OPEN_ITEMS.text.format(where="i.provider_batch = :batch")), {"batch": batch_id}
    ).all()
    return [_open_item(row) for row in rows]


def cancel_requested_items(db: Database, limit: int = 500) -> list[OpenItem]:
    """Handed-over jobs whose cancel was asked for without ending them (a batch of jobs
    canceled, or a cancel that raced the hand-over)."""
    query = OPEN_ITEMS.text.format(where="j.cancel_requested_at IS NOT NULL") + " LIMIT :limit"
    with db.engine.begin() as connection:
        rows = connection.execute(text(query), {"limit": limit}).all()
    return [_open_item(row) for row in rows]


def _open_item(row: Any) -> OpenItem:
    return OpenItem(Claim.of_row(row), row.body, row.cancel_requested_at is not None)


def current_seq(db: Database, job_id: uuid.UUID) -> int:
    """The job's last seq now: a handed-over job's writes follow each other (see the module's
    docstring), so the next is this plus one."""
    with db.engine.begin() as connection:
        return int(
            connection.execute(
                text("SELECT last_seq FROM jobs WHERE id = :id"), {"id": job_id}
            ).scalar_one()
        )


def record_submission(
    connection: Connection,
    batch_id: uuid.UUID,
    provider_batch_id: str,
    file_id: str | None,
    status: str,
) -> None:
    connection.execute(
        text(
            "UPDATE provider_batches SET state = 'submitted', provider_batch_id = :provider_id, "
            "input_file_id = coalesce(:file_id, input_file_id), provider_status = :status, "
            "submitted_at = now(), polled_at = now() WHERE id = :id"
        ),
        {"id": batch_id, "provider_id": provider_batch_id, "file_id": file_id, "status": status},
    )


def record_poll(
    connection: Connection,
    batch_id: uuid.UUID,
    status: str,
    completed: int,
    failed: int,
    error: str | None = None,
) -> None:
    connection.execute(
        text(
            "UPDATE provider_batches SET provider_status = :status, completed = :completed, "
            "failed = :failed, error = coalesce(:error, error), polled_at = now() WHERE id = :id"
        ),
        {
            "id": batch_id,
            "status": status,
            "completed": completed,
            "failed": failed,
            "error": error,
        },
    )


def record_cancel(connection: Connection, batch_id: uuid.UUID) -> None:
    connection.execute(
        text("UPDATE provider_batches SET cancel_requested_at = now() WHERE id = :id"),
        {"id": batch_id},
    )


def forget_ended(db: Database) -> int:
    """Deletes the rows of ended batches none of whose jobs is left (deleted by their owner or
    by retention): a batch's row lives as long as one of its jobs does."""
    with db.engine.begin() as connection:
        result = connection.execute(
            text(
                "DELETE FROM provider_batches b WHERE state = 'ended' AND NOT EXISTS "
                "(SELECT 1 FROM provider_batch_items i WHERE i.provider_batch = b.id)"
            )
        )
    return int(result.rowcount or 0)


def record_end(connection: Connection, batch_id: uuid.UUID, error: str | None = None) -> None:
    connection.execute(
        text(
            "UPDATE provider_batches SET state = 'ended', ended_at = now(), "
            "error = coalesce(:error, error) WHERE id = :id"
        ),
        {"id": batch_id, "error": error},
    )
