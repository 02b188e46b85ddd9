"""Exports: one job's whole record (JSON, YAML or CSV), and an owner's job list streamed as CSV or
JSON Lines however long it is. How each format is written: app/api/export_formats.py."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator, Sequence
from decimal import Decimal
from typing import Any

from flask import Blueprint, Response, current_app
from sqlalchemy import Row

from app.api import export_formats as formats
from app.api.auth import current_principal
from app.api.jobs import PREFIX, owned_job
from app.api.problems import ApiProblem
from app.api.schemas import (
    JobExport,
    JobExportQuery,
    JobListExportQuery,
    JobOut,
    TimelineEvent,
)
from app.api.spec import operation
from app.db import Database
from app.jobs import history
from app.jobs.listing import SUMMARY_COLUMNS, JobFilter, stream_jobs
from app.models import Job
from app.runtime import runtime

bp = Blueprint("exports", __name__)

# Rows per FETCH from PostgreSQL, and per chunk of the response.
STREAM_BATCH = 250
_STREAM_SLOTS = "conveyor.export_stream_slots"


@bp.get("/jobs/<uuid:job_id>/export")
@operation(
    summary="Export a job's record",
    query=JobExportQuery,
    responses={200: (JobExport, "The job, its input, output, timeline and model calls")},
    produces={200: [formats.YAML_TYPE, formats.CSV_TYPE]},
)
def export_job(job_id: uuid.UUID, query: JobExportQuery) -> Response:
    """The job as the API shows it, its input and output, its durable timeline (every event but
    the token deltas) and every model call with all of its columns. `csv` writes one row per
    record, its kind in the `section` column (job, event, call); see docs/api.md."""
    job = owned_job(job_id)
    session = runtime().db.request_session
    document = JobExport(
        job=JobOut.of(job, PREFIX),
        input=job.input,
        output=job.output,
        events=[
            TimelineEvent(seq=event.seq, type=event.type, at=event.at, data=event.data)
            for event in history.timeline(session, job.id)
        ],
        model_calls=[_plain(call) for call in history.model_calls(session, job.id)],
    )
    if query.format == "json":
        body, media_type = document.model_dump_json(), formats.JSON_TYPE
    elif query.format == "yaml":
        body, media_type = formats.yaml_text(document.model_dump(mode="json")), formats.YAML_TYPE
    else:
        body = formats.job_export_csv(
            document.model_dump(mode="json"), history.model_call_columns()
        )
        media_type = formats.CSV_TYPE
    return Response(body, mimetype=media_type, headers=_attachment(f"job-{job.id}.{query.format}"))


@bp.get("/jobs/export")
@operation(
    summary="Export the job list",
    query=JobListExportQuery,
    responses={200: (None, "One line per job, newest first, streamed")},
    produces={200: [formats.JSONL_TYPE, formats.CSV_TYPE]},
)
def export_jobs(query: JobListExportQuery) -> Response:
    """Every job of the caller that matches the filters, newest first: `jsonl` writes each as
    `GET /jobs/{id}` shows it, one per line; `csv` one row per job, nested fields as dotted
    columns. `input` and `output` are left out unless named in `include`.

    Streamed as it is read from the database, in batches, so its length has no bound. A web
    process streams at most `CONVEYOR_EXPORT_MAX_STREAMS` of these at once; past that it
    answers 503 (`/problems/exports-busy`) with `Retry-After`."""
    where = query.of_owner(current_principal().owner)
    include = list(dict.fromkeys(query.include))
    slot = _StreamSlot.take()
    db = runtime().db
    write = _csv_chunks if query.format == "csv" else _jsonl_chunks
    response = Response(
        slot.held_while(write(db, where, include)),
        mimetype=formats.CSV_TYPE if query.format == "csv" else formats.JSONL_TYPE,
        headers={**_attachment(f"jobs.{query.format}"), "X-Accel-Buffering": "no"},
    )
    # Also when the server closes a response it never started to send (the client went away
    # first): a generator that never started does not run its `finally`.
    response.call_on_close(slot.release)
    return response


class _StreamSlot:
    """One of this process's export streams. Each holds a PostgreSQL connection of its own
    while its client reads, so there are at most `CONVEYOR_EXPORT_MAX_STREAMS`."""

    def __init__(self, slots: threading.BoundedSemaphore) -> None:
        self._slots = slots
        self._lock = threading.Lock()
        self._held = True

    @classmethod
    def take(cls) -> _StreamSlot:
        extensions = current_app.extensions
        if _STREAM_SLOTS not in extensions:
            limit = runtime().settings.export_max_streams
            extensions.setdefault(_STREAM_SLOTS, threading.BoundedSemaphore(limit))
        slots = extensions[_STREAM_SLOTS]
        if not slots.acquire(blocking=False):
            raise ApiProblem(
                503,
                "exports-busy",
                "Too many exports at once",
                "This process is streaming as many exports as it allows; retry shortly.",
                headers={"Retry-After": "5"},
            )
        return cls(slots)

    def held_while(self, chunks: Iterator[str]) -> Iterator[str]:
        try:
            yield from chunks
        finally:
            self.release()

    def release(self) -> None:
        """Idempotent: the end of the body and the closing of the response both call it."""
        with self._lock:
            if self._held:
                self._held = False
                self._slots.release()


def _jsonl_chunks(db: Database, where: JobFilter, include: list[str]) -> Iterator[str]:
    for rows in _job_rows(db, where, include):
        yield "".join(formats.json_line(_summary(row, include)) for row in rows)


def _csv_chunks(db: Database, where: JobFilter, include: list[str]) -> Iterator[str]:
    columns = [*formats.JOB_COLUMNS, *include]
    yield formats.csv_text([columns])
    for rows in _job_rows(db, where, include):
        yield formats.csv_text(formats.csv_row(_summary(row, include), columns) for row in rows)


def _job_rows(db: Database, where: JobFilter, include: list[str]) -> Iterator[Sequence[Row[Any]]]:
    columns = [*SUMMARY_COLUMNS, *(Job.__table__.c[name] for name in include)]
    return stream_jobs(db, where, columns, STREAM_BATCH)


def _summary(row: Row[Any], include: Sequence[str]) -> dict[str, Any]:
    """A job as `GET /jobs/{id}` shows it, with the large fields the caller asked for."""
    record = JobOut.of(row, PREFIX).model_dump(mode="json")
    for name in include:
        record[name] = getattr(row, name)
    return record


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """A row's values as JSON would carry them; money (NUMERIC) as a plain decimal string, where
    `str(Decimal)` could say "0E-8"."""
    return {k: f"{v:f}" if isinstance(v, Decimal) else v for k, v in values.items()}


def _attachment(filename: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{filename}"'}
