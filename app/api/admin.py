"""The admin's views across owners (keys with the `admin` scope): every owner's jobs, canceling
and retrying many of them by a filter, and failures counted by error code."""

from __future__ import annotations

from datetime import timedelta

from flask import Blueprint, Response
from sqlalchemy import select, tuple_

from app.api.admin_schemas import (
    AdminJobListQuery,
    AdminJobOut,
    AdminJobPage,
    BulkCancelOut,
    BulkRequest,
    BulkRetryOut,
    FailureCount,
    FailuresOut,
    FailuresQuery,
)
from app.api.jobs import PREFIX
from app.api.pages import keyset_page
from app.api.problems import field_problem
from app.api.spec import json_response, operation
from app.jobs import bulk, transitions
from app.jobs.listing import newest_first
from app.jobs.states import JobStatus
from app.keys.api_keys import ADMIN
from app.models import Job
from app.runtime import runtime

bp = Blueprint("admin", __name__)

CANCELABLE = (JobStatus.QUEUED, JobStatus.RUNNING)
RETRYABLE = (JobStatus.FAILED, JobStatus.CANCELED)


@bp.get("/admin/jobs")
@operation(
    summary="List every owner's jobs",
    tag="admin",
    scope=ADMIN,
    query=AdminJobListQuery,
    responses={200: (AdminJobPage, "Newest first, keyset-paginated, each with its owner")},
)
def list_all_jobs(query: AdminJobListQuery) -> Response:
    """The job list's filters, and `owner`. Each job's links are its owner's routes."""
    session, where = runtime().db.request_session, query.to_filter()

    def fetch(n: int, before: tuple | None) -> list[Job]:
        statement = select(Job).where(*where.conditions())
        if before is not None:
            statement = statement.where(tuple_(Job.created_at, Job.id) < before)
        return list(session.scalars(newest_first(statement).limit(n)))

    page, next_cursor = keyset_page(query.cursor, query.limit, fetch)
    return json_response(
        AdminJobPage(
            items=[AdminJobOut.of_job(job, PREFIX) for job in page], next_cursor=next_cursor
        )
    )


@bp.post("/admin/jobs/cancel")
@operation(
    summary="Cancel every owner's jobs by a filter",
    tag="admin",
    scope=ADMIN,
    body=BulkRequest,
    responses={200: (BulkCancelOut, "How many were canceled and told to stop; whether more match")},
)
def cancel_jobs(body: BulkRequest) -> Response:
    """Up to `limit` matching jobs, newest first, as canceling each would: queued ones are
    canceled at once, running ones are told to stop (a running job told before is not counted
    again). Call again while `more` is true."""
    _status_among(body, CANCELABLE)
    rt = runtime()
    outcome = bulk.cancel_jobs(
        rt.db, rt.bus, rt.intake, body.filter.to_filter(), body.limit, transitions.now()
    )
    return json_response(
        BulkCancelOut(canceled=outcome.canceled, stopping=outcome.stopping, more=outcome.more)
    )


@bp.post("/admin/jobs/retry")
@operation(
    summary="Retry every owner's failed or canceled jobs by a filter",
    tag="admin",
    scope=ADMIN,
    body=BulkRequest,
    responses={200: (BulkRetryOut, "The new jobs; whether more match")},
)
def retry_jobs(body: BulkRequest) -> Response:
    """Up to `limit` matching failed or canceled jobs, newest first, each retried as
    `POST /jobs/{id}/retry` would (a new job with `retry_of`). A job already retried is not
    retried again (its retry is, if it failed too). Call again while `more` is true."""
    _status_among(body, RETRYABLE)
    rt = runtime()
    outcome = bulk.retry_jobs(
        rt.db, rt.bus, rt.intake, body.filter.to_filter(), body.limit, transitions.now()
    )
    return json_response(
        BulkRetryOut(retried=outcome.retried, jobs=outcome.jobs, more=outcome.more)
    )


@bp.get("/admin/failures")
@operation(
    summary="Failed jobs by error code",
    tag="admin",
    scope=ADMIN,
    query=FailuresQuery,
    responses={200: (FailuresOut, "Jobs that failed within the window, by error code")},
)
def failures(query: FailuresQuery) -> Response:
    """Jobs of every owner (or `owner`'s, of `kind`) that failed within the last `window`
    seconds, counted by `error.code`, most frequent first."""
    window = timedelta(seconds=query.window)
    counts = transitions.failures_by_code(
        runtime().db.request_session, window, owner=query.owner, kind=query.kind
    )
    return json_response(
        FailuresOut(
            window=query.window,
            since=transitions.now() - window,
            total=sum(counts.values()),
            by_code=[FailureCount(code=code, count=count) for code, count in counts.items()],
        )
    )


def _status_among(body: BulkRequest, allowed: tuple[JobStatus, ...]) -> None:
    status = body.filter.status
    if status is not None and status not in allowed:
        names = " or ".join(s.value for s in allowed)
        raise field_problem("filter.status", f"must be {names} for this action")
