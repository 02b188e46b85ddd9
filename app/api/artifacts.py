"""Artifacts: the binary outputs of jobs (images). Listed per job; read with the API key, or
without one through a short-lived signed URL, which a browser's `<img src>` can use.

Every read is scoped like the jobs: another owner's artifact is a 404. Only published artifacts
of existing jobs exist here (app/jobs/artifacts.py says why that is exact)."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from urllib.parse import quote

from flask import Blueprint, Response, request
from itsdangerous import BadSignature, Signer

from app.api.auth import authenticate
from app.api.downloads import attachment_header
from app.api.jobs import PREFIX, owned_job
from app.api.problems import ApiProblem
from app.api.schemas import ArtifactLinks, ArtifactList, ArtifactOut, SignedUrlQuery
from app.api.spec import json_response, operation
from app.jobs import artifacts
from app.keys.api_keys import JOBS_READ
from app.models import Artifact
from app.runtime import runtime
from app.storage import BlobMissing, StoreError

bp = Blueprint("artifacts", __name__)

SIGNED_URL_SALT = "conveyor.artifact-url"


@bp.get("/jobs/<uuid:job_id>/artifacts")
@operation(
    summary="List a job's artifacts",
    tag="artifacts",
    responses={
        200: (ArtifactList, "The job's published artifacts, in the order it made them"),
        404: (None, "No such job (or another owner's)"),
    },
)
def list_artifacts(job_id: uuid.UUID) -> Response:
    """A job's artifacts exist once it has succeeded. Each carries a signed `url` that reads it
    without the API key until `url_expires_at` (`CONVEYOR_ARTIFACT_URL_TTL`)."""
    job = owned_job(job_id)
    rows = artifacts.job_artifacts(runtime().db.request_session, job.owner, job.id)
    return json_response(ArtifactList(items=[_artifact_out(row) for row in rows]))


@bp.get("/artifacts/<uuid:artifact_id>")
@operation(
    summary="Read an artifact's bytes",
    tag="artifacts",
    auth=False,
    query=SignedUrlQuery,
    headers=[
        {
            "name": "Range",
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "One byte range (`bytes=0-1023`); several are answered whole",
        }
    ],
    responses={
        200: (None, "The bytes, with ETag (the sha256) and Accept-Ranges"),
        206: (None, "The range asked for"),
        304: (None, "If-None-Match named the current ETag"),
        401: (None, "No API key, and no signed URL"),
        403: (None, "A signed URL that is expired or does not match"),
        404: (None, "No such artifact (or another owner's)"),
        416: (None, "The range is outside the artifact"),
    },
    produces={200: ["application/octet-stream"], 206: ["application/octet-stream"]},
)
def read_artifact(artifact_id: uuid.UUID, query: SignedUrlQuery) -> Response:
    """With the API key (`Authorization: Bearer`), or with `expires` and `signature` from a
    signed `url` (listed by GET /jobs/{id}/artifacts) and no key."""
    if query.signature is None and query.expires is None:
        owner: str | None = authenticate(JOBS_READ).owner
    else:
        _check_signature(artifact_id, query)
        owner = None
    try:
        row = artifacts.get_artifact(runtime().db.request_session, owner, artifact_id)
    except artifacts.ArtifactNotFound:
        raise ApiProblem(
            404, "not-found", "Artifact not found", f"no artifact {artifact_id}"
        ) from None
    return _send(row, cache_seconds=_cache_seconds(query))


def _artifact_out(row: Artifact) -> ArtifactOut:
    assert row.job_id is not None
    expires = int(time.time()) + runtime().settings.artifact_url_ttl
    path = f"{PREFIX}/artifacts/{row.id}"
    return ArtifactOut(
        id=row.id,
        job_id=row.job_id,
        name=row.name,
        content_type=row.content_type,
        size=row.size,
        sha256=row.sha256,
        width=row.width,
        height=row.height,
        created_at=row.created_at,
        url=f"{path}?expires={expires}&signature={quote(_signature(row.id, expires))}",
        url_expires_at=datetime.fromtimestamp(expires, UTC),
        links=ArtifactLinks(self=path, job=f"{PREFIX}/jobs/{row.job_id}"),
    )


def _signer() -> Signer:
    secret = runtime().settings.secret_key
    if not secret:
        raise ApiProblem(
            503,
            "signing-unavailable",
            "Signed URLs are not configured",
            "set CONVEYOR_SECRET_KEY to sign artifact URLs",
        )
    return Signer(secret, salt=SIGNED_URL_SALT)


def _signature(artifact_id: uuid.UUID, expires: int) -> str:
    return _signer().get_signature(f"{artifact_id}:{expires}").decode()


def _check_signature(artifact_id: uuid.UUID, query: SignedUrlQuery) -> None:
    if query.signature is None or query.expires is None:
        raise _forbidden("a signed URL has both `expires` and `signature`")
    try:
        valid = _signer().verify_signature(f"{artifact_id}:{query.expires}", query.signature)
    except BadSignature:
        valid = False
    if not valid:
        raise _forbidden("the signature does not match this artifact and expiry")
    if query.expires < time.time():
        raise _forbidden("the signed URL has expired; list the job's artifacts for a new one")


def _forbidden(detail: str) -> ApiProblem:
    return ApiProblem(403, "signed-url-invalid", "The signed URL is not valid", detail)


def _cache_seconds(query: SignedUrlQuery) -> int:
    """An artifact never changes, but a signed URL's answer must not outlive the URL."""
    if query.expires is None:
        return 3600
    return max(0, int(query.expires - time.time()))


def _send(row: Artifact, cache_seconds: int) -> Response:
    etag = row.sha256
    headers = {
        "ETag": f'"{etag}"',
        "Accept-Ranges": "bytes",
        "Cache-Control": f"private, max-age={cache_seconds}",
        "X-Content-Type-Options": "nosniff",
        **attachment_header(row.name, disposition="inline"),
    }
    if request.if_none_match.contains(etag):
        return Response(status=304, headers=headers)
    start, length, status = _byte_range(row.size, etag)
    if status == 206:
        headers["Content-Range"] = f"bytes {start}-{start + length - 1}/{row.size}"
    try:
        chunks = runtime().artifacts.read(row, start, length)
    except BlobMissing:
        raise _unavailable("its bytes are missing from the artifact store") from None
    except StoreError as exc:
        raise _unavailable(str(exc)) from None
    headers["Content-Length"] = str(length)
    # A store failure past this point (headers sent) cuts the body short, which the client
    # sees against Content-Length.
    return Response(
        chunks,
        status=status,
        mimetype=row.content_type,
        headers=headers,
        direct_passthrough=True,
    )


def _byte_range(size: int, etag: str) -> tuple[int, int, int]:
    """(start, length, status) for the request's Range header: one satisfiable range is a 206;
    none, several, or an If-Range that no longer matches is the whole (200); a range past the
    end is a 416."""
    ranged = request.range
    if ranged is None or len(ranged.ranges) != 1:
        return 0, size, 200
    if_range = request.headers.get("If-Range")
    if if_range is not None and if_range.strip('"') != etag:
        return 0, size, 200
    bounds = ranged.range_for_length(size)
    if bounds is None:
        raise ApiProblem(
            416,
            "range-not-satisfiable",
            "Range not satisfiable",
            f"the artifact has {size} bytes",
            headers={"Content-Range": f"bytes */{size}"},
        )
    start, stop = bounds
    return start, stop - start, 206


def _unavailable(detail: str) -> ApiProblem:
    return ApiProblem(
        503,
        "artifact-unavailable",
        "The artifact cannot be read now",
        detail,
        headers={"Retry-After": "5"},
    )
