"""The cards resource: importing a character card from the file a user has, a PNG portrait or a
JSON document, and answering the validated Character Card V2 (docs/cards.md)."""

from __future__ import annotations

from collections.abc import Callable

from flask import Blueprint, Response, request

from app.api.problems import ApiProblem, FieldError, field_problem
from app.api.spec import JSON, json_response, operation
from app.cards import (
    PNG_SIGNATURE,
    CardError,
    CharacterCardV2,
    Fault,
    read_json_card,
    read_png_card,
)
from app.keys.api_keys import JOBS_READ
from app.runtime import runtime

bp = Blueprint("cards", __name__)

PNG = "image/png"
MULTIPART = "multipart/form-data"
UPLOAD_FIELD = "file"
# The field an error names when the fault is in the whole raw or JSON body.
BODY = "(body)"
# How each fault reads as a problem's title; the slug is the fault's own value.
TITLES = {
    Fault.NOT_PNG: "Not a PNG image",
    Fault.CORRUPT_PNG: "The PNG is corrupt",
    Fault.NO_CARD: "The PNG holds no character card",
    Fault.BAD_BASE64: "The card chunk is not base64",
    Fault.BAD_JSON: "The card is not valid JSON",
    Fault.CARD_TOO_LARGE: "The card is too large",
    Fault.INVALID_CARD: "The card is not valid",
}


@bp.post("/cards/import")
@operation(
    summary="Import a character card",
    tag="cards",
    scope=JOBS_READ,  # it stores nothing: a conversion, not a write
    content={
        # A V1 or V3 card is accepted too, and answered as V2.
        JSON: CharacterCardV2,
        PNG: {
            "type": "string",
            "contentMediaType": PNG,
            "description": "A card PNG: a `chara` (V2) or `ccv3` (V3) tEXt chunk",
        },
        MULTIPART: {
            "type": "object",
            "required": [UPLOAD_FIELD],
            "properties": {
                UPLOAD_FIELD: {
                    "type": "string",
                    "contentMediaType": "application/octet-stream",
                    "description": "A card PNG, or a card's JSON file",
                }
            },
        },
    },
    responses={200: (CharacterCardV2, "The card, validated, as Character Card V2")},
)
def import_card() -> Response:
    """Reads a card from a PNG (a raw `image/png` body, or the `file` of a
    `multipart/form-data` upload) or from JSON (an `application/json` body, or a JSON `file`):
    V2 as it is, V3 brought down to V2, V1 upgraded. Checks it against the spec's JSON Schema
    and Conveyor's bounds, and answers the V2 card; nothing is stored. A PNG with both a
    `ccv3` and a `chara` chunk is read from `ccv3` when that holds a valid card. Bodies up to
    `CONVEYOR_CARD_MAX_BYTES`."""
    # A portrait is larger than any other request body this API takes: this route's own limit.
    request.max_content_length = runtime().settings.card_max_bytes
    read, data, whole = _uploaded_card()
    try:
        card = read(data)
    except CardError as exc:
        raise _problem(exc, whole) from None
    return json_response(card)


def _uploaded_card() -> tuple[Callable[[bytes], CharacterCardV2], bytes, str]:
    """How to read the card sent, its bytes, and the field that names them in an error."""
    if request.mimetype == PNG:
        return read_png_card, request.get_data(), BODY
    if request.is_json:
        return read_json_card, request.get_data(), BODY
    if request.mimetype == MULTIPART:
        upload = request.files.get(UPLOAD_FIELD)
        if upload is None:
            raise field_problem(UPLOAD_FIELD, "a card file is required")
        return _read_upload, upload.read(), UPLOAD_FIELD
    raise ApiProblem(
        415,
        "unsupported-media-type",
        "Send a PNG or a JSON card",
        f"The body must be {PNG}, {JSON}, or {MULTIPART} with a `{UPLOAD_FIELD}`.",
    )


def _read_upload(data: bytes) -> CharacterCardV2:
    """An uploaded file is a JSON card if it looks like one, else it must be a PNG."""
    if not data.startswith(PNG_SIGNATURE) and data.lstrip()[:1] == b"{":
        return read_json_card(data)
    return read_png_card(data)


def _problem(exc: CardError, whole: str) -> ApiProblem:
    if whole == BODY and request.is_json and exc.fault is Fault.BAD_JSON:
        # The body itself does not parse: the API's answer to any malformed JSON body.
        return ApiProblem(400, "malformed-json", "The body is not valid JSON", exc.message)
    errors = [FieldError(field=issue.field or whole, message=issue.message) for issue in exc.issues]
    return ApiProblem(
        422,
        exc.fault.value,
        TITLES[exc.fault],
        exc.describe(),
        errors or [FieldError(field=whole, message=exc.message)],
    )
