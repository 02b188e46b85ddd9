"""`flask keys create|revoke`: API keys are shown once, at creation; only hashes are stored."""

from __future__ import annotations

import click
from flask.cli import with_appcontext

from app.keys.api_keys import ROLES, create_api_key, revoke_api_key
from app.runtime import runtime


@click.group(help="Manage API keys.")
def keys() -> None:
    pass


@keys.command("create", help="Create an API key and print it (it is not stored in clear).")
@click.option("--owner", required=True, help="The tenant whose jobs the key reaches.")
@click.option("--name", default="default", show_default=True)
@click.option("--role", type=click.Choice(ROLES), default="user", show_default=True)
@with_appcontext
def create(owner: str, name: str, role: str) -> None:
    click.echo(create_api_key(runtime().db, owner, name=name, role=role))


@keys.command("revoke", help="Revoke keys by their first 12 characters.")
@click.argument("prefix")
@with_appcontext
def revoke(prefix: str) -> None:
    click.echo(f"revoked {revoke_api_key(runtime().db, prefix)} key(s)")
