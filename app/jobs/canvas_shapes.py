"""The objects a canvas holds, as pydantic models: what `POST /canvases` accepts, what a canvas
job's objects are validated into before they are saved, and what the API and the canvas room
send back. Pure shapes and their bounds: no database, no web framework.

Geometry is one frame for every type: `x`, `y` (the top-left corner, or a line's start),
`width`, `height` and `rotation` (degrees, clockwise about the frame's centre). A line or an
arrow runs from (x, y) to (x + width, y + height), so its width and height may be negative; every
other type has a positive width and height. `z` is the stacking order, higher on top.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Bounds: the most objects one canvas holds (across the API and every job), the most one job
# may add, the longest text, and how far from the origin a coordinate may go.
MAX_OBJECTS = 500
MAX_JOB_OBJECTS = 50
MAX_TEXT = 2_000
MAX_COORDINATE = 100_000
MAX_CANVAS_SIDE = 20_000
MAX_Z = 1_000_000
MAX_STROKE_WIDTH = 100

BOX_TYPES = ("rectangle", "ellipse", "text", "sticky_note", "image")
LINE_TYPES = ("line", "arrow")
STICKY_YELLOW = "#fde68a"
INK = "#1f2937"

Color = Annotated[
    str,
    Field(
        pattern=r"^#[0-9a-fA-F]{6}([0-9a-fA-F]{2})?$",
        description="`#rrggbb` or `#rrggbbaa`",
        examples=["#2563eb"],
    ),
]
Coordinate = Annotated[float, Field(ge=-MAX_COORDINATE, le=MAX_COORDINATE)]
Side = Annotated[float, Field(gt=0, le=2 * MAX_COORDINATE)]
Extent = Annotated[float, Field(ge=-2 * MAX_COORDINATE, le=2 * MAX_COORDINATE)]
Rotation = Annotated[float, Field(0, ge=0, lt=360, description="degrees, clockwise")]
Z = Annotated[
    int | None,
    Field(None, ge=0, le=MAX_Z, description="stacking order; default: above what is there"),
]
StrokeWidth = Annotated[float, Field(1, ge=0, le=MAX_STROKE_WIDTH)]
Label = Annotated[str | None, Field(None, max_length=MAX_TEXT)]


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid")

    x: Coordinate
    y: Coordinate
    rotation: Rotation = 0
    z: Z = None
    stroke: Color | None = INK
    stroke_width: StrokeWidth = 1

    def row(self) -> dict[str, Any]:
        """The object's columns (canvas_objects), with every optional one filled in."""
        return {
            "type": self.type,  # type: ignore[attr-defined]
            "x": self.x,
            "y": self.y,
            "width": self.width,  # type: ignore[attr-defined]
            "height": self.height,  # type: ignore[attr-defined]
            "rotation": self.rotation,
            "z": self.z,
            "fill": getattr(self, "fill", None),
            "stroke": self.stroke,
            "stroke_width": self.stroke_width,
            "text": getattr(self, "text", None),
            "artifact_id": str(self.artifact_id) if isinstance(self, Image) else None,
        }


class Rectangle(_Shape):
    type: Literal["rectangle"]
    width: Side
    height: Side
    fill: Color | None = None
    text: Label = None


class Ellipse(_Shape):
    type: Literal["ellipse"]
    width: Side
    height: Side
    fill: Color | None = None
    text: Label = None


class _Segment(_Shape):
    width: Extent = Field(description="the end's x minus the start's")
    height: Extent = Field(description="the end's y minus the start's")
    text: Label = None

    @model_validator(mode="after")
    def _has_length(self) -> Self:
        if self.width == 0 and self.height == 0:
            raise ValueError("a line needs a length: width and height are both 0")
        return self


class Line(_Segment):
    type: Literal["line"]


class Arrow(_Segment):
    """Its head is at the end, (x + width, y + height)."""

    type: Literal["arrow"]


class Text(_Shape):
    type: Literal["text"]
    width: Side
    height: Side
    text: str = Field(min_length=1, max_length=MAX_TEXT)
    fill: Color | None = None
    stroke: Color | None = None


class StickyNote(_Shape):
    type: Literal["sticky_note"]
    width: Side
    height: Side
    text: str = Field("", max_length=MAX_TEXT)
    fill: Color | None = STICKY_YELLOW


class Image(_Shape):
    """An artifact (an image a job of the same owner produced), placed in the frame."""

    type: Literal["image"]
    width: Side
    height: Side
    artifact_id: uuid.UUID = Field(description="a published artifact of the canvas's owner")
    stroke: Color | None = None


SHAPES: dict[str, type[_Shape]] = {
    "rectangle": Rectangle,
    "ellipse": Ellipse,
    "line": Line,
    "arrow": Arrow,
    "text": Text,
    "sticky_note": StickyNote,
    "image": Image,
}
CanvasObjectIn = Annotated[
    Rectangle | Ellipse | Line | Arrow | Text | StickyNote | Image, Field(discriminator="type")
]


class CanvasObjectOut(BaseModel):
    """A saved object, every field present (`null` where the type has none)."""

    id: uuid.UUID
    type: Literal["rectangle", "ellipse", "line", "arrow", "text", "sticky_note", "image"]
    x: float
    y: float
    width: float
    height: float
    rotation: float
    z: int
    fill: str | None
    stroke: str | None
    stroke_width: float
    text: str | None
    artifact_id: uuid.UUID | None = Field(
        description="an image's artifact; null once that artifact was deleted"
    )
    job_id: uuid.UUID | None = Field(description="the canvas job that made it, if one did")
    created_at: datetime | None = None
