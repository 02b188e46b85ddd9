"""The dashboard: one page of plain HTML and JavaScript modules, served by Flask.

Its one browser dependency, the official `socket.io-client`, is installed from the npm
registry by `make` (`npm ci` in app/web) and served from node_modules; it is not committed.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Flask, Response, abort, render_template, send_from_directory

bp = Blueprint(
    "web",
    __name__,
    template_folder="templates",
    static_folder="static",
    static_url_path="/dashboard/static",
)
VENDOR = {"socket.io.min.js": Path(__file__).parent / "node_modules/socket.io-client/dist"}


@bp.get("/")
def index() -> str:
    return render_template("index.html")


@bp.get("/vendor/<path:filename>", endpoint="vendor")
def vendor(filename: str) -> Response:
    folder = VENDOR.get(filename)
    if folder is None:
        abort(404)
    return send_from_directory(folder, filename, max_age=3600)


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
