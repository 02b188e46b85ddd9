"""A finished job's result as a file: `json` for every kind, and a character card's `card_v2`
JSON and card `png` (docs/cards.md)."""

from __future__ import annotations

import json
import re
import unicodedata
import uuid
from urllib.parse import quote

from flask import Blueprint, Response

from app.api.jobs import owned_job
from app.api.problems import ApiProblem
from app.api.spec import JSON, operation
from app.cards import CardError, card_from_value, card_json, write_png_card
from app.jobs.states import JobStatus
from app.kinds import character_card
from app.models import Job

bp = Blueprint("downloads", __name__)

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
    responses={
        200: (None, "The file, with a Content-Disposition filename"),
        404: (None, "No such job (or another owner's), or no such format for its kind"),
        409: (None, "The job has not succeeded"),
    },
)
def download(job_id: uuid.UUID, fmt: str) -> Response:
    """Formats: `json` (the job's output, any kind); for a `character_card` job also `card_v2`
    (the Character Card V2 JSON) and `png` (a card PNG: the card in its `chara` and `ccv3`
    chunks, a placeholder portrait). The filename is the character's name."""
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
    body = _render(job, fmt)
    name = _stem(job)
    return Response(body, mimetype=media_type, headers=attachment_header(f"{name}.{extension}"))


def _render(job: Job, fmt: str) -> bytes:
    if fmt == "json":
        return json.dumps(job.output, ensure_ascii=False, indent=2).encode()
    try:
        card = card_from_value(job.output)
    except CardError as exc:  # a stored card no longer valid under today's bounds
        raise ApiProblem(409, "invalid-card", "The stored card is not valid", str(exc)) from None
    return card_json(card) if fmt == "card_v2" else write_png_card(card)


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
