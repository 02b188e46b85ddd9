"""A job's durable record, as PostgreSQL keeps it: its timeline (`job_events`, which holds every
event but the token deltas) and its model calls (`model_calls`, one row per call attempt)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import JobEvent, ModelCall


def timeline(session: Session, job_id: uuid.UUID) -> list[JobEvent]:
    return list(
        session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq))
    )


def model_call_columns() -> list[str]:
    """Every column the ORM declares for `model_calls`, in table order: a column added to
    `ModelCall` is exported without a change here."""
    return [column.name for column in ModelCall.__table__.columns]


def model_calls(session: Session, job_id: uuid.UUID) -> list[dict[str, Any]]:
    """The job's model calls in the order they were recorded, each row as {column: value}."""
    table = ModelCall.__table__
    rows = session.execute(
        select(table).where(table.c.job_id == job_id).order_by(table.c.id)
    ).mappings()
    return [dict(row) for row in rows]
