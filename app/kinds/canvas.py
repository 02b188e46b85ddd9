"""`canvas`: objects for one of the owner's canvases, drawn by the model from a prompt.

The model answers with JSON (`ask_for_json`, one repair call when it does not match) in a flat
per-object schema that the simulator and strict structured output both handle: every field
present, colours from a palette, positions inside the canvas. Each answer object is then
validated into its shape (app/jobs/canvas_shapes.py); the objects are saved by the job's
successful finish itself (canvases.save_effect), so a retried, duplicated or stale attempt
never saves twice or half. The canvas's room hears `ai_generation_started` when an attempt
begins and, once the job has ended, the saved objects and `ai_generation_completed`, or
`ai_job_error` (docs/canvas.md).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from app.jobs import canvases
from app.jobs.canvas_shapes import (
    BOX_TYPES,
    LINE_TYPES,
    MAX_JOB_OBJECTS,
    MAX_OBJECTS,
    SHAPES,
    CanvasObjectIn,
)
from app.jobs.events import canvas_room
from app.jobs.payloads import CanceledPayload, FailedPayload, TerminalPayload
from app.kinds.base import MAX_PROMPT_CHARS, Admission, KindError
from app.kinds.context import JobContext, token_progress
from app.kinds.structured import ask_for_json
from app.llm.errors import ModelError

NAME = "canvas"
DESCRIPTION = (
    "Objects for one of your canvases (rectangles, ellipses, lines, arrows, text, sticky notes), "
    "drawn by the model from a prompt and saved on the canvas when the job succeeds."
)

PALETTE = (
    "#1f2937",
    "#ffffff",
    "#ef4444",
    "#f97316",
    "#fde68a",
    "#22c55e",
    "#06b6d4",
    "#2563eb",
    "#8b5cf6",
    "#ec4899",
)
MAX_MODEL_TEXT = 500
MAX_IMAGES = 20
SYSTEM = (
    "You draw on a canvas of {width} by {height} pixels (x to the right, y down). Answer with "
    "the objects to add, in the order they stack (the last on top). Every object has a type, "
    "a frame (x, y, width, height, rotation in degrees), a fill and a stroke colour (or null) "
    "and a text: the label of a shape, the words of a text or a sticky note. A line or an "
    "arrow runs from (x, y) to (x + width, y + height), rotated about its middle.{images}"
)
_OBJECT = TypeAdapter(CanvasObjectIn)


class CanvasInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    canvas_id: uuid.UUID = Field(description="One of your canvases (POST /canvases)")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    max_objects: int = Field(
        10,
        ge=1,
        le=MAX_JOB_OBJECTS,
        description=f"The most objects to add; fewer when the canvas has less room "
        f"(it holds {MAX_OBJECTS} at most)",
    )
    artifact_ids: list[uuid.UUID] = Field(
        default_factory=list,
        max_length=MAX_IMAGES,
        description="Published artifacts of yours (images) the model may place as image objects",
    )


class CanvasOutput(BaseModel):
    canvas_id: uuid.UUID
    object_ids: list[uuid.UUID] = Field(
        description="The objects made, saved on the canvas by the job's success (GET the canvas "
        "for what it holds: a canvas deleted or filled meanwhile keeps fewer)"
    )
    repaired: bool = False


@dataclass(frozen=True)
class OpenedCanvas:
    """What the kind read of the canvas before asking the model."""

    width: int
    height: int
    room: int  # objects it can still take


def admit(job_input: CanvasInput, admission: Admission) -> list[tuple[str, str]]:
    """At submit: the canvas is the caller's and has room; each image offered is a published
    artifact of theirs. Checked again when the job runs and when it saves (either may have
    changed meanwhile)."""
    session = admission.session
    try:
        canvas = canvases.get_canvas(session, admission.owner, job_input.canvas_id)
    except canvases.CanvasNotFound:
        return [("canvas_id", f"no canvas {job_input.canvas_id}")]
    errors = []
    if canvas.object_count >= MAX_OBJECTS:
        errors.append(("canvas_id", f"the canvas is full: it holds {MAX_OBJECTS} objects"))
    usable = canvases.usable_artifacts(session, admission.owner, job_input.artifact_ids)
    if unusable := [str(a) for a in job_input.artifact_ids if a not in usable]:
        errors.append(("artifact_ids", f"no published artifact {', '.join(unusable)}"))
    return errors


def run(ctx: JobContext, job_input: CanvasInput) -> CanvasOutput:
    found = _open_canvas(ctx, job_input)
    canvas_id = job_input.canvas_id
    announcer = _Announcer(ctx, canvas_id)
    ctx.after_finish(announcer)
    notice = canvases.GenerationStarted(
        canvas_id=canvas_id,
        job_id=ctx.job_id,
        attempt=ctx.attempt,
        max_objects=job_input.max_objects,
    )
    ctx.broadcast([canvas_room(canvas_id)], notice.name, notice.data())
    if found.room <= 0:
        raise KindError(f"canvas {canvas_id} is full: it holds {MAX_OBJECTS} objects")
    count = min(job_input.max_objects, found.room)
    schema = answer_schema(count, found.width, found.height, job_input.artifact_ids)
    images = _images_line(job_input.artifact_ids)
    messages = [
        {
            "role": "system",
            "content": SYSTEM.format(width=found.width, height=found.height, images=images),
        },
        {"role": "user", "content": job_input.prompt},
    ]
    data, repaired = ask_for_json(
        ctx, messages, schema, "canvas_objects", progress_of=token_progress(None)
    )
    rows = _validated_rows(ctx, data["objects"][:count])
    announcer.generated = len(rows)
    ctx.on_success("canvas", canvases.save_effect(canvas_id, ctx.claim.owner, rows))
    return CanvasOutput(
        canvas_id=canvas_id, object_ids=[row["id"] for row in rows], repaired=repaired
    )


def _open_canvas(ctx: JobContext, job_input: CanvasInput) -> OpenedCanvas:
    """The owner's canvas and its room; KindError (invalid_input) when it is not theirs or an
    image they offer is not a published artifact of theirs. Checked again when saving."""
    with ctx.db.transaction() as session:
        try:
            canvas = canvases.get_canvas(session, ctx.claim.owner, job_input.canvas_id)
        except canvases.CanvasNotFound:
            raise KindError(f"input.canvas_id: no canvas {job_input.canvas_id}") from None
        usable = canvases.usable_artifacts(session, ctx.claim.owner, job_input.artifact_ids)
        found = OpenedCanvas(canvas.width, canvas.height, MAX_OBJECTS - canvas.object_count)
    if unusable := [str(a) for a in job_input.artifact_ids if a not in usable]:
        raise KindError(f"input.artifact_ids: no published artifact {', '.join(unusable)}")
    return found


def answer_schema(
    count: int, width: int, height: int, artifact_ids: list[uuid.UUID]
) -> dict[str, Any]:
    """The JSON Schema the model answers in: 1 to `count` objects inside the canvas."""
    colour = {"type": ["string", "null"], "enum": [*PALETTE, None]}
    types = [*BOX_TYPES, *LINE_TYPES] if artifact_ids else [*BOX_TYPES[:-1], *LINE_TYPES]
    properties: dict[str, Any] = {
        "type": {"type": "string", "enum": types},
        "x": {"type": "number", "minimum": 0, "maximum": width},
        "y": {"type": "number", "minimum": 0, "maximum": height},
        "width": {"type": "number", "minimum": 1, "maximum": width},
        "height": {"type": "number", "minimum": 1, "maximum": height},
        "rotation": {"type": "number", "minimum": 0, "maximum": 359},
        "fill": colour,
        "stroke": colour,
        "text": {"type": "string", "minLength": 1, "maxLength": MAX_MODEL_TEXT},
    }
    if artifact_ids:
        properties["artifact_id"] = {
            "type": ["string", "null"],
            "enum": [*(str(a) for a in artifact_ids), None],
        }
    item = {
        "type": "object",
        "additionalProperties": False,
        "required": list(properties),
        "properties": properties,
    }
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["objects"],
        "properties": {
            "objects": {"type": "array", "minItems": 1, "maxItems": count, "items": item}
        },
    }


def _images_line(artifact_ids: list[uuid.UUID]) -> str:
    if not artifact_ids:
        return ""
    return (
        " You may place these images as objects of type image, naming one in artifact_id "
        f"(null for every other type): {', '.join(str(a) for a in artifact_ids)}."
    )


def _validated_rows(ctx: JobContext, answer: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each answer object as a row of its shape, with a new id; one that fits no shape (an
    image without an artifact, say) is left out and logged. None fitting fails the job."""
    rows, refused = [], []
    for position, raw in enumerate(answer):
        # The answer has every field for every type: each shape takes the ones it has (a
        # line has no fill, an image no text).
        shape_fields = SHAPES[raw["type"]].model_fields
        fields = {k: v for k, v in raw.items() if v is not None and k in shape_fields}
        try:
            shape = _OBJECT.validate_python(fields)
        except ValidationError as exc:
            refused.append(f"objects[{position}]: {exc.errors()[0]['msg']}")
            continue
        rows.append({**shape.row(), "id": str(uuid.uuid4())})
    if refused:
        ctx.log("objects left out", level="warning", refused=refused[:10])
    if not rows:
        raise ModelError(
            "output_invalid", f"no object the model made is valid: {refused[0]}", retryable=False
        )
    return rows


@dataclass
class _Announcer:
    """Tells the canvas's room how the job ended, once its outcome is written: the saved
    objects (read back, so the room hears what the canvas holds) and `ai_generation_completed`,
    or `ai_job_error`."""

    ctx: JobContext
    canvas_id: uuid.UUID
    generated: int = 0  # objects the model made, set once they are known

    def __call__(self, payload: TerminalPayload) -> None:
        rooms = [canvas_room(self.canvas_id)]
        ids = {"canvas_id": self.canvas_id, "job_id": self.ctx.job_id}
        if isinstance(payload, FailedPayload):
            error = canvases.JobErrorNotice(
                **ids, status="failed", code=payload.error.code, message=payload.error.message
            )
            self.ctx.broadcast(rooms, error.name, error.data())
            return
        if isinstance(payload, CanceledPayload):
            error = canvases.JobErrorNotice(
                **ids, status="canceled", code="canceled", message="the job was canceled"
            )
            self.ctx.broadcast(rooms, error.name, error.data())
            return
        with self.ctx.db.transaction() as session:
            rows = canvases.objects_of_job(session, self.ctx.job_id)
            saved = [canvases.object_out(row) for row in rows]
        if saved:
            added = canvases.ObjectsAdded(**ids, objects=saved)
            self.ctx.broadcast(rooms, added.name, added.data())
        completed = canvases.GenerationCompleted(
            **ids, object_ids=[obj.id for obj in saved], generated=self.generated
        )
        self.ctx.broadcast(rooms, completed.name, completed.data())


Input = CanvasInput
Output = CanvasOutput
