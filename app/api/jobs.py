"""The jobs resource. Every query is scoped to the caller: another owner's job is a 404."""

from __future__ import annotations

import uuid
from functools import partial
from typing import Any

from flask import Blueprint, Response, request
from pydantic import ValidationError
from sqlalchemy import select, tuple_

from app.api.auth import current_principal, revoked_while_waiting
from app.api.budgets import BUDGET_EXCEEDED, budget_problem, estimate, owner_budget
from app.api.destinations import webhook_refusal
from app.api.problems import (
    ApiProblem,
    FieldError,
    Problem,
    field_problem,
    validation_problem,
)
from app.api.schemas import (
    BadCursor,
    EventOut,
    EventPage,
    EventsQuery,
    JobCreate,
    JobDetail,
    JobListQuery,
    JobOut,
    JobPage,
    JobResult,
    KindList,
    KindOut,
    KindStep,
    LogEntry,
    LogPage,
    ModelCallOut,
    ModelCallPage,
    decode_cursor,
    encode_cursor,
    usd,
)
from app.api.spec import json_response, operation
from app.api.sse import SSE_TYPE, event_stream_response
from app.jobs import budgets, transitions
from app.jobs.events import MAX_SEQ, replay
from app.jobs.listing import SUMMARY_COLUMNS, newest_first
from app.jobs.states import TERMINAL, EventType, JobStatus
from app.keys.watch import key_watch
from app.kinds import KINDS, Kind
from app.kinds.base import Admission
from app.models import Job, JobEvent, ModelCall
from app.runtime import runtime

bp = Blueprint("jobs", __name__)

JSON_TYPE = "application/json"
PREFIX = "/api/v1"
IDEMPOTENCY_HEADER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "maxLength": 255},
    "description": "Same key and body: the same job. Same key, other body: 422.",
}


@bp.post("/jobs")
@operation(
    summary="Create a job",
    body=JobCreate,
    headers=[IDEMPOTENCY_HEADER],
    responses={
        202: (JobOut, "Accepted: the job is queued"),
        200: (JobOut, "An Idempotency-Key replay: the existing job"),
        402: (Problem, BUDGET_EXCEEDED),
    },
)
def create_job(body: JobCreate) -> Response:
    """Stores the job, then queues it. The response's Location is the job."""
    principal = current_principal()
    kind = KINDS.get(body.kind)
    if kind is None:
        raise field_problem(
            "kind", f"must be one of {', '.join(sorted(KINDS))}", f"unknown kind {body.kind!r}"
        )
    try:
        job_input = kind.Input.model_validate(body.input)
    except ValidationError as exc:
        raise validation_problem(exc, prefix="input") from None
    model, models = _chosen_models(kind, body)
    if timing := timing_errors(body):
        raise field_problem(timing[0].field, timing[0].message)
    if refused := admission_errors(kind, job_input, principal.owner, model):
        field, message = refused[0]
        raise field_problem(f"input.{field}", message)
    if body.webhook is not None and (refused_url := webhook_refusal(body.webhook.url)):
        raise field_problem("webhook.url", refused_url)
    webhook = body.webhook.model_dump() if body.webhook else None
    stored_input = job_input.model_dump(mode="json", by_alias=True, exclude_none=True)
    key = idempotency_key()
    if body.max_cost_usd is not None or budgets.has_limits(
        lambda: runtime().db.request_session, principal.owner
    ):
        check_budget(principal.owner, estimate(kind, stored_input, model, models), body, key)
    max_attempts = body.max_attempts or runtime().settings.job_max_attempts
    fingerprint = _fingerprint(body, job_input, max_attempts) if key else None
    try:
        created = runtime().jobs.create_job(
            owner=principal.owner,
            kind=body.kind,
            input=stored_input,
            priority=body.priority,
            max_attempts=max_attempts,
            idempotency_key=key,
            fingerprint=fingerprint,
            model=model,
            models=models,
            run_at=body.run_at,
            expires_after=body.expires_after,
            timeout_seconds=body.timeout_seconds,
            webhook=webhook,
            max_cost_usd=body.max_cost_usd,
        )
    except transitions.IdempotencyConflict as exc:
        raise idempotency_key_reused(exc) from None
    job = JobOut.of(created.job, PREFIX)
    headers = {"Location": job.links.self}
    if created.replayed:
        headers["Idempotent-Replayed"] = "true"
    return json_response(job, 202 if not created.replayed else 200, headers)


def check_budget(owner: str, cost: Any, body: JobCreate, key: str | None) -> None:
    """402 when the job's estimated cost passes its max_cost_usd or the owner's budget left.
    A replay of a job already stored is not refused for the owner's budget (its own calls
    may be what used it up): the POST that made it was checked, and it gets its job back."""
    refused = budgets.refusal(cost, body.max_cost_usd, owner_budget(owner))
    if refused is None:
        return
    if refused.field is None and key is not None and _key_used(owner, key):
        return
    raise budget_problem(refused)


def _key_used(owner: str, key: str) -> bool:
    statement = select(Job.id).where(Job.owner == owner, Job.idempotency_key == key)
    return runtime().db.request_session.scalar(statement) is not None


def _fingerprint(body: JobCreate, job_input: Any, max_attempts: int) -> str:
    """Of the request with its defaults applied (see transitions.request_fingerprint)."""
    request_with_defaults = {
        "kind": body.kind,
        "input": job_input.model_dump(mode="json", by_alias=True),
        "priority": body.priority,
        "max_attempts": max_attempts,
    }
    request_with_defaults.update(optional_fields(body))
    return transitions.request_fingerprint(request_with_defaults)


def optional_fields(body: JobCreate) -> dict[str, Any]:
    """The fingerprint's share of the fields a request may leave out: only those given, so a
    key used before a field existed keeps its fingerprint. run_at is compared as the instant
    it names, whatever the offset it was written with."""
    given = {
        "model": body.model,
        "models": body.models,
        "run_at": body.run_at.isoformat() if body.run_at is not None else None,
        "expires_after": body.expires_after,
        "timeout_seconds": body.timeout_seconds,
        "webhook": body.webhook.model_dump() if body.webhook is not None else None,
        # Compared as the amount: "0.50" and 0.5 are the same request.
        "max_cost_usd": str(body.max_cost_usd.normalize()) if body.max_cost_usd else None,
    }
    return {name: value for name, value in given.items() if value}


def timing_errors(body: JobCreate) -> list[FieldError]:
    """What the deployment refuses of a request's timing (its static bounds are JobCreate's):
    a timeout_seconds above the deployment's own time limit."""
    limit = runtime().settings.job_soft_time_limit
    if body.timeout_seconds is not None and body.timeout_seconds > limit:
        message = f"must be at most {limit:g}, this deployment's CONVEYOR_JOB_SOFT_TIME_LIMIT"
        return [FieldError(field="timeout_seconds", message=message)]
    return []


def admission_errors(kind: Kind, job_input: Any, owner: str, model: str) -> list[tuple[str, str]]:
    """The kind's submit-time checks (its `admit`), if it has any: a kind without them costs
    the request nothing, not even a database session."""
    if kind.admit is None:
        return []
    session = runtime().db.request_session
    return kind.admit(job_input, Admission(runtime().settings, model, owner, session))


def _chosen_models(kind: Kind, body: JobCreate) -> tuple[str, dict[str, str]]:
    """The job's model and its roles' models, pinned now (see `model_choice`)."""
    errors = model_choice_errors(kind, body.model, body.models)
    if errors:
        raise field_problem(errors[0].field, errors[0].message)
    return model_choice(kind, body.model, body.models)


def model_choice_errors(
    kind: Kind, model: str | None, models: dict[str, str] | None
) -> list[FieldError]:
    """What is wrong with a request's choice of models: a model the operator does not allow,
    a role the kind does not have (each named by its field, `model` or `models.<role>`)."""
    if model is None and not models:
        return []  # the request chose nothing: the configuration's models
    allowed = runtime().settings.requestable_models()
    refused = "not a model this deployment allows; allowed: " + ", ".join(sorted(allowed))
    errors = []
    if model is not None and model not in allowed:
        errors.append(FieldError(field="model", message=refused))
    for role, chosen in (models or {}).items():
        if role not in kind.roles:
            roles = ", ".join(kind.roles) or "none"
            message = f"the kind {kind.name!r} has no role {role!r}; its roles: {roles}"
            errors.append(FieldError(field=f"models.{role}", message=message))
        elif chosen not in allowed:
            errors.append(FieldError(field=f"models.{role}", message=refused))
    return errors


def model_choice(
    kind: Kind, model: str | None, models: dict[str, str] | None
) -> tuple[str, dict[str, str]]:
    """The job's model and its roles' models, pinned at creation: the request's choice where it
    made one (checked by `model_choice_errors`), the configuration's elsewhere."""
    settings = runtime().settings
    chosen = models or {}
    pinned = {
        role: chosen.get(role) or model or settings.model_for(kind.name, role)
        for role in kind.roles
    }
    return model or settings.model_for(kind.name), pinned


@bp.get("/jobs")
@operation(
    summary="List jobs",
    query=JobListQuery,
    responses={200: (JobPage, "Newest first, keyset-paginated")},
)
def list_jobs(query: JobListQuery) -> Response:
    where = query.of_owner(current_principal().owner)
    # Plain rows of the summary columns, not ORM objects: no input or output to decode, no
    # identity map to fill (docs/performance.md, "Reads at a million jobs").
    statement = select(*SUMMARY_COLUMNS).where(*where.conditions())
    if query.cursor is not None:
        try:
            created_at, job_id = decode_cursor(query.cursor)
        except BadCursor as exc:
            raise field_problem("cursor", str(exc), str(exc)) from None
        statement = statement.where(tuple_(Job.created_at, Job.id) < (created_at, job_id))
    statement = newest_first(statement).limit(query.limit + 1)
    jobs = runtime().db.request_session.execute(statement).all()
    page, more = jobs[: query.limit], len(jobs) > query.limit
    return json_response(
        JobPage(
            items=[JobOut.of(job, PREFIX) for job in page],
            next_cursor=encode_cursor(page[-1].created_at, page[-1].id) if more else None,
        )
    )


@bp.get("/jobs/<uuid:job_id>")
@operation(
    summary="Get a job",
    responses={200: (JobDetail, "The job")},
)
def get_job(job_id: uuid.UUID) -> Response:
    job = owned_job(job_id)
    return json_response(
        JobDetail(**JobOut.of(job, PREFIX).model_dump(), input=job.input, webhook=job.webhook)
    )


@bp.get("/jobs/<uuid:job_id>/result")
@operation(
    summary="Get a finished job's result",
    responses={
        200: (JobResult, "The job is finished"),
        409: (None, "The job has not finished yet"),
    },
)
def get_result(job_id: uuid.UUID) -> Response:
    job = owned_job(job_id)
    if JobStatus(job.status) not in TERMINAL:
        raise ApiProblem(
            409,
            "job-not-finished",
            "The job has not finished",
            f"the job is {job.status}; its result exists once it has finished",
            headers={"Retry-After": "1"},
        )
    summary = JobOut.of(job, PREFIX)
    return json_response(
        JobResult(
            id=job.id,
            status=summary.status,
            output=job.output,
            error=summary.error,
            usage=summary.usage,
        )
    )


@bp.get("/jobs/<uuid:job_id>/events")
@operation(
    summary="Read a job's events",
    query=EventsQuery,
    responses={200: (EventPage, "Events with seq > after, oldest first")},
)
def list_events(job_id: uuid.UUID, query: EventsQuery) -> Response:
    """Served from the job's Redis Stream while it holds every event newer than `after`
    (token deltas included), else from PostgreSQL (no deltas: the result has the text).
    With `wait`, blocks until an event newer than `after` exists or the time passes.

    With `Accept: text/event-stream`, the same feed as Server-Sent Events (one event per
    message, `id` = seq), kept open until the job ends; a client resumes with
    `Last-Event-ID` (or `after`).

    Revoking the API key ends a stream, and answers a waiting request 401, within
    seconds."""
    if request.accept_mimetypes.best_match([JSON_TYPE, SSE_TYPE]) == SSE_TYPE:
        job = owned_job(job_id)
        after = _last_event_id(query.after)
        runtime().db.request_session.close()
        grant = key_watch().watch(current_principal().key_id)
        db, bus = runtime().db, runtime().bus
        response = event_stream_response(db, bus, job.owner, job_id, after, lambda: grant.revoked)
        response.call_on_close(partial(key_watch().forget, grant))
        return response
    job = owned_job(job_id)
    db, bus = runtime().db, runtime().bus
    if query.wait and job.last_seq <= query.after and job.status not in TERMINAL:
        db.request_session.close()  # hold no connection while waiting
        grant = key_watch().watch(current_principal().key_id)
        try:
            bus.wait_stream(job_id, query.after, query.wait, lambda: grant.revoked)
        finally:
            key_watch().forget(grant)
        if grant.revoked:
            raise revoked_while_waiting()
        job = owned_job(job_id)
    items, source = replay(db.request_session, bus, job, query.after, query.limit)
    last_seq = max([job.last_seq, *(item["seq"] for item in items)])
    return json_response(
        EventPage(
            items=[EventOut.model_validate(item) for item in items],
            source=source,
            last_seq=last_seq,
            status=JobStatus(job.status),
        )
    )


@bp.get("/jobs/<uuid:job_id>/logs")
@operation(
    summary="Read a job's log",
    responses={200: (LogPage, "The job's log lines, oldest first")},
)
def list_logs(job_id: uuid.UUID) -> Response:
    owned_job(job_id)
    events = runtime().db.request_session.scalars(
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.type == EventType.LOG.value)
        .order_by(JobEvent.seq)
        .limit(1000)
    )
    items = []
    for event in events:
        fields = dict(event.data)
        level, message = fields.pop("level", "info"), fields.pop("message", "")
        items.append(
            LogEntry(seq=event.seq, at=event.at, level=level, message=message, fields=fields)
        )
    return json_response(LogPage(items=items))


@bp.get("/jobs/<uuid:job_id>/calls")
@operation(
    summary="List a job's model calls",
    responses={200: (ModelCallPage, "Every model call of every attempt, oldest first")},
)
def list_calls(job_id: uuid.UUID) -> Response:
    """One entry per call to the model, whatever its outcome: its step and role, model,
    attempt, tokens, cost (the provider's reported figure beside the price table's), latency
    and time to first token. A call cut short by a killed worker is missing: nothing was left
    to record it."""
    owned_job(job_id)
    calls = runtime().db.request_session.scalars(
        select(ModelCall).where(ModelCall.job_id == job_id).order_by(ModelCall.id).limit(1000)
    )
    return json_response(ModelCallPage(items=[_call_out(call) for call in calls]))


def _call_out(call: ModelCall) -> ModelCallOut:
    reported = call.reported_cost_usd
    return ModelCallOut(
        id=call.id,
        attempt=call.attempt,
        step=call.step,
        role=call.role,
        provider=call.provider,
        model=call.model,
        tokens_in=call.tokens_in,
        tokens_out=call.tokens_out,
        cost_usd=reported if reported is not None else call.cost_usd,
        table_cost_usd=call.cost_usd,
        reported_cost_usd=None if reported is None else usd(reported),
        latency_ms=call.latency_ms,
        ttft_ms=call.ttft_ms,
        outcome=call.outcome,
        error_message=call.error_message,
        started_at=call.started_at,
        finished_at=call.finished_at,
    )


@bp.post("/jobs/<uuid:job_id>/cancel")
@operation(
    summary="Cancel a job",
    responses={
        200: (JobOut, "Canceled, or already canceled"),
        202: (JobOut, "Running: its worker has been told to stop"),
        409: (None, "The job already finished"),
    },
)
def cancel_job(job_id: uuid.UUID) -> Response:
    """A queued job is canceled at once. A running job's worker closes the model stream,
    records the partial output and usage, and ends it as canceled within moments."""
    job = _request_of_owner(runtime().jobs.cancel_job, job_id)
    status = 202 if job.status == JobStatus.RUNNING else 200
    return json_response(JobOut.of(job, PREFIX), status)


@bp.post("/jobs/<uuid:job_id>/retry")
@operation(
    summary="Retry a failed or canceled job",
    responses={
        202: (JobOut, "A new job, linked by retry_of"),
        409: (None, "The job has not failed or been canceled"),
        402: (Problem, BUDGET_EXCEEDED),
    },
)
def retry_job(job_id: uuid.UUID) -> Response:
    """The new job is checked against budgets as a new submission is (its max_cost_usd, kept
    from the original, and the owner's budget left)."""
    _check_retry_budget(job_id)
    job = _request_of_owner(runtime().jobs.retry_job, job_id)
    out = JobOut.of(job, PREFIX)
    return json_response(out, 202, {"Location": out.links.self})


RETRYABLE = (JobStatus.FAILED.value, JobStatus.CANCELED.value)


def _check_retry_budget(job_id: uuid.UUID) -> None:
    owner = current_principal().owner
    statement = select(Job).where(Job.id == job_id, Job.owner == owner)
    old = runtime().db.request_session.scalars(statement).one_or_none()
    kind = KINDS.get(old.kind) if old is not None else None
    if old is None or kind is None or old.status not in RETRYABLE:
        return  # retry_job answers: a 404, or a 409 for a job it would not retry
    cost = estimate(kind, old.input, old.model or "", old.models or {})
    if refused := budgets.refusal(cost, old.max_cost_usd, owner_budget(owner)):
        raise budget_problem(refused)


@bp.delete("/jobs/<uuid:job_id>")
@operation(
    summary="Delete a finished job",
    responses={
        204: (None, "Deleted, with its events and artifacts"),
        409: (None, "The job has not finished: cancel it with POST /jobs/{id}/cancel"),
    },
)
def delete_job(job_id: uuid.UUID) -> Response:
    """Deletes a finished job. DELETE never cancels: a queued or running job is a 409 whose
    `cancel` member is the URL that does (clients written for systems where DELETE cancels
    get told where to go, rather than a job silently left running)."""
    try:
        runtime().jobs.delete_job(current_principal().owner, job_id)
    except transitions.JobNotFound:
        raise _not_found(job_id) from None
    except transitions.JobStateConflict as exc:
        cancel = f"{PREFIX}/jobs/{job_id}/cancel"
        raise ApiProblem(
            409,
            "job-state-conflict",
            "Not allowed in the job's state",
            f"{exc}: POST {cancel} cancels it",
            headers={"Link": f'<{cancel}>; rel="cancel"'},
            extra={"cancel": cancel},
        ) from None
    return Response(status=204)


@bp.get("/kinds")
@operation(
    summary="List job kinds and their input schemas",
    responses={200: (KindList, "Every kind this deployment runs")},
)
def list_kinds() -> Response:
    return json_response(
        KindList(
            items=[
                KindOut(
                    name=kind.name,
                    description=kind.description,
                    input_schema=kind.Input.model_json_schema(by_alias=True),
                    output_schema=kind.Output.model_json_schema(),
                    steps=[
                        KindStep(name=step.name, role=step.role, weight=step.weight)
                        for step in kind.steps
                    ],
                    roles=list(kind.roles),
                )
                for kind in KINDS.values()
            ]
        )
    )


def idempotency_key_reused(exc: transitions.IdempotencyConflict) -> ApiProblem:
    """The 422 for an Idempotency-Key used before with a different request (a job or a batch)."""
    return ApiProblem(
        422,
        "idempotency-key-reused",
        "Idempotency-Key reused",
        str(exc),
        [FieldError(field="Idempotency-Key", message=str(exc))],
    )


def idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= 255 or not key.isprintable():
        raise field_problem(
            "Idempotency-Key",
            "must be 1 to 255 printable characters",
            "Idempotency-Key must be 1 to 255 printable characters",
        )
    return key


def owned_job(job_id: uuid.UUID) -> Job:
    """The caller's job, or a 404 (another owner's job is answered like a missing one)."""
    try:
        return transitions.get_job(runtime().db.request_session, current_principal().owner, job_id)
    except transitions.JobNotFound:
        raise _not_found(job_id) from None


def _request_of_owner(action: Any, job_id: uuid.UUID) -> Any:
    try:
        return action(current_principal().owner, job_id)
    except transitions.JobNotFound:
        raise _not_found(job_id) from None
    except transitions.JobStateConflict as exc:
        raise ApiProblem(
            409, "job-state-conflict", "Not allowed in the job's state", str(exc)
        ) from None


def _last_event_id(default: int) -> int:
    header = request.headers.get("Last-Event-ID")
    if header is None:
        return default
    try:
        value = int(header)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEQ:
        raise field_problem(
            "Last-Event-ID",
            f"must be an integer from 0 to {MAX_SEQ}",
            "Last-Event-ID must be the seq of an event",
        )
    return value


def _not_found(job_id: uuid.UUID) -> ApiProblem:
    return ApiProblem(404, "not-found", "Not found", f"no job {job_id}")
