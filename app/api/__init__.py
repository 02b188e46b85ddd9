"""The HTTP API under /api/v1, and its generated OpenAPI document and reference page."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask, Response, jsonify, render_template
from flask_cors import CORS

from app.api import health, jobs, problems, realtime, system
from app.api.spec import Api
from app.config import Settings
from app.jobs.payloads import EventEnvelope
from app.kinds import KINDS

PREFIX = jobs.PREFIX

# What a browser app on an allowed origin may send and read. Credentials (cookies) are never
# allowed: the API authenticates with a bearer key the app sends itself.
CORS_REQUEST_HEADERS = ["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"]
CORS_EXPOSED_HEADERS = ["Location", "Retry-After", "Idempotent-Replayed"]
CORS_MAX_AGE = 600


def build_api() -> Api:
    blueprint = Blueprint("api", __name__, url_prefix=PREFIX, template_folder="templates")
    api = Api(blueprint, title="Conveyor API", version="1")
    jobs.register(api)
    system.register(api)
    realtime.register(api)
    api.extra_schemas.extend(kind.Input for kind in KINDS.values())
    api.extra_schemas.append(EventEnvelope)
    document = None

    @blueprint.get("/openapi.json")
    def openapi() -> Response:
        return jsonify(cached_document())

    @blueprint.get("/docs")
    def docs() -> str:
        return render_template("api_docs.html", doc=cached_document())

    def cached_document() -> dict[str, Any]:
        nonlocal document
        if document is None:
            document = api.document(PREFIX)
            link_kind_inputs(document)
        return document

    return api


def link_kind_inputs(document: dict[str, Any]) -> None:
    """`JobCreate.input` is validated by the chosen kind; say so in the schema."""
    schemas = document["components"]["schemas"]
    names = [kind.Input.__name__ for kind in KINDS.values()]
    schemas["JobCreate"]["properties"]["input"] = {
        "description": "The input of the chosen kind: "
        + ", ".join(f"{kind} -> {name}" for kind, name in zip(KINDS, names, strict=True)),
        "anyOf": [{"$ref": f"#/components/schemas/{name}"} for name in names],
    }


def init_app(app: Flask, settings: Settings) -> None:
    problems.init_app(app)
    health.init_app(app)
    api = build_api()
    app.register_blueprint(api.blueprint)
    app.extensions["conveyor.api"] = api
    if settings.allowed_origins:
        # The same origins Socket.IO accepts; none configured means same-origin only.
        CORS(
            app,
            resources={f"{PREFIX}/*": {"origins": settings.allowed_origins}},
            allow_headers=CORS_REQUEST_HEADERS,
            expose_headers=CORS_EXPOSED_HEADERS,
            supports_credentials=False,
            max_age=CORS_MAX_AGE,
        )
