"""`flask keys create|revoke`: the operator's commands, on the database directly (the first
admin key comes from here; with one, `conveyor keys` does the same over the API). A key is
shown once, at creation; only its hash is stored."""

from __future__ import annotations

from datetime import UTC, datetime

import click
from flask.cli import with_appcontext

from app.keys.api_keys import DEFAULT_SCOPES, SCOPES, create_api_key, revoke_api_key
from app.runtime import runtime

# Shared with `conveyor keys create` (app/cli/key_commands.py), which makes keys over the API.
name_option = click.option("--name", default="default", show_default=True)
scopes_option = click.option(
    "--scope",
    "scopes",
    type=click.Choice(SCOPES),
    multiple=True,
    default=DEFAULT_SCOPES,
    show_default=True,
    help="Repeatable; admin manages keys and sees every owner's jobs.",
)


@click.group(help="Manage API keys.")
def keys() -> None:
    pass


@keys.command("create", help="Create an API key and print it (it is not stored in clear).")
@click.option("--owner", required=True, help="The tenant whose jobs the key reaches.")
@name_option
@scopes_option
@click.option(
    "--expires-at",
    type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]),
    help="When the key stops working (UTC); default never.",
)
@with_appcontext
def create(owner: str, name: str, scopes: tuple[str, ...], expires_at: datetime | None) -> None:
    expiry = expires_at.replace(tzinfo=UTC) if expires_at else None
    if expiry is not None and expiry <= datetime.now(UTC):
        raise click.BadParameter("must be in the future", param_hint="--expires-at")
    click.echo(create_api_key(runtime().db, owner, name=name, scopes=scopes, expires_at=expiry))


@keys.command("revoke", help="Revoke keys by their first 12 characters.")
@click.argument("prefix")
@with_appcontext
def revoke(prefix: str) -> None:
    click.echo(f"revoked {revoke_api_key(runtime().db, prefix)} key(s)")
