"""The API's OpenAPI document (`GET /openapi.json`) and its reference page (`GET /docs`),
generated from the operations the app routes (app/api/spec.py)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, render_template
from pydantic import BaseModel

from app.api import spec
from app.jobs.payloads import EventEnvelope
from app.kinds import KINDS

bp = Blueprint("openapi", __name__, template_folder="templates")

TITLE = "Conveyor API"
VERSION = "1"
EXTENSION_KEY = "conveyor.openapi"

# Models the document describes though no operation names them: each kind's input, the shape
# `JobCreate.input` takes (see link_kind_inputs), and the envelope of every event with its
# payload, the shape of Socket.IO and SSE messages.
extra_schemas: list[type[BaseModel]] = [*(kind.Input for kind in KINDS.values()), EventEnvelope]


@bp.get("/openapi.json")
def openapi() -> Response:
    return jsonify(cached_document())


@bp.get("/docs")
def docs() -> str:
    return render_template("api_docs.html", doc=cached_document())


def cached_document() -> dict[str, Any]:
    """Built on the first request, when every blueprint is registered, then kept for the app."""
    extensions = current_app.extensions
    if EXTENSION_KEY not in extensions:
        extensions[EXTENSION_KEY] = build_document(current_app)
    document: dict[str, Any] = extensions[EXTENSION_KEY]
    return document


def build_document(app: Flask) -> dict[str, Any]:
    document = spec.document(TITLE, VERSION, spec.routed_operations(app), extra_schemas)
    link_kind_inputs(document)
    return document


def link_kind_inputs(document: dict[str, Any]) -> None:
    """`JobCreate.input` (and a batch item's) is validated by the chosen kind; say so in the
    schema."""
    schemas = document["components"]["schemas"]
    names = [kind.Input.__name__ for kind in KINDS.values()]
    for model in ("JobCreate", "BatchItem"):
        schemas[model]["properties"]["input"] = {
            "description": "The input of the chosen kind: "
            + ", ".join(f"{kind} -> {name}" for kind, name in zip(KINDS, names, strict=True)),
            "anyOf": [{"$ref": f"#/components/schemas/{name}"} for name in names],
        }
