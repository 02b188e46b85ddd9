"""API keys, managed over HTTP by a key with the `admin` scope: create (the secret is shown
once), list, show, revoke. The operator's first admin key comes from `flask keys create`."""

from __future__ import annotations

import uuid

from flask import Blueprint, Response

from app.api.admin_schemas import KeyCreate, KeyCreated, KeyListQuery, KeyOut, KeyPage
from app.api.auth import current_principal
from app.api.jobs import PREFIX
from app.api.pages import keyset_page
from app.api.problems import ApiProblem
from app.api.spec import json_response, operation
from app.keys import api_keys
from app.keys.api_keys import ADMIN
from app.runtime import runtime

bp = Blueprint("keys", __name__)


@bp.post("/keys")
@operation(
    summary="Create an API key",
    tag="keys",
    scope=ADMIN,
    body=KeyCreate,
    responses={201: (KeyCreated, "Created: `key` is the secret, shown this once")},
)
def create_key(body: KeyCreate) -> Response:
    """A key for `owner` (default: the caller's) with `scopes` (default `jobs:read` and
    `jobs:write`) that works until `expires_at` (default: until revoked). Only its hash is
    stored: keep `key` now, it cannot be shown again."""
    caller = current_principal()
    issued = api_keys.issue_api_key(
        runtime().db,
        body.owner or caller.owner,
        name=body.name,
        scopes=body.scopes,
        expires_at=body.expires_at,
        created_by=caller.key_id,
    )
    out = KeyCreated(key=issued.secret, **KeyOut.fields_of(issued.row, PREFIX))
    return json_response(out, 201, {"Location": out.links.self})


@bp.get("/keys")
@operation(
    summary="List API keys",
    tag="keys",
    scope=ADMIN,
    query=KeyListQuery,
    responses={200: (KeyPage, "Newest first, keyset-paginated; never a secret")},
)
def list_keys(query: KeyListQuery) -> Response:
    """Every owner's keys, or `owner`'s; in one `state` (`active`, `expired`, `revoked`) when
    given."""
    session = runtime().db.request_session
    page, next_cursor = keyset_page(
        query.cursor,
        query.limit,
        lambda n, before: api_keys.list_keys(session, query.owner, query.state, n, before),
    )
    return json_response(
        KeyPage(items=[KeyOut.of(row, PREFIX) for row in page], next_cursor=next_cursor)
    )


@bp.get("/keys/<uuid:key_id>")
@operation(
    summary="Get an API key",
    tag="keys",
    scope=ADMIN,
    responses={200: (KeyOut, "The key, without its secret")},
)
def get_key(key_id: uuid.UUID) -> Response:
    row = api_keys.get_key(runtime().db.request_session, key_id)
    if row is None:
        raise _key_not_found(key_id)
    return json_response(KeyOut.of(row, PREFIX))


@bp.delete("/keys/<uuid:key_id>")
@operation(
    summary="Revoke an API key",
    tag="keys",
    scope=ADMIN,
    responses={200: (KeyOut, "Revoked (again: it keeps its first `revoked_at`)")},
)
def revoke_key(key_id: uuid.UUID) -> Response:
    """The key stops working within 10 seconds in every web process, and what it holds open
    (event streams, long-polls, Socket.IO connections) is cut off within a few. The key stays
    listed, `revoked`."""
    with runtime().db.transaction() as session:
        row = api_keys.revoke_key(session, key_id)
        if row is None:
            raise _key_not_found(key_id)
        out = KeyOut.of(row, PREFIX)
    return json_response(out)


def _key_not_found(key_id: uuid.UUID) -> ApiProblem:
    return ApiProblem(404, "not-found", "API key not found", f"no API key {key_id}")
