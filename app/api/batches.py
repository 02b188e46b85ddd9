"""The batches resource: up to 10,000 jobs created by one request, then followed, canceled and
downloaded together. Every query is scoped to the caller: another owner's batch is a 404."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from flask import Blueprint, Response, request
from pydantic import BaseModel, ValidationError
from sqlalchemy import select

from app.api.auth import current_principal
from app.api.budgets import BUDGET_EXCEEDED, budget_problem, estimate, owner_budget
from app.api.destinations import webhook_refusal
from app.api.jobs import (
    PREFIX,
    admission_errors,
    idempotency_key,
    idempotency_key_reused,
    model_choice,
    model_choice_errors,
    timing_errors,
)
from app.api.pages import keyset_page
from app.api.problems import ApiProblem, FieldError, Problem, field_errors, field_problem
from app.api.schemas import (
    MAX_BATCH_ITEMS,
    BatchCreate,
    BatchItem,
    BatchListQuery,
    BatchOut,
    BatchPage,
    BatchResultLine,
    JobError,
)
from app.api.spec import JSON_LINES_TYPES, field_with_nul, json_response, operation
from app.jobs import batches, budgets, transitions
from app.jobs.states import JobStatus
from app.kinds import KINDS
from app.models import Batch
from app.runtime import runtime

bp = Blueprint("batches", __name__)

JSON_LINES = JSON_LINES_TYPES[0]
# A 422 lists this many bad fields at most (a batch may have 10,000 bad items).
MAX_REPORTED_ERRORS = 100
IDEMPOTENCY_HEADER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "maxLength": 255},
    "description": "Same key and body: the same batch. Same key, other body: 422.",
}


@dataclass
class BatchBody:
    """The items of a batch, parsed but not yet validated, each with the name a problem gives
    it: `items[17]` in a JSON body (from 0), `lines[18]` in JSON Lines (from 1, as editors
    count lines)."""

    labels: list[str] = field(default_factory=list)
    items: list[BatchItem] = field(default_factory=list)


def parse_batch_body(_model: type[BaseModel]) -> BatchBody:
    """A JSON `{"items": [...]}` or JSON Lines, one item per line; every item checked like the
    body of POST /jobs, and every bad field named (the first MAX_REPORTED_ERRORS of them)."""
    request.max_content_length = runtime().settings.max_batch_request_bytes
    if request.mimetype in JSON_LINES_TYPES:
        body, errors = _parse_lines(request.get_data())
    elif request.is_json:
        body, errors = _parse_json(request.get_data())
    else:
        raise ApiProblem(
            415,
            "unsupported-media-type",
            "Send JSON or JSON Lines",
            f"The body must be application/json, or JSON Lines ({', '.join(JSON_LINES_TYPES)}).",
        )
    if errors:
        raise _items_problem(errors)
    return body


def _parse_json(raw: bytes) -> tuple[BatchBody, list[FieldError]]:
    try:
        parsed = BatchCreate.model_validate_json(raw)
    except ValidationError as exc:
        if any(error["type"] == "json_invalid" for error in exc.errors()):
            raise ApiProblem(
                400, "malformed-json", "The body is not valid JSON", str(exc.errors()[0]["msg"])
            ) from None
        return BatchBody(), _item_errors(exc)
    labels = [f"items[{index}]" for index in range(len(parsed.items))]
    return BatchBody(labels, parsed.items), []


def _item_errors(exc: ValidationError) -> list[FieldError]:
    """BatchCreate's errors, an item's index written `items[17]` as the batch names it."""
    errors = []
    for error in exc.errors(include_url=False):
        loc = list(error["loc"])
        if len(loc) >= 2 and loc[0] == "items" and isinstance(loc[1], int):
            loc[:2] = [f"items[{loc[1]}]"]
        path = ".".join(str(part) for part in loc) or "(body)"
        errors.append(FieldError(field=path, message=error["msg"]))
    return errors


def _parse_lines(raw: bytes) -> tuple[BatchBody, list[FieldError]]:
    numbered = [
        (number, line)
        for number, line in enumerate(raw.split(b"\n"), start=1)
        if line.strip()  # a blank line (the last newline's, say) is no item
    ]
    if not 1 <= len(numbered) <= MAX_BATCH_ITEMS:
        count = len(numbered)
        message = f"must hold 1 to {MAX_BATCH_ITEMS:,} items, one per line; it has {count:,}"
        raise field_problem("lines", message)
    body, errors = BatchBody(), []
    for number, line in numbered:
        label = f"lines[{number}]"
        try:
            item = BatchItem.model_validate_json(line)
        except ValidationError as exc:
            if any(error["type"] == "json_invalid" for error in exc.errors()):
                message = f"not valid JSON: {exc.errors()[0]['msg']}"
                raise ApiProblem(
                    400,
                    "malformed-json",
                    "A line is not valid JSON",
                    f"{label}: {message}",
                    [FieldError(field=label, message=message)],
                ) from None
            errors += field_errors(exc, prefix=label)
            continue
        body.labels.append(label)
        body.items.append(item)
    return body, errors


def _items_problem(errors: list[FieldError]) -> ApiProblem:
    shown = errors[:MAX_REPORTED_ERRORS]
    detail = "; ".join(f"{e.field}: {e.message}" for e in shown[:5])
    if len(errors) > len(shown):
        detail += f" ({len(errors):,} errors, the first {len(shown)} listed)"
    return ApiProblem(422, "validation-error", "The request is not valid", detail, shown)


@dataclass
class _WebhookUrls:
    """The items of a batch often share a webhook: each URL is checked (and resolved) once."""

    refusals: dict[str, str | None] = field(default_factory=dict)

    def refusal(self, url: str) -> str | None:
        if url not in self.refusals:
            self.refusals[url] = webhook_refusal(url)
        return self.refusals[url]


def _validated_jobs(body: BatchBody) -> list[batches.BatchJob]:
    """Each item's input checked by its kind, as POST /jobs checks one job's."""
    default_attempts = runtime().settings.job_max_attempts
    owner = current_principal().owner
    jobs, errors, costs = [], [], []
    checked = _WebhookUrls()
    for label, item in zip(body.labels, body.items, strict=True):
        kind = KINDS.get(item.kind)
        if kind is None:
            message = f"must be one of {', '.join(sorted(KINDS))}"
            errors.append(FieldError(field=f"{label}.kind", message=message))
            continue
        try:
            job_input = kind.Input.model_validate(item.input)
        except ValidationError as exc:
            errors += field_errors(exc, prefix=f"{label}.input")
            continue
        dumped = job_input.model_dump(mode="json", by_alias=True, exclude_none=True)
        # PostgreSQL stores no NUL character in jsonb: refused here, naming the field.
        if (nul := field_with_nul(dumped, f"{label}.input")) is not None:
            errors.append(FieldError(field=nul, message="must not contain the NUL character"))
            continue
        if choice_errors := model_choice_errors(kind, item.model, item.models):
            errors += [
                FieldError(field=f"{label}.{e.field}", message=e.message) for e in choice_errors
            ]
            continue
        if timing := timing_errors(item):
            errors += [FieldError(field=f"{label}.{e.field}", message=e.message) for e in timing]
            continue
        model, models = model_choice(kind, item.model, item.models)
        if refused := admission_errors(kind, job_input, owner, model):
            errors += [
                FieldError(field=f"{label}.input.{field}", message=message)
                for field, message in refused
            ]
            continue
        webhook = item.webhook.model_dump() if item.webhook else None
        if webhook and (refused_url := checked.refusal(webhook["url"])):
            errors.append(FieldError(field=f"{label}.webhook.url", message=refused_url))
            continue
        jobs.append(_batch_job(item, dumped, model, models, webhook, default_attempts))
        costs.append((label, estimate(kind, dumped, model, models)))
    if errors:
        raise _items_problem(errors)
    _check_budget(owner, costs, jobs)
    return jobs


def _batch_job(
    item: BatchItem,
    job_input: dict[str, Any],
    model: str,
    models: dict[str, str],
    webhook: dict[str, Any] | None,
    default_attempts: int,
) -> batches.BatchJob:
    return batches.BatchJob(
        item.kind,
        job_input,
        item.priority,
        item.max_attempts or default_attempts,
        model,
        models,
        batches.Timing(item.run_at, item.expires_after, item.timeout_seconds),
        webhook,
        item.max_cost_usd,
    )


def _check_budget(
    owner: str, costs: list[tuple[str, Decimal]], jobs: list[batches.BatchJob]
) -> None:
    """402 when an item's estimate passes its own max_cost_usd (naming it), or when the
    items' estimates together pass the owner's budget left."""
    for (label, cost), job in zip(costs, jobs, strict=True):
        if refused := budgets.refusal(cost, job.max_cost_usd, None):
            raise budget_problem(refused, field_prefix=f"{label}.")
    total = sum((cost for _, cost in costs), Decimal(0))
    refused = budgets.refusal(total, None, owner_budget(owner))
    # A replay of a stored batch gets its batch back, whatever its jobs have spent since.
    if refused is not None and not _batch_key_used(owner, idempotency_key()):
        raise budget_problem(refused)


def _batch_key_used(owner: str, key: str | None) -> bool:
    if key is None:
        return False
    statement = select(Batch.id).where(Batch.owner == owner, Batch.idempotency_key == key)
    return runtime().db.request_session.scalar(statement) is not None


@bp.post("/batches")
@operation(
    summary="Create a batch of jobs",
    tag="batches",
    body=BatchCreate,
    body_parser=parse_batch_body,
    body_lines=BatchItem,
    headers=[IDEMPOTENCY_HEADER],
    responses={
        202: (BatchOut, "Accepted: every job of the batch is queued"),
        200: (BatchOut, "An Idempotency-Key replay: the existing batch"),
        402: (Problem, BUDGET_EXCEEDED),
    },
)
def create_batch(body: BatchBody) -> Response:
    """Up to 10,000 jobs, each of any kind, as `{"items": [...]}` or as JSON Lines
    (`application/jsonl` or `application/x-ndjson`, one item per line). Each item is checked
    like the body of `POST /jobs`; a bad one is a 422 naming it (`items[17].input.prompt`, or
    `lines[18].input.prompt` counting lines from 1), and then no job is created. The batch and
    its jobs are stored by one commit, so a 202 means every job is queued."""
    jobs = _validated_jobs(body)
    key = idempotency_key()
    fingerprint = None
    if key:
        fingerprint = transitions.request_fingerprint(
            [
                {
                    "kind": job.kind,
                    "input": job.input,
                    "priority": job.priority,
                    "max_attempts": job.max_attempts,
                    "model": job.model,
                    # Only when given, so a key used before they existed keeps its fingerprint.
                    **job.timing.given(),
                    **({"webhook": job.webhook} if job.webhook else {}),
                    **(
                        {"max_cost_usd": str(job.max_cost_usd.normalize())}
                        if job.max_cost_usd
                        else {}
                    ),
                }
                for job in jobs
            ]
        )
    try:
        stored = runtime().batches.create_batch(
            owner=current_principal().owner,
            items=jobs,
            idempotency_key=key,
            fingerprint=fingerprint,
        )
    except transitions.IdempotencyConflict as exc:
        raise idempotency_key_reused(exc) from None
    out = BatchOut.of(stored.batch, stored.summary, PREFIX)
    headers = {"Location": out.links.self}
    if stored.replayed:
        headers["Idempotent-Replayed"] = "true"
    return json_response(out, 200 if stored.replayed else 202, headers)


@bp.get("/batches")
@operation(
    summary="List batches",
    tag="batches",
    query=BatchListQuery,
    responses={200: (BatchPage, "Newest first, keyset-paginated")},
)
def list_batches(query: BatchListQuery) -> Response:
    session, owner = runtime().db.request_session, current_principal().owner
    page, next_cursor = keyset_page(
        query.cursor,
        query.limit,
        lambda n, before: batches.list_batches(session, owner, n, before),
    )
    summaries = batches.summaries(session, [batch.id for batch in page])
    return json_response(
        BatchPage(
            items=[BatchOut.of(batch, summaries[batch.id], PREFIX) for batch in page],
            next_cursor=next_cursor,
        )
    )


@bp.get("/batches/<uuid:batch_id>")
@operation(
    summary="Get a batch: its jobs counted by status, progress and cost",
    tag="batches",
    responses={200: (BatchOut, "The batch")},
)
def get_batch(batch_id: uuid.UUID) -> Response:
    return json_response(_batch_out(owned_batch(batch_id)))


@bp.post("/batches/<uuid:batch_id>/cancel")
@operation(
    summary="Cancel a batch",
    tag="batches",
    responses={
        200: (BatchOut, "Every job of the batch has finished: its queued jobs are canceled"),
        202: (BatchOut, "Queued jobs canceled; the workers of running ones told to stop"),
    },
)
def cancel_batch(batch_id: uuid.UUID) -> Response:
    """Cancels the batch's queued jobs at once, in one statement, and tells the workers of its
    running jobs to stop: each closes its model stream, records the partial output and usage,
    and ends the job canceled within moments. Jobs that had finished keep their outcome.
    Canceling again is harmless."""
    owner = current_principal().owner
    try:
        outcome = runtime().batches.cancel_batch(owner, batch_id)
    except batches.BatchNotFound:
        raise _not_found(batch_id) from None
    return json_response(_batch_out(owned_batch(batch_id)), 202 if outcome.stopping else 200)


@bp.get("/batches/<uuid:batch_id>/results")
@operation(
    summary="Download a batch's results",
    tag="batches",
    responses={},
    response_lines={200: (BatchResultLine, "One line per job, in the order of the items")},
)
def download_results(batch_id: uuid.UUID) -> Response:
    """JSON Lines, streamed: one line per job with its status and, once it has finished, its
    output or its error. Jobs that have not finished yet are listed with their status."""
    owned_batch(batch_id)
    db = runtime().db
    db.request_session.close()  # the download reads in pages, each with a short session

    def lines() -> Iterator[str]:
        for page in batches.result_pages(db, batch_id):
            yield "".join(_result_line(row) + "\n" for row in page)

    return Response(
        lines(),
        mimetype=JSON_LINES,
        headers={"Content-Disposition": f'attachment; filename="batch-{batch_id}.jsonl"'},
    )


def _result_line(row: Any) -> str:
    failed = row.status == JobStatus.FAILED and row.error_code
    return BatchResultLine(
        item=row.batch_item,
        id=row.id,
        status=JobStatus(row.status),
        output=row.output,
        error=JobError(code=row.error_code, message=row.error_message) if failed else None,
    ).model_dump_json()


def owned_batch(batch_id: uuid.UUID) -> Batch:
    """The caller's batch, or a 404 (another owner's batch is answered like a missing one)."""
    try:
        return batches.get_batch(runtime().db.request_session, current_principal().owner, batch_id)
    except batches.BatchNotFound:
        raise _not_found(batch_id) from None


def _batch_out(batch: Batch) -> BatchOut:
    summary = batches.summaries(runtime().db.request_session, [batch.id])[batch.id]
    return BatchOut.of(batch, summary, PREFIX)


def _not_found(batch_id: uuid.UUID) -> ApiProblem:
    return ApiProblem(404, "not-found", "Not found", f"no batch {batch_id}")
