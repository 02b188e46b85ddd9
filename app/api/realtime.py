"""`POST /realtime/token`: a short-lived subscription token for the Socket.IO connection, so a
browser holds that instead of the API key (app/keys/tokens.py)."""

from __future__ import annotations

from flask import Blueprint, Response

from app.api.auth import current_principal
from app.api.batches import owned_batch
from app.api.jobs import owned_job
from app.api.problems import ApiProblem
from app.api.schemas import RealtimeToken, RealtimeTokenRequest
from app.api.spec import json_response, operation
from app.keys.api_keys import JOBS_READ
from app.keys.tokens import TokenError, mint_token, token_lifetime
from app.runtime import runtime

bp = Blueprint("realtime", __name__)


@bp.post("/realtime/token")
@operation(
    summary="Mint a subscription token",
    tag="realtime",
    scope=JOBS_READ,  # a token reads events, and carries no more than that
    body=RealtimeTokenRequest,
    responses={
        201: (RealtimeToken, "A token for `auth.token` when connecting to Socket.IO"),
        404: (None, "No such job or batch (or another owner's)"),
        503: (None, "The server has no CONVEYOR_SECRET_KEY to sign tokens with"),
    },
)
def realtime_token(body: RealtimeTokenRequest) -> Response:
    """Scoped to the caller, and to one job when `job_id` is given, or to one batch when
    `batch_id` is (such a connection can subscribe to that job or batch only and is not in the
    owner's room). It expires sooner than usual when its key does: never after it."""
    if body.job_id is not None:
        owned_job(body.job_id)
    if body.batch_id is not None:
        owned_batch(body.batch_id)
    try:
        token = mint_token(runtime().settings, current_principal(), body.job_id, body.batch_id)
    except TokenError as exc:
        raise ApiProblem(503, "realtime-unavailable", "Tokens unavailable", str(exc)) from None
    ttl = token_lifetime(runtime().settings, current_principal())
    out = RealtimeToken(token=token, expires_in=ttl, job_id=body.job_id, batch_id=body.batch_id)
    return json_response(out, status=201)
