"""The hot-path transitions as prepared SQL: each is ONE statement (data-modifying CTEs) that
changes the job and appends its event, so a transition is one round trip and one commit.

Why not the ORM here: on these machines an ORM-enabled UPDATE plus its event cost about 4-6 ms
of CPU per transition against 0.6 ms for the same work as one precompiled statement, and a
worker process has one core's worth of CPU (the GIL) for hundreds of concurrent jobs
(docs/performance.md). Everything that is not per-job-per-second stays on the ORM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from sqlalchemy import TextClause, text

from app.jobs.fairness import HELD, room_sql

# Any number of jobs (a group commit of concurrent POSTs) with their job.queued events, in one
# statement: the rows travel as one JSON array, each with its event's payload (`event`). An
# Idempotency-Key already used by the owner (in the table or earlier in the same array) inserts
# nothing and returns no row. A job due now keeps its `dispatched_at` (to be published) only
# while its owner's dispatch window has room, by priority then position; the others are stored
# held (app/jobs/fairness.py). Run after the owners' locks (fairness.lock_owners) when the
# window is on; `window` and `default_cap` are fairness.DispatchWindow.params().
CREATE = text(f"""
WITH new AS (
    SELECT * FROM jsonb_to_recordset(CAST(:jobs AS jsonb)) AS n(
        id uuid, owner text, kind text, input jsonb, priority int, max_attempts int,
        idempotency_key text, request_hash text, model text, models jsonb, retry_of uuid,
        webhook jsonb, at timestamptz, run_at timestamptz, expires_at timestamptz,
        timeout_seconds int, dispatched_at timestamptz, event jsonb, ord int,
        max_cost_usd numeric)
), room AS (
    SELECT o.owner, {room_sql("o.owner", "t")} AS room
    FROM (SELECT DISTINCT owner FROM new) AS o LEFT JOIN tenants t ON t.owner = o.owner
), ranked AS (
    SELECT new.*, room.room, row_number() OVER (
        PARTITION BY new.owner, new.dispatched_at IS NULL ORDER BY new.priority DESC, new.ord
    ) AS place
    FROM new JOIN room ON room.owner = new.owner
), job AS (
    INSERT INTO jobs (id, owner, kind, status, input, priority, max_attempts, idempotency_key,
                      request_hash, model, models, retry_of, webhook, last_seq, created_at,
                      updated_at, run_at, expires_at, timeout_seconds, dispatched_at,
                      max_cost_usd)
    SELECT id, owner, kind, 'queued', input, priority, max_attempts, idempotency_key,
           request_hash, model, models, retry_of, webhook, 1, at, at, run_at, expires_at,
           timeout_seconds, CASE WHEN place <= room THEN dispatched_at END, max_cost_usd
    FROM ranked ORDER BY ord
    ON CONFLICT (owner, idempotency_key) DO NOTHING
    RETURNING *
), queued AS (
    INSERT INTO job_events (job_id, seq, type, at, data)
    SELECT job.id, 1, :event_type, new.at, new.event FROM job JOIN new ON new.id = job.id
)
SELECT * FROM job
""")

# `data` is the job.started payload as its model (payloads.StartedPayload) writes it; the
# statement only puts in the attempt number, which nobody knows before the compare-and-set
# has won. The job's checkpoints (finished steps) come back with it, so the attempt resumes
# after them.
CLAIM = text("""
WITH claimed AS (
    UPDATE jobs
    SET status = 'running', attempt = attempt + 1,
        lease_expires_at = now() + make_interval(secs => :lease_seconds), worker = :worker,
        progress = 0, retry_at = NULL, started_at = coalesce(started_at, now()),
        updated_at = now(), last_seq = last_seq + 1, wait_reason = NULL, wait_endpoint = NULL
    WHERE id = :id AND status = 'queued' AND (retry_at IS NULL OR retry_at <= now())
      AND (run_at IS NULL OR run_at <= now()) AND (expires_at IS NULL OR expires_at > now())
      AND attempt < max_attempts
    RETURNING id, owner, kind, input, attempt, max_attempts, priority, model, models, last_seq,
              batch_id, timeout_seconds, max_cost_usd, cost_usd, started_at,
              -- How long it waited to be claimed (a metric): the subquery reads the row as the
              -- statement found it, before this UPDATE cleared its retry_at.
              extract(epoch FROM now() - (
                  SELECT greatest(before.created_at, before.run_at, before.retry_at)
                  FROM jobs AS before WHERE before.id = jobs.id
              )) AS waited_seconds
), started AS (
    INSERT INTO job_events (job_id, seq, type, at, data)
    SELECT id, last_seq, :type, :at, jsonb_set(CAST(:data AS jsonb), '{attempt}', to_jsonb(attempt))
    FROM claimed
)
SELECT claimed.*, (
    SELECT jsonb_agg(jsonb_build_object(
        'name', s.name, 'attempt', s.attempt, 'output', s.output, 'tokens_in', s.tokens_in,
        'tokens_out', s.tokens_out, 'cost_usd', s.cost_usd))
    FROM job_steps s WHERE s.job_id = claimed.id
) AS steps
FROM claimed
""")

# Model calls travel as one JSON array and are inserted whether or not the fenced update wins:
# the money was spent either way. Their cost is added to the owner's spend of the day too.
_CALLS = """
calls AS (
    INSERT INTO model_calls (job_id, attempt, provider, model, step, role, tokens_in,
                             tokens_out, cost_usd, reported_cost_usd, latency_ms, ttft_ms,
                             outcome, error_message, started_at)
    SELECT :job_id, :attempt, c.provider, c.model, c.step, c.role, c.tokens_in, c.tokens_out,
           c.cost_usd, c.reported_cost_usd, c.latency_ms, c.ttft_ms, c.outcome,
           c.error_message, c.started_at
    FROM jsonb_to_recordset(CAST(:calls AS jsonb)) AS c(
        provider text, model text, step text, role text, tokens_in int, tokens_out int,
        cost_usd numeric, reported_cost_usd numeric, latency_ms float8, ttft_ms float8,
        outcome text, error_message text, started_at timestamptz)
), spend AS (
    -- The owner's spend of the (UTC) day, counted by the statement that records the calls and
    -- from the same rows, win or lose: a budget sees exactly what model_calls holds, even
    -- after a crash. Reading `changed` first makes every such statement lock the job's row
    -- before the owner's counter, so two of them never wait on each other in opposite order.
    INSERT INTO tenant_spend AS s (owner, day, cost_usd)
    SELECT :owner, (now() AT TIME ZONE 'UTC')::date,
           sum(coalesce(c.reported_cost_usd, c.cost_usd))
    FROM jsonb_to_recordset(CAST(:calls AS jsonb)) AS c(
        cost_usd numeric, reported_cost_usd numeric)
    WHERE (SELECT count(*) FROM changed) >= 0
    HAVING sum(coalesce(c.reported_cost_usd, c.cost_usd)) > 0
    ON CONFLICT (owner, day) DO UPDATE SET cost_usd = s.cost_usd + EXCLUDED.cost_usd
)"""

# A finished step's checkpoint rides on the fenced write that announces it: written only if
# that write won, so a worker that lost its lease can never checkpoint anything.
_CHECKPOINT = """
checkpoint AS (
    INSERT INTO job_steps (job_id, name, attempt, output, tokens_in, tokens_out, cost_usd,
                           started_at)
    SELECT id, c.name, :attempt, coalesce(c.output, 'null'::jsonb), c.tokens_in,
           c.tokens_out, c.cost_usd, c.started_at
    FROM changed, jsonb_to_record(CAST(:checkpoint AS jsonb)) AS c(
        name text, output jsonb, tokens_in bigint, tokens_out bigint, cost_usd numeric,
        started_at timestamptz)
    ON CONFLICT (job_id, name) DO NOTHING
),"""


@dataclass(frozen=True)
class Effect:
    """A write that must happen exactly when a fenced write wins, in its statement: `cte` is one
    data-modifying CTE, `name AS (...)`, that reads the `changed` CTE (one row, the job's id,
    when the write won; none when the attempt no longer holds the job) and its own `params`,
    named with a prefix of its own. Publishing an attempt's artifacts and saving a canvas job's
    objects are effects of the job's successful finish."""

    cte: str
    params: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


# A job.progress event the worker sent live earlier, written by the attempt's next write.
_PROGRESS_EVENT = """progress_event AS (
    INSERT INTO job_events (job_id, seq, type, at, data)
    SELECT id, :progress_seq, :progress_type, :progress_at, CAST(:progress_data AS jsonb)
    FROM changed
)"""


def progress_event_effect(event: Any) -> Effect:
    """`event` (a job.progress Event) in the statement of the attempt's next fenced write."""
    return Effect(
        _PROGRESS_EVENT,
        {
            "progress_seq": event.seq,
            "progress_type": event.type.value,
            "progress_at": event.at,
            "progress_data": json.dumps(event.data),
        },
    )


# A worker process's heartbeat: every lease it holds renewed in one statement, with the
# progress each job reached since (its job.progress event, already live, made durable; the
# job's progress column unless a newer write of its own is already there). A job missing from
# the answer is no longer this attempt's.
RENEW_LEASES = text("""
WITH held AS (
    SELECT * FROM jsonb_to_recordset(CAST(:held AS jsonb)) AS h(
        id uuid, attempt int, seq int, at timestamptz, data jsonb, progress float8)
), renewed AS (
    UPDATE jobs
    SET lease_expires_at = now() + make_interval(secs => :lease_seconds),
        progress = CASE WHEN h.seq > jobs.last_seq THEN h.progress ELSE jobs.progress END,
        updated_at = CASE WHEN h.seq > jobs.last_seq THEN now() ELSE jobs.updated_at END,
        last_seq = greatest(jobs.last_seq, coalesce(h.seq, 0))
    FROM held h
    -- A job its worker just handed to a provider batch has no lease, and must not get one
    -- back from a renewal that raced the hand-over: the sweeper would then take it back when
    -- that lease ran out.
    WHERE jobs.id = h.id AND jobs.attempt = h.attempt AND jobs.status = 'running'
      AND jobs.lease_expires_at IS NOT NULL
    RETURNING jobs.id, jobs.cancel_requested_at, h.seq, h.at, h.data
), progress_events AS (
    INSERT INTO job_events (job_id, seq, type, at, data)
    SELECT id, seq, :progress_type, at, data FROM renewed WHERE seq IS NOT NULL
)
SELECT id, cancel_requested_at FROM renewed
""")


JSON_COLUMNS = frozenset({"output"})
TIMESTAMP_EXPRESSIONS = {"finished_at": "now()", "lease_expires_at": "NULL"}


@lru_cache(maxsize=64)
def fenced(
    columns: tuple[str, ...],
    checkpoint: bool = False,
    effects: tuple[str, ...] = (),
    probe_held: bool = False,
) -> TextClause:
    """The lease holder's write: set `columns` (plus seq, usage totals and updated_at) only
    while its attempt still holds the job, append the event, record model calls and, with
    `checkpoint`, a finished step, plus any `effects` (Effect.cte). Returns one row with
    `changed` = 1 when the write won, 0 when the lease was lost; with `probe_held`, also
    `held`: whether the job's owner has held jobs (app/jobs/fairness.py) for a finish to
    release, so an owner with none costs the finish no transaction more."""
    held = f", EXISTS (SELECT 1 FROM jobs WHERE owner = :owner AND {HELD}) AS held"
    assignments = []
    for column in columns:
        if column in TIMESTAMP_EXPRESSIONS:
            assignments.append(f"{column} = {TIMESTAMP_EXPRESSIONS[column]}")
        elif column in JSON_COLUMNS:
            assignments.append(f"{column} = CAST(:{column} AS jsonb)")
        else:
            assignments.append(f"{column} = :{column}")
    sets = "".join(f"{assignment}, " for assignment in assignments)
    return text(f"""
WITH changed AS (
    UPDATE jobs
    SET {sets}last_seq = :seq, updated_at = now(),
        tokens_in = tokens_in + :tokens_in, tokens_out = tokens_out + :tokens_out,
        cost_usd = cost_usd + :cost_usd
    WHERE id = :job_id AND attempt = :attempt AND status = 'running'
    RETURNING id
), event AS (
    INSERT INTO job_events (job_id, seq, type, at, data)
    SELECT id, :seq, :type, :at, CAST(:data AS jsonb) FROM changed
),{_CHECKPOINT if checkpoint else ""}{"".join(f" {cte}," for cte in effects)} {_CALLS.strip()}
SELECT count(*) AS changed{held if probe_held else ""} FROM changed
""")


RECORD_CALLS = text(f"""
WITH changed AS (
    UPDATE jobs
    SET tokens_in = tokens_in + :tokens_in, tokens_out = tokens_out + :tokens_out,
        cost_usd = cost_usd + :cost_usd
    WHERE id = :job_id
    RETURNING id
), {_CALLS.strip()}
SELECT count(*) FROM changed
""")


# A batch and all its jobs with their job.queued events, in one statement: the jobs travel as
# one JSON array; the batch row's owner, time and id are theirs. An Idempotency-Key the owner
# already used for a batch inserts nothing and returns no row.
CREATE_BATCH = text("""
WITH batch AS (
    INSERT INTO batches (id, owner, item_count, idempotency_key, request_hash, created_at)
    VALUES (:id, :owner, :item_count, :idempotency_key, :request_hash, :at)
    ON CONFLICT (owner, idempotency_key) DO NOTHING
    RETURNING *
), new AS (
    SELECT * FROM jsonb_to_recordset(CAST(:jobs AS jsonb)) AS n(
        id uuid, kind text, input jsonb, priority int, max_attempts int, model text,
        models jsonb, webhook jsonb, run_at timestamptz, expires_at timestamptz,
        timeout_seconds int, dispatched_at timestamptz, event jsonb, batch_item int,
        max_cost_usd numeric)
), job AS (
    INSERT INTO jobs (id, owner, kind, status, input, priority, max_attempts, model, models,
                      webhook, batch_id, batch_item, last_seq, created_at, updated_at, run_at,
                      expires_at, timeout_seconds, dispatched_at, max_cost_usd)
    SELECT new.id, batch.owner, new.kind, 'queued', new.input, new.priority, new.max_attempts,
           new.model, new.models, new.webhook, batch.id, new.batch_item, 1, batch.created_at,
           batch.created_at, new.run_at, new.expires_at, new.timeout_seconds, new.dispatched_at,
           new.max_cost_usd
    FROM new CROSS JOIN batch ORDER BY new.batch_item
    RETURNING id
), queued AS (
    INSERT INTO job_events (job_id, seq, type, at, data)
    SELECT new.id, 1, :event_type, :at, new.event FROM job JOIN new ON new.id = job.id
)
SELECT * FROM batch
""")

# Cancels a batch in one statement: its queued jobs end `canceled` with their event, its
# running ones get `cancel_requested_at` (their workers are then told, as for one job). One
# UPDATE decides per row from the row as it is when locked, so a job a worker claims meanwhile
# is asked to stop rather than skipped. No row: no such batch of this owner; one row with a
# NULL id: nothing left to cancel.
CANCEL_BATCH = text("""
WITH batch AS (
    UPDATE batches SET canceled_at = coalesce(canceled_at, :at)
    WHERE id = :batch_id AND owner = :owner
    RETURNING id
), changed AS (
    UPDATE jobs SET
        status = CASE WHEN status = 'queued' THEN 'canceled' ELSE status END,
        finished_at = CASE WHEN status = 'queued' THEN :at ELSE finished_at END,
        last_seq = CASE WHEN status = 'queued' THEN last_seq + 1 ELSE last_seq END,
        lease_expires_at = CASE WHEN status = 'queued' THEN NULL ELSE lease_expires_at END,
        cancel_requested_at = CASE WHEN status = 'running'
                                   THEN coalesce(cancel_requested_at, :at)
                                   ELSE cancel_requested_at END,
        updated_at = :at
    WHERE batch_id = (SELECT id FROM batch) AND status IN ('queued', 'running')
    RETURNING id, owner, status, last_seq, kind, started_at
), canceled AS (
    INSERT INTO job_events (job_id, seq, type, at, data)
    SELECT id, last_seq, :event_type, :at, CAST(:data AS jsonb)
    FROM changed WHERE status = 'canceled'
)
SELECT changed.id, changed.owner, changed.status, changed.last_seq, changed.kind,
       changed.started_at
FROM batch LEFT JOIN changed ON true
""")


# The sweeper's pass over queued jobs past their expiry, one statement for a batch of jobs
# (not one per job), reading a partial index that holds only those jobs. (Scheduled jobs whose
# run_at has come are released by app/jobs/fairness.py, through their owner's window.)
#
# Queued jobs past their expires_at: failed `expired`, each with its job.failed event, whose
# `attempt` is each job's own (0 for a job that never started).
EXPIRE = text("""
WITH expired AS (
    UPDATE jobs
    SET status = 'failed', error_code = :code, error_message = :message, finished_at = now(),
        updated_at = now(), lease_expires_at = NULL, last_seq = last_seq + 1
    WHERE id IN (
        SELECT id FROM jobs
        WHERE status = 'queued' AND expires_at <= now()
        ORDER BY expires_at
        LIMIT :batch
        FOR UPDATE SKIP LOCKED
    )
    RETURNING id, owner, last_seq, batch_id, attempt, kind, started_at
), failed AS (
    INSERT INTO job_events (job_id, seq, type, at, data)
    SELECT id, last_seq, :type, :at, jsonb_set(CAST(:data AS jsonb), '{attempt}', to_jsonb(attempt))
    FROM expired
)
SELECT * FROM expired
""")
