"""Flask CLI commands (`flask keys create`); the `conveyor` client lives in client.py."""

from __future__ import annotations

from flask import Flask

from app.cli import keys


def init_app(app: Flask) -> None:
    app.cli.add_command(keys.keys)
