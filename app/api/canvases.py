"""The canvases resource: a tenant's drawing surfaces and their objects, which canvas jobs
(`kind: canvas`) add to. Every query is scoped to the caller: another owner's canvas is a 404."""

from __future__ import annotations

import uuid

from flask import Blueprint, Response, request
from pydantic import BaseModel, ValidationError

from app.api.auth import current_principal
from app.api.jobs import PREFIX
from app.api.problems import ApiProblem, FieldError, field_problem
from app.api.schemas import (
    BadCursor,
    CanvasCreate,
    CanvasDetail,
    CanvasListQuery,
    CanvasOut,
    CanvasPage,
    decode_cursor,
    encode_cursor,
)
from app.api.spec import json_response, operation, parse_body
from app.jobs import canvases
from app.jobs.canvas_shapes import SHAPES
from app.models import Canvas
from app.runtime import runtime

bp = Blueprint("canvases", __name__)


def parse_canvas_body(model: type[BaseModel]) -> CanvasCreate:
    """`parse_body`, with an object's errors named as the client wrote it: pydantic puts the
    matched shape in the path (`objects.3.rectangle.width`), the client wrote
    `objects.3.width`."""
    try:
        return parse_body(model)  # type: ignore[return-value]
    except ApiProblem as problem:
        if problem.status != 422:
            raise
        try:  # again, for the errors themselves (only a bad body pays for this)
            model.model_validate_json(request.get_data(cache=True))
        except ValidationError as exc:
            raise _validation_problem(exc) from None
        raise  # valid but refused otherwise (a NUL character)


def _validation_problem(exc: ValidationError) -> ApiProblem:
    errors = []
    for error in exc.errors(include_url=False):
        loc = list(error["loc"])
        if len(loc) > 2 and loc[0] == "objects" and loc[2] in SHAPES:
            del loc[2]
        path = ".".join(str(part) for part in loc) or "(body)"
        errors.append(FieldError(field=path, message=error["msg"]))
    detail = "; ".join(f"{e.field}: {e.message}" for e in errors[:5])
    return ApiProblem(422, "validation-error", "The request is not valid", detail, errors)


@bp.post("/canvases")
@operation(
    summary="Create a canvas",
    tag="canvases",
    body=CanvasCreate,
    body_parser=parse_canvas_body,
    responses={201: (CanvasDetail, "Created, with its objects")},
)
def create_canvas(body: CanvasCreate) -> Response:
    """A canvas, optionally with its first objects (bottom to top; an object's `z` defaults
    to its position). An image object names a published artifact of yours. Canvas jobs add
    objects to it (`POST /jobs` with `kind: canvas`)."""
    db = runtime().db
    try:
        with db.transaction() as session:
            canvas = canvases.create_canvas(
                session,
                current_principal().owner,
                body.name,
                body.width,
                body.height,
                body.objects,
            )
    except canvases.UnusableArtifacts as exc:
        message = "not a published artifact of yours"
        errors = [
            FieldError(field=f"objects.{i}.artifact_id", message=message) for i in exc.positions
        ]
        detail = "; ".join(f"{e.field}: {e.message}" for e in errors[:5])
        raise ApiProblem(
            422, "validation-error", "The request is not valid", detail, errors
        ) from None
    out = _detail(canvas)
    return json_response(out, 201, {"Location": out.links.self})


@bp.get("/canvases")
@operation(
    summary="List canvases",
    tag="canvases",
    query=CanvasListQuery,
    responses={200: (CanvasPage, "Newest first, keyset-paginated")},
)
def list_canvases(query: CanvasListQuery) -> Response:
    before = None
    if query.cursor is not None:
        try:
            before = decode_cursor(query.cursor)
        except BadCursor as exc:
            raise field_problem("cursor", str(exc), str(exc)) from None
    session = runtime().db.request_session
    found = canvases.list_canvases(session, current_principal().owner, query.limit + 1, before)
    page, more = found[: query.limit], len(found) > query.limit
    return json_response(
        CanvasPage(
            items=[CanvasOut.of(canvas, PREFIX) for canvas in page],
            next_cursor=encode_cursor(page[-1].created_at, page[-1].id) if more else None,
        )
    )


@bp.get("/canvases/<uuid:canvas_id>")
@operation(
    summary="Get a canvas and its objects",
    tag="canvases",
    responses={200: (CanvasDetail, "The canvas, its objects bottom to top")},
)
def get_canvas(canvas_id: uuid.UUID) -> Response:
    try:
        canvas = canvases.get_canvas(
            runtime().db.request_session, current_principal().owner, canvas_id
        )
    except canvases.CanvasNotFound:
        raise _not_found(canvas_id) from None
    return json_response(_detail(canvas))


@bp.delete("/canvases/<uuid:canvas_id>")
@operation(summary="Delete a canvas", tag="canvases", responses={204: (None, "Deleted")})
def delete_canvas(canvas_id: uuid.UUID) -> Response:
    """Deletes the canvas and its objects. A canvas job still running on it then succeeds
    without saving anything."""
    try:
        with runtime().db.transaction() as session:
            canvases.delete_canvas(session, current_principal().owner, canvas_id)
    except canvases.CanvasNotFound:
        raise _not_found(canvas_id) from None
    return Response(status=204)


def _detail(canvas: Canvas) -> CanvasDetail:
    objects = canvases.objects_of(runtime().db.request_session, canvas.id)
    return CanvasDetail(
        **CanvasOut.of(canvas, PREFIX).model_dump(),
        objects=[canvases.object_out(row) for row in objects],
    )


def _not_found(canvas_id: uuid.UUID) -> ApiProblem:
    return ApiProblem(404, "not-found", "Not found", f"no canvas {canvas_id}")
