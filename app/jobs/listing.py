"""Which jobs a listing shows, newest first: the filters shared by the paged list
(`GET /jobs`), the streamed export (`GET /jobs/export`) and the admin's views across owners
(`/admin/jobs`, its bulk cancel and retry), and the export's reading of them through a
server-side cursor."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Row, Select, select

from app.db import Database
from app.jobs.states import JobStatus
from app.models import Job

# A listing leaves out what can be large (the export, unless the caller names them in
# `include`): the paged list never shows them, and decoding them cost it CPU.
LARGE_COLUMNS = ("input", "output")
SUMMARY_COLUMNS = tuple(c for c in Job.__table__.columns if c.name not in LARGE_COLUMNS)


@dataclass(frozen=True)
class JobFilter:
    # None: every owner's jobs (only the admin's views leave it out).
    owner: str | None
    status: JobStatus | None = None
    kind: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None

    def conditions(self) -> list[ColumnElement[bool]]:
        found = [Job.owner == self.owner] if self.owner is not None else []
        if self.status is not None:
            found.append(Job.status == self.status.value)
        if self.kind is not None:
            found.append(Job.kind == self.kind)
        if self.created_after is not None:
            found.append(Job.created_at > self.created_after)
        if self.created_before is not None:
            found.append(Job.created_at < self.created_before)
        return found


def newest_first(statement: Select[Any]) -> Select[Any]:
    """The listing's order, which the index `jobs_owner_created` serves (`jobs_created`
    without an owner)."""
    return statement.order_by(Job.created_at.desc(), Job.id.desc())


def stream_jobs(
    db: Database, where: JobFilter, columns: Sequence[Any], batch: int = 1000
) -> Iterator[Sequence[Row[Any]]]:
    """The matching jobs' `columns`, newest first, `batch` rows at a time.

    Read through a server-side cursor on a connection of its own (`Database.
    streaming_connection`): PostgreSQL hands over one batch per FETCH, so neither this process
    nor libpq ever holds more than a batch, however many jobs match. The connection closes when
    the iterator is exhausted or closed (a client that goes away mid-stream)."""
    statement = newest_first(select(*columns).where(*where.conditions()))
    with db.streaming_connection() as connection:
        result = connection.execution_options(yield_per=batch).execute(statement)
        yield from result.partitions()
