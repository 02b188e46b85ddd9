"""`conveyor keys`: API keys over the API, with a key that has the `admin` scope (the first one
comes from the operator's `flask keys create --scope admin`)."""

from __future__ import annotations

from typing import Any

import click

from app.cli.api import Api, console
from app.cli.keys import name_option, scopes_option
from app.keys.api_keys import KEY_STATES


@click.group()
def keys() -> None:
    """Create, list and revoke API keys (needs an admin key)."""


@keys.command("create")
@click.option("--owner", help="The tenant whose jobs the key reaches (default: yours).")
@name_option
@scopes_option
@click.option("--expires-at", help="ISO 8601 instant (no offset means UTC); default never.")
@click.pass_obj
def create_key(
    api: Api, owner: str | None, name: str, scopes: tuple[str, ...], expires_at: str | None
) -> None:
    """Create a key and print it: the only time it is shown."""
    body: dict[str, Any] = {"name": name, "scopes": list(scopes), "expires_at": expires_at}
    if owner:
        body["owner"] = owner
    key = api.request("POST", "/keys", json=body)
    expiry = key["expires_at"] or "never"
    click.echo(
        f"key {key['id']} ({key['prefix']}…) for {key['owner']}: {', '.join(key['scopes'])}; "
        f"expires {expiry}. Keep it now, it is not shown again:",
        err=True,
    )
    click.echo(key["key"])


@keys.command("list")
@click.option("--owner")
@click.option("--state", type=click.Choice(KEY_STATES))
@click.option("--limit", type=click.IntRange(1, 100), default=20)
@click.option("--cursor", help="The next page's cursor, from the previous page.")
@click.pass_obj
def list_keys(
    api: Api, owner: str | None, state: str | None, limit: int, cursor: str | None
) -> None:
    params = {"owner": owner, "state": state, "limit": limit, "cursor": cursor}
    page = api.request("GET", "/keys", params={k: v for k, v in params.items() if v})
    # One line per key rather than a table: an id and a prefix fill a narrow terminal alone.
    for key in page["items"]:
        click.echo(
            f"{key['id']}  {key['prefix']}  {key['state']:<7}  {','.join(key['scopes'])}  "
            f"owner={key['owner']} name={key['name']!r} "
            f"expires={key['expires_at'] or 'never'} last_used={key['last_used_at'] or 'never'}"
        )
    if page["next_cursor"]:
        console.print(f"[dim]more: --cursor {page['next_cursor']}[/dim]")


@keys.command("revoke")
@click.argument("key_id")
@click.pass_obj
def revoke_key(api: Api, key_id: str) -> None:
    """Revoke a key by its id (`conveyor keys list` shows it)."""
    key = api.request("DELETE", f"/keys/{key_id}")
    click.echo(f"key {key['id']} ({key['prefix']}…): {key['state']}")
