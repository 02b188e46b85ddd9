"""A finished job's result as a file: `json` for every kind, and a character card's `card_v2`
JSON and card `png` (docs/cards.md)."""

from __future__ import annotations

import io
import json
import re
import unicodedata
import uuid
from urllib.parse import quote

from flask import Blueprint, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from app.api.jobs import owned_job
from app.api.problems import ApiProblem, field_problem
from app.api.spec import JSON, operation
from app.cards import CardError, card_from_value, card_json, write_png_card
from app.jobs import artifacts, transitions
from app.jobs.states import JobStatus
from app.kinds import character_card, image
from app.models import Job
from app.runtime import runtime
from app.storage import StoreError

bp = Blueprint("downloads", __name__)


class DownloadQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    avatar_job: uuid.UUID | None = Field(
        None, description="`png` of a card: an `image` job whose first image is the portrait"
    )


PNG = "image/png"
# Each format: its media type, its file extension, and the kinds it exists for (None: all).
FORMATS: dict[str, tuple[str, str, frozenset[str] | None]] = {
    "json": (JSON, "json", None),
    "card_v2": (JSON, "card.json", frozenset({character_card.NAME})),
    "png": (PNG, "png", frozenset({character_card.NAME})),
}


@bp.get("/jobs/<uuid:job_id>/download/<fmt>")
@operation(
    summary="Download a finished job's result as a file",
    query=DownloadQuery,
    responses={
        200: (None, "The file, with a Content-Disposition filename"),
        404: (None, "No such job (or another owner's), or no such format for its kind"),
        409: (None, "The job has not succeeded"),
    },
)
def download(job_id: uuid.UUID, fmt: str, query: DownloadQuery) -> Response:
    """Formats: `json` (the job's output, any kind); for a `character_card` job also `card_v2`
    (the Character Card V2 JSON) and `png` (a card PNG: the card in its `chara` and `ccv3`
    chunks, on the first image of the `image` job `avatar_job` names, or of the job's own
    `avatar_job_id` input, else on a placeholder portrait). The filename is the character's
    name."""
    job = owned_job(job_id)
    if fmt not in FORMATS:
        raise ApiProblem(404, "unknown-format", "No such format", f"formats: {', '.join(FORMATS)}")
    media_type, extension, kinds = FORMATS[fmt]
    if kinds is not None and job.kind not in kinds:
        raise ApiProblem(
            404,
            "unknown-format",
            "No such format for this kind",
            f"{fmt} exists for {', '.join(sorted(kinds))} jobs; this job is {job.kind}",
        )
    if job.status != JobStatus.SUCCEEDED or job.output is None:
        raise ApiProblem(
            409,
            "job-not-succeeded",
            "The job has not succeeded",
            f"the job is {job.status}; its files exist once it has succeeded",
            headers={"Retry-After": "1"},
        )
    body = _render(job, fmt, _avatar(job, query) if fmt == "png" else None)
    name = _stem(job)
    return Response(body, mimetype=media_type, headers=attachment_header(f"{name}.{extension}"))


def _render(job: Job, fmt: str, picture: Image.Image | None) -> bytes:
    if fmt == "json":
        return json.dumps(job.output, ensure_ascii=False, indent=2).encode()
    try:
        card = card_from_value(job.output)
    except CardError as exc:  # a stored card no longer valid under today's bounds
        raise ApiProblem(409, "invalid-card", "The stored card is not valid", str(exc)) from None
    return card_json(card) if fmt == "card_v2" else write_png_card(card, picture)


def _avatar(job: Job, query: DownloadQuery) -> Image.Image | None:
    """The first image of the image job the request (or the card job's input) names."""
    image_job_id = query.avatar_job or (job.input or {}).get("avatar_job_id")
    if image_job_id is None:
        return None
    field = "avatar_job" if query.avatar_job else "input.avatar_job_id"
    session = runtime().db.request_session
    try:
        image_job = transitions.get_job(session, job.owner, uuid.UUID(str(image_job_id)))
    except (transitions.JobNotFound, ValueError):
        raise field_problem(field, f"no image job {image_job_id}") from None
    found = artifacts.job_artifacts(session, job.owner, image_job.id)
    if image_job.kind != image.NAME:
        raise field_problem(field, f"job {image_job.id} is a {image_job.kind} job, not an image")
    if not found:
        detail = f"the image job is {image_job.status}; it has no image"
        raise ApiProblem(409, "avatar-unavailable", "The avatar has no image", detail)
    try:
        data = b"".join(runtime().artifacts.read(found[0]))
        with Image.open(io.BytesIO(data)) as picture:
            # A palette or CMYK image as RGBA, which every PNG reader draws alike.
            keep = picture.mode in ("RGB", "RGBA")
            return picture.copy() if keep else picture.convert("RGBA")
    except StoreError as exc:
        raise ApiProblem(
            503,
            "artifact-unavailable",
            "The avatar cannot be read now",
            str(exc),
            headers={"Retry-After": "5"},
        ) from None


def _stem(job: Job) -> str:
    """The character's name for a card, else the job id."""
    data = (job.output or {}).get("data") if job.kind == character_card.NAME else None
    name = data.get("name") if isinstance(data, dict) else None
    return name.strip() if isinstance(name, str) and name.strip() else str(job.id)


def attachment_header(filename: str, disposition: str = "attachment") -> dict[str, str]:
    """Content-Disposition with an ASCII fallback and the UTF-8 name (RFC 6266 / 8187)."""
    ascii_name = unicodedata.normalize("NFKD", filename).encode("ascii", "ignore").decode()
    ascii_name = re.sub(r"[^A-Za-z0-9._ -]", "_", ascii_name).strip() or "download"
    return {
        "Content-Disposition": f'{disposition}; filename="{ascii_name}"; '
        f"filename*=UTF-8''{quote(filename, safe='')}"
    }
