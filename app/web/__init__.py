"""The dashboard. For now a landing page pointing to the API; the live dashboard comes next."""

from __future__ import annotations

from flask import Blueprint, Flask, render_template

bp = Blueprint("web", __name__, template_folder="templates")


@bp.get("/")
def index() -> str:
    return render_template("index.html")


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
