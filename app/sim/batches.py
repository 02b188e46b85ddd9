"""The Batch API: `/v1/files` (upload, read) and `/v1/batches` (create, get, list, cancel).

A batch moves through OpenAI's statuses over time, computed from its age whenever it is read:
`validating` (`batch_validating` s) -> `in_progress` (`batch_seconds`, its request counts
rising linearly) -> `finalizing` (`batch_finalizing` s) -> `completed`, with an output file
(one line per request answered 200) and an error file (one per request that failed). Each
line is answered as `/v1/chat/completions` would answer it, directives included, so
`[[sim fault=400]]` in one request's message puts that request in the error file.

A directive in any request steers the whole batch: `[[sim batch=expire]]` makes it `expired`
when its in_progress time is up, half its requests answered and the rest in the error file
with `batch_expired`; `[[sim batch=fail]]` makes it `failed` at validation, with no files.
A canceled batch is `cancelling` for `batch_finalizing` s, then `cancelled`, the requests
answered by the time of the cancel in its output file.

Run knobs (POST /_sim/config): `batch_seconds`, `batch_validating`, `batch_finalizing`, and two
delays a chaos test uses to kill a client mid-call: `file_upload_delay` (before an upload is
answered; the file is stored first) and `batch_create_delay` (before a create is answered;
the batch exists at once, as when a provider commits a request whose answer is then lost).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from aiohttp import web

from app.sim import chunks
from app.sim.answer import ChatRequest, InvalidRequest, compose_answer
from app.sim.batches_store import BATCH_EXPIRE, BATCH_FAIL, Line, SimBatch, SimFile
from app.sim.directives import DirectiveError, request_directives
from app.sim.faults import HTTP_FAULTS, error_body
from app.sim.http_errors import error_response, invalid_request
from app.sim.state import STATE, SimState
from app.sim.text import seed_for

CHAT_ENDPOINT = "/v1/chat/completions"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
MAX_LIST = 100


def _now() -> float:
    return time.time()


def parse_lines(data: bytes) -> tuple[list[Line], str | None]:
    """The requests of an input file, and the batch-wide directive (`batch=`) if any.
    InvalidRequest for a file the Batch API would refuse."""
    lines: list[Line] = []
    mode: str | None = None
    seen: set[str] = set()
    for number, raw in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            request = json.loads(raw)
        except json.JSONDecodeError:
            raise InvalidRequest(f"line {number} of the input file is not JSON") from None
        if not isinstance(request, dict) or not isinstance(request.get("custom_id"), str):
            raise InvalidRequest(f"line {number}: a request needs a string custom_id")
        if request["custom_id"] in seen:
            raise InvalidRequest(f"line {number}: custom_id {request['custom_id']!r} repeats")
        seen.add(request["custom_id"])
        if request.get("url") != CHAT_ENDPOINT or request.get("method", "POST") != "POST":
            raise InvalidRequest(f"line {number}: only POST {CHAT_ENDPOINT} is simulated")
        body = request.get("body")
        if not isinstance(body, dict):
            raise InvalidRequest(f"line {number}: body must be an object")
        try:
            knobs = request_directives(body.get("messages") or [], {})
        except DirectiveError as error:
            raise InvalidRequest(f"line {number}: {error}") from None
        mode = knobs.batch or mode
        lines.append(Line(request["custom_id"], body, str(body.get("model") or "")))
    if not lines:
        raise InvalidRequest("the input file has no requests")
    return lines, mode


def answer_line(line: Line, state: SimState) -> dict[str, Any]:
    """One request answered as a non-streamed chat completion: {"ok", "line"}."""
    request_id = f"req_{uuid.uuid4().hex[:24]}"
    try:
        chat = ChatRequest.from_body(line.body)
        knobs = request_directives(chat.messages, {})
        fault = state.choose_fault(knobs, seed_for(chat.messages))
        if fault in HTTP_FAULTS:
            status, error_type, code, message = HTTP_FAULTS[fault]
            return _failed_line(line, status, request_id, error_body(message, error_type, code))
        answer = compose_answer(chat, seed_for(chat.messages), knobs.tokens, fault)
    except (InvalidRequest, DirectiveError) as error:
        param = getattr(error, "param", None)
        body = error_body(str(error), "invalid_request_error", None, param)
        return _failed_line(line, 400, request_id, body)
    completion = chunks.completion_body(
        completion_id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
        created=int(time.time()),
        model=chat.model,
        content=answer.content,
        finish_reason=answer.finish_reason,
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=len(answer.pieces),
        # OpenAI's batch output carries no cost: the client prices the tokens itself.
        cost=None,
    )
    state.stats.completion_tokens_sent += len(answer.pieces)
    response = {"status_code": 200, "request_id": request_id, "body": completion}
    return {"ok": True, "line": _result_line(line, response)}


def _failed_line(line: Line, status: int, request_id: str, body: dict[str, Any]) -> dict[str, Any]:
    response = {"status_code": status, "request_id": request_id, "body": body}
    return {"ok": False, "line": _result_line(line, response)}


def _result_line(line: Line, response: dict[str, Any]) -> dict[str, Any]:
    return {"id": _line_id(), "custom_id": line.custom_id, "response": response, "error": None}


def _unrun_line(line: Line, code: str, message: str) -> dict[str, Any]:
    error = {"code": code, "message": message}
    return {"id": _line_id(), "custom_id": line.custom_id, "response": None, "error": error}


def _line_id() -> str:
    return f"batch_req_{uuid.uuid4().hex[:24]}"


def advance(batch: SimBatch, state: SimState, now: float) -> None:
    """Brings the batch's status up to `now`, answering its requests as they come due and
    writing its files when it ends."""
    if batch.status in TERMINAL:
        return
    if batch.mode == BATCH_FAIL:
        if now >= batch.created + batch.validating:
            batch.errors = [
                {
                    "code": "invalid_request",
                    "message": "The batch failed validation (simulated).",
                    "param": None,
                    "line": 1,
                }
            ]
            _end(batch, state, "failed", now, write_files=False)
        return
    answered = batch.answered_by(now)
    for line in batch.lines[:answered]:
        if line.outcome is None:
            line.outcome = answer_line(line, state)
    if batch.canceled_at is not None:
        if now >= batch.canceled_at + batch.finalizing:
            _end(batch, state, "cancelled", now)
        else:
            batch.status = "cancelling"
        return
    started = batch.created + batch.validating
    running_until = started + batch.in_progress
    if now < started:
        batch.status = "validating"
    elif now < running_until:
        batch.status = "in_progress"
    elif batch.mode == BATCH_EXPIRE:
        _end(batch, state, "expired", now)
    elif now < running_until + batch.finalizing:
        batch.status = "finalizing"
    else:
        _end(batch, state, "completed", now)


def _end(
    batch: SimBatch, state: SimState, status: str, now: float, *, write_files: bool = True
) -> None:
    batch.status = status
    batch.ended_at = now
    if not write_files:
        return
    outputs: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    unrun = {
        "expired": (
            "batch_expired",
            "This request could not be executed before the completion window expired.",
        ),
        "cancelled": ("batch_cancelled", "This request was not executed: the batch was cancelled."),
    }
    for line in batch.lines:
        if line.outcome is not None:
            (outputs if line.outcome["ok"] else errors).append(line.outcome["line"])
        elif status in unrun:
            errors.append(_unrun_line(line, *unrun[status]))
    store = state.batches
    if outputs:
        batch.output_file_id = store.add_file(
            f"{batch.id}_output.jsonl", "batch_output", _jsonl(outputs)
        ).id
    if errors:
        batch.error_file_id = store.add_file(
            f"{batch.id}_error.jsonl", "batch_output", _jsonl(errors)
        ).id


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(chunks.compact_json(row).encode() + b"\n" for row in rows)


def batch_object(batch: SimBatch) -> dict[str, Any]:
    outcomes = [line.outcome for line in batch.lines if line.outcome is not None]
    completed = sum(1 for outcome in outcomes if outcome["ok"])
    failed = len(outcomes) - completed
    if batch.status in ("expired", "cancelled"):
        failed = len(batch.lines) - completed  # the requests never run count as failed
    at = int(batch.ended_at) if batch.ended_at is not None else None
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": int(batch.created),
        "in_progress_at": int(batch.created + batch.validating),
        "expires_at": int(batch.created + 86_400),
        "completed_at": at if batch.status == "completed" else None,
        "failed_at": at if batch.status == "failed" else None,
        "expired_at": at if batch.status == "expired" else None,
        "cancelling_at": int(batch.canceled_at) if batch.canceled_at is not None else None,
        "cancelled_at": at if batch.status == "cancelled" else None,
        "request_counts": {"total": len(batch.lines), "completed": completed, "failed": failed},
        "metadata": batch.metadata,
    }


# Handlers -----------------------------------------------------------------------------------


async def upload_file(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        form = await request.post()
    except ValueError:
        return invalid_request("the body must be multipart/form-data")
    purpose = form.get("purpose")
    upload = form.get("file")
    if purpose != "batch":
        return invalid_request("only purpose 'batch' is simulated", "purpose")
    if not isinstance(upload, web.FileField):
        return invalid_request("'file' must be a file", "file")
    made = state.batches.add_file(upload.filename or "upload.jsonl", purpose, upload.file.read())
    state.batches.files_uploaded += 1
    if state.config.file_upload_delay > 0:
        await asyncio.sleep(state.config.file_upload_delay)
    return web.json_response(made.as_object())


def _file(request: web.Request) -> SimFile | None:
    return request.app[STATE].batches.files.get(request.match_info["file_id"])


async def get_file(request: web.Request) -> web.Response:
    found = _file(request)
    if found is None:
        return _not_found("file")
    return web.json_response(found.as_object())


async def get_file_content(request: web.Request) -> web.Response:
    found = _file(request)
    if found is None:
        return _not_found("file")
    return web.Response(body=found.data, content_type="application/octet-stream")


async def create_batch(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        body = await request.json()
    except ValueError:
        return invalid_request("We could not parse the JSON body of your request.")
    if not isinstance(body, dict):
        return invalid_request("The request body must be a JSON object.")
    if body.get("endpoint") != CHAT_ENDPOINT:
        return invalid_request(f"only endpoint {CHAT_ENDPOINT} is simulated", "endpoint")
    if body.get("completion_window") != "24h":
        return invalid_request("completion_window must be '24h'", "completion_window")
    metadata = body.get("metadata")
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        return invalid_request("metadata must map strings to strings", "metadata")
    source = state.batches.files.get(str(body.get("input_file_id")))
    if source is None:
        return invalid_request("no such input file", "input_file_id")
    try:
        lines, mode = parse_lines(source.data)
    except InvalidRequest as error:
        return invalid_request(str(error), "input_file_id")
    config = state.config
    batch = SimBatch(
        id=f"batch_{uuid.uuid4().hex[:24]}",
        input_file_id=source.id,
        endpoint=CHAT_ENDPOINT,
        completion_window="24h",
        metadata=metadata,
        lines=lines,
        mode=mode,
        created=_now(),
        validating=config.batch_validating,
        in_progress=config.batch_seconds,
        finalizing=config.batch_finalizing,
    )
    state.batches.batches[batch.id] = batch
    state.batches.created += 1
    if config.batch_create_delay > 0:
        await asyncio.sleep(config.batch_create_delay)
    return web.json_response(batch_object(batch))


def _batch(request: web.Request) -> SimBatch | None:
    state = request.app[STATE]
    found = state.batches.batches.get(request.match_info["batch_id"])
    if found is not None:
        advance(found, state, _now())
    return found


async def get_batch(request: web.Request) -> web.Response:
    found = _batch(request)
    if found is None:
        return _not_found("batch")
    return web.json_response(batch_object(found))


async def list_batches(request: web.Request) -> web.Response:
    """Newest first, `limit` (1-100, default 20) a page, `after` a batch id, as OpenAI's."""
    state = request.app[STATE]
    try:
        limit = min(MAX_LIST, max(1, int(request.query.get("limit", "20"))))
    except ValueError:
        return invalid_request("limit must be an integer", "limit")
    ordered = list(reversed(state.batches.batches.values()))
    after = request.query.get("after")
    if after is not None:
        ids = [batch.id for batch in ordered]
        ordered = ordered[ids.index(after) + 1 :] if after in ids else []
    page = ordered[:limit]
    now = _now()
    for batch in page:
        advance(batch, state, now)
    return web.json_response(
        {
            "object": "list",
            "data": [batch_object(batch) for batch in page],
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": len(ordered) > limit,
        }
    )


async def cancel_batch(request: web.Request) -> web.Response:
    state = request.app[STATE]
    found = _batch(request)
    if found is None:
        return _not_found("batch")
    if found.status in TERMINAL:
        return error_response(
            409,
            f"Cannot cancel a batch with status '{found.status}'.",
            "invalid_request_error",
            None,
        )
    if found.canceled_at is None:
        now = _now()
        found.answered_at_cancel = found.answered_by(now)
        found.canceled_at = now
        state.batches.canceled += 1
        advance(found, state, now)
    return web.json_response(batch_object(found))


async def list_sim_batches(request: web.Request) -> web.Response:
    """Admin: every batch with its model and request count, oldest first."""
    state = request.app[STATE]
    now = _now()
    items = []
    for batch in state.batches.batches.values():
        advance(batch, state, now)
        items.append(
            {
                "id": batch.id,
                "model": batch.model,
                "status": batch.status,
                "requests": len(batch.lines),
                "metadata": batch.metadata,
                "canceled": batch.canceled_at is not None,
            }
        )
    return web.json_response({"items": items})


def _not_found(what: str) -> web.Response:
    return error_response(404, f"No such {what}.", "invalid_request_error", "not_found")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/files", upload_file)
    app.router.add_get("/v1/files/{file_id}", get_file)
    app.router.add_get("/v1/files/{file_id}/content", get_file_content)
    app.router.add_post("/v1/batches", create_batch)
    app.router.add_get("/v1/batches", list_batches)
    app.router.add_get("/v1/batches/{batch_id}", get_batch)
    app.router.add_post("/v1/batches/{batch_id}/cancel", cancel_batch)
    app.router.add_get("/_sim/batches", list_sim_batches)
