"""The HTTP API under /api/v1, and its generated OpenAPI document and reference page."""

from __future__ import annotations

from flask import Blueprint, Flask, Response, jsonify, render_template

from app.api import jobs, problems, system
from app.api.spec import Api
from app.kinds import KINDS

PREFIX = jobs.PREFIX


def build_api() -> Api:
    blueprint = Blueprint("api", __name__, url_prefix=PREFIX, template_folder="templates")
    api = Api(blueprint, title="Conveyor API", version="1")
    jobs.register(api)
    system.register(api)
    api.extra_schemas.extend(kind.Input for kind in KINDS.values())
    document = None

    @blueprint.get("/openapi.json")
    def openapi() -> Response:
        nonlocal document
        if document is None:
            document = api.document(PREFIX)
        return jsonify(document)

    @blueprint.get("/docs")
    def docs() -> str:
        nonlocal document
        if document is None:
            document = api.document(PREFIX)
        return render_template("api_docs.html", doc=document)

    return api


def init_app(app: Flask) -> None:
    problems.init_app(app)
    api = build_api()
    app.register_blueprint(api.blueprint)
    app.extensions["conveyor.api"] = api
