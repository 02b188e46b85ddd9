"""Canvases: a tenant's drawing surfaces, their objects, and how a canvas job saves its objects.

Every query is scoped to the owner: another owner's canvas is answered like a missing one.

A canvas job's objects are saved by the statement that finishes the job successfully
(`save_effect`, an sql.Effect), so an attempt that does not win the finish (a stale one, a
duplicate delivery, one whose lease was taken) saves nothing, and one that wins saves all its
objects or, when the canvas cannot take them, as many as fit, in that one transaction. The
effect locks the canvas row first: a canvas deleted meanwhile (before or while the finish
runs) gets no objects and the finish still succeeds, rather than failing on a foreign key;
two jobs finishing on one canvas take turns, so together they never pass `MAX_OBJECTS`.
Image objects are saved only while their artifact is a published one of the owner's (locked
too, so the sweeper cannot delete it under the insert).

Live notices of a canvas go to its Socket.IO room, `canvas:<id>` (events.canvas_room), as
messages outside any job's timeline (EventBus.broadcast); their payloads are the models at the
end of this module, one per message name.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.db import newest_page
from app.jobs import sql
from app.jobs.canvas_shapes import MAX_OBJECTS, CanvasObjectIn, CanvasObjectOut
from app.jobs.transitions import JobRequestError
from app.models import Artifact, Canvas, CanvasObject


class CanvasNotFound(JobRequestError):
    pass


class UnusableArtifacts(ValueError):
    """Image objects name artifacts that are not published artifacts of the owner's."""

    def __init__(self, positions: list[int]) -> None:
        super().__init__(f"objects {positions} name no published artifact of yours")
        self.positions = positions


class TooManyObjects(ValueError):
    pass


# Reading ------------------------------------------------------------------------------------


def get_canvas(session: Session, owner: str, canvas_id: uuid.UUID) -> Canvas:
    canvas = session.scalars(
        select(Canvas).where(Canvas.id == canvas_id, Canvas.owner == owner)
    ).one_or_none()
    if canvas is None:
        raise CanvasNotFound(f"no canvas {canvas_id}")
    return canvas


def objects_of(session: Session, canvas_id: uuid.UUID) -> list[CanvasObject]:
    """The canvas's objects, bottom to top."""
    query = select(CanvasObject).where(CanvasObject.canvas_id == canvas_id)
    return list(session.scalars(query.order_by(CanvasObject.z, CanvasObject.id)))


def objects_of_job(session: Session, job_id: uuid.UUID) -> list[CanvasObject]:
    """What a canvas job saved (and its canvas still holds), bottom to top."""
    query = select(CanvasObject).where(CanvasObject.job_id == job_id)
    return list(session.scalars(query.order_by(CanvasObject.z, CanvasObject.id)))


def list_canvases(
    session: Session, owner: str, limit: int, before: tuple[datetime, uuid.UUID] | None
) -> list[Canvas]:
    """Newest first, after the keyset `before` (created_at, id) when given."""
    return newest_page(session, select(Canvas).where(Canvas.owner == owner), Canvas, limit, before)


def object_out(row: CanvasObject) -> CanvasObjectOut:
    return CanvasObjectOut.model_validate(row, from_attributes=True)


def usable_artifacts(
    session: Session, owner: str, artifact_ids: Iterable[uuid.UUID], *, lock: bool = False
) -> set[uuid.UUID]:
    """Which of `artifact_ids` are published artifacts of the owner's (of a job that still
    exists). With `lock`, they stay so until the transaction ends: the sweeper cannot delete
    one between this check and an insert that refers to it."""
    wanted = set(artifact_ids)
    if not wanted:
        return set()
    query = select(Artifact.id).where(
        Artifact.id.in_(wanted),
        Artifact.owner == owner,
        Artifact.published_at.is_not(None),
        Artifact.job_id.is_not(None),
    )
    if lock:
        query = query.with_for_update(key_share=True)
    return set(session.scalars(query))


# Writing (the API's, in its transaction) ------------------------------------------------------


def create_canvas(
    session: Session,
    owner: str,
    name: str,
    width: int,
    height: int,
    objects: Sequence[CanvasObjectIn] = (),
) -> Canvas:
    """A canvas with its first objects. UnusableArtifacts names the image objects whose
    artifact is not a published one of the owner's."""
    if len(objects) > MAX_OBJECTS:
        raise TooManyObjects(f"a canvas holds at most {MAX_OBJECTS} objects")
    images = {i: o.artifact_id for i, o in enumerate(objects) if o.type == "image"}
    usable = usable_artifacts(session, owner, images.values(), lock=True)
    if bad := [i for i, artifact_id in images.items() if artifact_id not in usable]:
        raise UnusableArtifacts(bad)
    rows = [obj.row() for obj in objects]
    for position, row in enumerate(rows):
        row["z"] = position if row["z"] is None else row["z"]
    canvas = Canvas(
        id=uuid.uuid4(),
        owner=owner,
        name=name,
        width=width,
        height=height,
        object_count=len(rows),
        top_z=max((row["z"] for row in rows), default=-1),
    )
    session.add(canvas)
    session.flush()
    session.add_all(CanvasObject(id=uuid.uuid4(), canvas_id=canvas.id, **row) for row in rows)
    session.flush()
    return canvas


def delete_canvas(session: Session, owner: str, canvas_id: uuid.UUID) -> None:
    """Deletes the canvas and its objects; a canvas job still running on it saves nothing."""
    deleted = session.execute(
        delete(Canvas).where(Canvas.id == canvas_id, Canvas.owner == owner).returning(Canvas.id)
    ).one_or_none()
    if deleted is None:
        raise CanvasNotFound(f"no canvas {canvas_id}")


# A canvas job's save: the effect of its successful finish -------------------------------------

# Reads `changed` (one row when the finish won). The canvas row is locked first: it is then
# either gone (nothing is inserted, no foreign key can fail) or stays until the commit, and its
# counters are read current, so concurrent jobs on one canvas add up. Artifacts are locked the
# same way; an image whose artifact is not a published one of the owner's is left out. Objects
# past the canvas's room are left out, from the last.
SAVE_CTES = (
    """canvas_target AS (
    SELECT c.id, c.object_count, c.top_z FROM canvases c
    WHERE c.id = :canvas_id AND c.owner = :canvas_owner AND EXISTS (SELECT 1 FROM changed)
    FOR UPDATE OF c
)""",
    """canvas_images AS (
    SELECT a.id FROM artifacts a
    WHERE a.id IN (SELECT artifact_id FROM jsonb_to_recordset(CAST(:canvas_objects AS jsonb))
                   AS i(artifact_id uuid))
      AND a.owner = :canvas_owner AND a.published_at IS NOT NULL AND a.job_id IS NOT NULL
      AND EXISTS (SELECT 1 FROM canvas_target)
    FOR KEY SHARE OF a
)""",
    """canvas_saved AS (
    INSERT INTO canvas_objects (id, canvas_id, job_id, type, x, y, width, height, rotation, z,
                                fill, stroke, stroke_width, text, artifact_id)
    SELECT o.id, t.id, :job_id, o.type, o.x, o.y, o.width, o.height, o.rotation,
           t.top_z + 1 + o.ord, o.fill, o.stroke, o.stroke_width, o.text, o.artifact_id
    FROM canvas_target t, jsonb_to_recordset(CAST(:canvas_objects AS jsonb)) AS o(
        id uuid, ord int, type text, x float8, y float8, width float8, height float8,
        rotation float8, fill text, stroke text, stroke_width float8, text text,
        artifact_id uuid)
    WHERE o.ord < :canvas_max - t.object_count
      AND (o.artifact_id IS NULL OR o.artifact_id IN (SELECT id FROM canvas_images))
    ON CONFLICT (id) DO NOTHING
    RETURNING z
)""",
    """canvas_counted AS (
    UPDATE canvases SET
        object_count = object_count + (SELECT count(*) FROM canvas_saved),
        top_z = greatest(top_z, (SELECT max(z) FROM canvas_saved)),
        updated_at = now()
    WHERE id = (SELECT id FROM canvas_target)
)""",
)
SAVE_EFFECT_CTE = ",\n".join(SAVE_CTES)


def save_effect(canvas_id: uuid.UUID, owner: str, objects: Sequence[dict[str, Any]]) -> sql.Effect:
    """The effect that saves a canvas job's `objects` (rows of CanvasObjectIn, each with its
    `id`), stacked above what the canvas holds, in their order."""
    rows = [{**obj, "ord": position} for position, obj in enumerate(objects)]
    return sql.Effect(
        SAVE_EFFECT_CTE,
        {
            "canvas_id": canvas_id,
            "canvas_owner": owner,
            "canvas_objects": json.dumps(rows, separators=(",", ":")),
            "canvas_max": MAX_OBJECTS,
        },
    )


# Room messages --------------------------------------------------------------------------------


class RoomMessage(BaseModel):
    """A message to a canvas's room; `name` is its Socket.IO event name."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: ClassVar[str]

    canvas_id: uuid.UUID
    job_id: uuid.UUID

    def data(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class GenerationStarted(RoomMessage):
    """A canvas job's attempt began generating objects for the canvas."""

    name: ClassVar[str] = "ai_generation_started"
    attempt: int = Field(ge=1)
    max_objects: int


class ObjectsAdded(RoomMessage):
    """Objects a canvas job saved, as GET /canvases/{id} now shows them."""

    name: ClassVar[str] = "objects_added"
    objects: list[CanvasObjectOut]


class GenerationCompleted(RoomMessage):
    """The canvas job succeeded; `object_ids` are the objects it saved (fewer than it made
    when the canvas filled up meanwhile, none when the canvas was deleted)."""

    name: ClassVar[str] = "ai_generation_completed"
    object_ids: list[uuid.UUID]
    generated: int = Field(description="objects the model made")


class JobErrorNotice(RoomMessage):
    """The canvas job ended without saving anything: failed or canceled."""

    name: ClassVar[str] = "ai_job_error"
    status: Literal["failed", "canceled"]
    code: str
    message: str | None


ROOM_MESSAGES: tuple[type[RoomMessage], ...] = (
    GenerationStarted,
    ObjectsAdded,
    GenerationCompleted,
    JobErrorNotice,
)
