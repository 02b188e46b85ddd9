"""Retention: finished jobs older than their owner's retention are deleted, with everything
that hangs off them, a small batch per transaction.

Whose jobs and how old: a tenant's own `tenants.retention_days` (0: forever), else the
deployment's `CONVEYOR_RETENTION_DAYS` (unset or 0: forever). Only finished jobs (succeeded,
failed, canceled) whose `finished_at` is older than that go; a job with a webhook delivery still
pending waits until it succeeds or gives up.

One batch is one statement, in its own short transaction: it locks up to `batch_size` of one
owner's oldest expired jobs (`FOR UPDATE SKIP LOCKED`: a job a request or another run holds is
left for the next batch), deletes their events and model calls in the statement, and the jobs;
the foreign keys do the rest (ON DELETE CASCADE: steps, webhook deliveries and their attempts;
SET NULL: artifacts, canvas objects, a retry's `retry_of`). Then, outside the transaction:
the batches left with no job are deleted, the jobs' Redis streams are unlinked, and the
artifacts whose job went are swept (blob, then row) by `Artifacts.sweep_orphans`, the path a
deleted job's artifacts always take. Between two batches the run waits in proportion to the
batch's duration (`Policy.pause_after`: by default three times as long, at least `pause`), and it
stops after `max_jobs`: a large backlog is spread over time and over several runs, never
holding locks, a core or the disk for long. What a purge still costs POST /jobs is measured in
docs/performance.md#retention.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from sqlalchemy import text

from app.jobs.states import TERMINAL

if TYPE_CHECKING:
    from app.config import Settings
    from app.db import Database
    from app.jobs.artifacts import Artifacts
    from app.jobs.events import EventBus

logger = logging.getLogger(__name__)

FINISHED = ", ".join(f"'{status.value}'" for status in sorted(TERMINAL))
# Orphaned artifacts swept per call, and calls per batch at most (the sweeper takes the rest).
ARTIFACT_SWEEP = 200
MAX_ARTIFACT_SWEEPS = 20

# Every owner with finished jobs, read off the index jobs_owner_finished by a skip scan (one
# probe per owner rather than a scan of every job), with its tenant row's retention if any.
OWNERS_OF_FINISHED = text(f"""
WITH RECURSIVE owners AS (
    (SELECT owner FROM jobs WHERE status IN ({FINISHED}) ORDER BY owner LIMIT 1)
    UNION ALL
    SELECT (SELECT j.owner FROM jobs j
            WHERE j.status IN ({FINISHED}) AND j.owner > o.owner ORDER BY j.owner LIMIT 1)
    FROM owners o WHERE o.owner IS NOT NULL
)
SELECT o.owner, t.retention_days FROM owners o LEFT JOIN tenants t ON t.owner = o.owner
WHERE o.owner IS NOT NULL
""")

# Without a deployment default only tenants that set a retention have one.
TENANTS_WITH_RETENTION = text("""
SELECT owner, retention_days FROM tenants WHERE retention_days > 0 ORDER BY owner
""")

# One batch. The events and calls are deleted here rather than by their foreign keys'
# cascade, as one join each instead of one lookup per job; the cascade then finds nothing.
PURGE_BATCH = text(f"""
WITH doomed AS (
    SELECT j.id FROM jobs j
    WHERE j.owner = :owner AND j.status IN ({FINISHED})
      AND j.finished_at < now() - make_interval(days => :days)
      AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d
                      WHERE d.job_id = j.id AND d.status = 'pending')
    ORDER BY j.finished_at
    LIMIT :batch
    FOR UPDATE OF j SKIP LOCKED
), events AS (
    DELETE FROM job_events WHERE job_id IN (SELECT id FROM doomed) RETURNING 1
), calls AS (
    DELETE FROM model_calls WHERE job_id IN (SELECT id FROM doomed) RETURNING 1
), gone AS (
    DELETE FROM jobs WHERE id IN (SELECT id FROM doomed) RETURNING id, batch_id
)
SELECT (SELECT count(*) FROM events) AS events, (SELECT count(*) FROM calls) AS calls,
       (SELECT array_agg(id) FROM gone) AS ids,
       (SELECT array_agg(DISTINCT batch_id) FROM gone WHERE batch_id IS NOT NULL) AS batches
""")

# A batch (POST /batches) is deleted with the last of its jobs.
EMPTY_BATCHES = text("""
DELETE FROM batches b
WHERE b.id = ANY(CAST(:ids AS uuid[]))
  AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.batch_id = b.id)
""")


@dataclass(frozen=True)
class Policy:
    default_days: int | None
    batch_size: int
    pause: float
    max_jobs: int
    # The share of the time a run keeps the database busy, at most (see `pause_after`).
    max_busy: float = 0.25

    @classmethod
    def of(cls, settings: Settings) -> Policy:
        return cls(
            settings.retention_days,
            settings.retention_batch_size,
            settings.retention_pause,
            settings.retention_max_jobs,
            settings.retention_max_busy,
        )

    def pause_after(self, batch_seconds: float) -> float:
        """A batch of t seconds is followed by a wait of t (1 - max_busy) / max_busy: a run
        slows down by itself when a loaded database makes its batches slower."""
        return max(self.pause, batch_seconds * (1 - self.max_busy) / self.max_busy)


@dataclass
class PurgeReport:
    owners: int = 0
    jobs: int = 0
    events: int = 0
    model_calls: int = 0
    batches: int = 0
    artifacts: int = 0
    transactions: int = 0
    seconds: float = 0.0
    # The run stopped at `max_jobs`: the next one goes on.
    capped: bool = False


def retention_days(tenant_days: int | None, default_days: int | None) -> int | None:
    """Days an owner's finished jobs are kept; None: forever. A tenant's own setting wins, and
    0 (the tenant's or the deployment's) is forever."""
    days = tenant_days if tenant_days is not None else default_days
    return days or None


def plan(db: Database, default_days: int | None) -> list[tuple[str, int]]:
    """(owner, days) of every owner whose finished jobs have a retention."""
    query = OWNERS_OF_FINISHED if default_days else TENANTS_WITH_RETENTION
    with db.engine.connect() as connection:
        rows = connection.execute(query).all()
    owners = [(row.owner, retention_days(row.retention_days, default_days)) for row in rows]
    return [(owner, days) for owner, days in owners if days is not None]


def purge(db: Database, bus: EventBus, artifacts: Artifacts, policy: Policy) -> PurgeReport:
    """One retention run: every owner's expired finished jobs, oldest first, until none is
    left or `policy.max_jobs` are gone."""
    began = time.monotonic()
    report = PurgeReport()
    for owner, days in plan(db, policy.default_days):
        report.owners += 1
        while not report.capped:
            batch = min(policy.batch_size, policy.max_jobs - report.jobs)
            batch_began = time.monotonic()
            deleted = _purge_batch(db, bus, artifacts, owner, days, batch, report)
            report.capped = report.jobs >= policy.max_jobs
            if deleted < batch:
                break
            time.sleep(policy.pause_after(time.monotonic() - batch_began))
        if report.capped:
            break
    report.seconds = round(time.monotonic() - began, 3)
    if report.jobs:
        logger.info("retention: %s", asdict(report))
    return report


def _purge_batch(
    db: Database,
    bus: EventBus,
    artifacts: Artifacts,
    owner: str,
    days: int,
    batch: int,
    report: PurgeReport,
) -> int:
    with db.engine.begin() as connection:
        row = connection.execute(PURGE_BATCH, {"owner": owner, "days": days, "batch": batch}).one()
        batch_ids = list(row.batches or [])
        if batch_ids:
            report.batches += connection.execute(EMPTY_BATCHES, {"ids": batch_ids}).rowcount
    report.transactions += 1
    job_ids: list[uuid.UUID] = list(row.ids or [])
    if not job_ids:
        return 0
    report.jobs += len(job_ids)
    report.events += row.events
    report.model_calls += row.calls
    bus.delete_streams(job_ids)
    for _ in range(MAX_ARTIFACT_SWEEPS):
        swept = artifacts.sweep_orphans(ARTIFACT_SWEEP)
        report.artifacts += swept
        if swept < ARTIFACT_SWEEP:
            break
    return len(job_ids)
