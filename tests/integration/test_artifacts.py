"""Artifacts: fenced by the attempt, published only by a successful finish, swept when they can
no longer be published or their job is gone; read by owner, Range and signed URL."""

from __future__ import annotations

import copy
import hashlib
import pathlib
import time
import uuid
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import pytest
from flask import Flask
from sqlalchemy import select, update

from app.api.artifacts import _signature
from app.jobs.artifacts import Artifacts, publish_effect
from app.jobs.payloads import EventError, FailedPayload, SucceededPayload
from app.jobs.transitions import Claim, LeaseLost
from app.kinds.context import JobContext
from app.llm.errors import ModelError
from app.models import Artifact, Job
from app.runtime import runtime
from app.storage.filesystem import FilesystemStore
from tests.conftest import Tenant, undispatched_job, wait_until

PNG_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40  # not decoded here: bytes are bytes


def _claimed(owner: str) -> Claim:
    job_id = undispatched_job(owner, kind="image", extra_input={})
    claim = runtime().jobs.claim_job(job_id, "artifact-test-worker")
    assert claim is not None
    return claim


def _save(claim: Claim, data: bytes = PNG_BYTES, name: str = "image-1.png") -> uuid.UUID:
    saved = runtime().artifacts.save(
        claim.job_id, claim.attempt, name, data, "image/png", width=64, height=32
    )
    assert saved is not None
    return saved.id


def _succeed(claim: Claim, seq: int | None = None) -> None:
    runtime().jobs.finish_job(
        claim,
        seq or claim.seq + 1,
        SucceededPayload(attempt=claim.attempt),
        effects=(publish_effect(),),
        output={"images": []},
        progress=100.0,
    )


def _rows(job_id: uuid.UUID) -> list[Artifact]:
    with runtime().db.transaction() as session:
        return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id)))


def _blob_exists(artifact_id: uuid.UUID) -> bool:
    root = runtime().settings.artifact_dir
    return any(root.rglob(f"{artifact_id}*"))


def _listed(tenant: Tenant, job_id: uuid.UUID) -> list[dict]:
    response = tenant.get(f"/api/v1/jobs/{job_id}/artifacts")
    assert response.status_code == 200, response.get_json()
    return response.get_json()["items"]


def test_an_artifact_is_visible_only_once_its_attempt_succeeds(tenant: Tenant) -> None:
    claim = _claimed(tenant.owner)
    artifact_id = _save(claim)
    assert _blob_exists(artifact_id)
    assert _listed(tenant, claim.job_id) == []
    assert tenant.get(f"/api/v1/artifacts/{artifact_id}").status_code == 404

    _succeed(claim)
    [listed] = _listed(tenant, claim.job_id)
    assert listed["id"] == str(artifact_id)
    assert listed["size"] == len(PNG_BYTES)
    assert listed["sha256"] == hashlib.sha256(PNG_BYTES).hexdigest()
    assert (listed["width"], listed["height"], listed["content_type"]) == (64, 32, "image/png")
    response = tenant.get(f"/api/v1/artifacts/{artifact_id}")
    assert response.status_code == 200
    assert response.data == PNG_BYTES
    assert response.headers["Content-Type"] == "image/png"
    assert response.headers["ETag"] == f'"{listed["sha256"]}"'
    assert response.headers["Accept-Ranges"] == "bytes"


def test_a_stale_attempts_artifact_is_never_published_and_is_swept(tenant: Tenant) -> None:
    jobs = runtime().jobs
    first = _claimed(tenant.owner)
    stale_id = _save(first, b"first attempt" * 10)
    # The lease expires and the sweeper gives the job to a second attempt.
    with runtime().db.transaction() as session:
        session.execute(
            update(Job).where(Job.id == first.job_id).values(lease_expires_at=Job.created_at)
        )
    jobs.sweep()
    wait_until(lambda: _status(first.job_id) == "queued")
    with runtime().db.transaction() as session:  # due now rather than after the retry delay
        session.execute(update(Job).where(Job.id == first.job_id).values(retry_at=None))
    second = jobs.claim_job(first.job_id, "artifact-test-worker-2")
    assert second is not None and second.attempt == 2
    fresh_id = _save(second, b"second attempt" * 10)

    # The stale attempt can neither add an artifact nor publish its own.
    assert runtime().artifacts.save(first.job_id, 1, "late.png", b"x", "image/png") is None
    with pytest.raises(LeaseLost):
        _succeed(first, seq=first.seq + 50)
    _succeed(second, seq=second.seq + 1)

    assert [item["id"] for item in _listed(tenant, first.job_id)] == [str(fresh_id)]
    assert tenant.get(f"/api/v1/artifacts/{stale_id}").status_code == 404
    wait_until(lambda: (jobs.sweep(), not _blob_exists(stale_id))[1], timeout=20)
    assert [row.id for row in _rows(first.job_id)] == [fresh_id]
    assert _blob_exists(fresh_id)


def test_a_failed_attempts_artifacts_are_swept(tenant: Tenant) -> None:
    claim = _claimed(tenant.owner)
    artifact_id = _save(claim)
    runtime().jobs.finish_job(
        claim,
        claim.seq + 1,
        FailedPayload(attempt=1, error=EventError(code="boom", message="it broke")),
        error_code="boom",
        error_message="it broke",
    )
    assert _listed(tenant, claim.job_id) == []
    wait_until(lambda: (runtime().jobs.sweep(), not _rows(claim.job_id))[1], timeout=20)
    assert not _blob_exists(artifact_id)


def test_artifacts_are_deleted_with_their_job(tenant: Tenant) -> None:
    claim = _claimed(tenant.owner)
    artifact_id = _save(claim)
    _succeed(claim)
    assert tenant.delete(f"/api/v1/jobs/{claim.job_id}").status_code == 204
    assert tenant.get(f"/api/v1/artifacts/{artifact_id}").status_code == 404
    assert not _blob_exists(artifact_id)
    with runtime().db.transaction() as session:
        assert session.get(Artifact, artifact_id) is None


def test_another_tenant_gets_404s(tenant: Tenant, new_tenant: Callable[[], Tenant]) -> None:
    claim = _claimed(tenant.owner)
    artifact_id = _save(claim)
    _succeed(claim)
    other = new_tenant()
    assert other.get(f"/api/v1/jobs/{claim.job_id}/artifacts").status_code == 404
    response = other.get(f"/api/v1/artifacts/{artifact_id}")
    assert response.status_code == 404
    assert response.headers["Content-Type"] == "application/problem+json"


def test_ranges_and_conditional_reads(tenant: Tenant) -> None:
    claim = _claimed(tenant.owner)
    artifact_id = _save(claim)
    _succeed(claim)
    path = f"/api/v1/artifacts/{artifact_id}"
    size = len(PNG_BYTES)

    part = tenant.get(path, headers={"Range": "bytes=8-15"})
    assert part.status_code == 206
    assert part.data == PNG_BYTES[8:16]
    assert part.headers["Content-Range"] == f"bytes 8-15/{size}"
    assert part.headers["Content-Length"] == "8"

    tail = tenant.get(path, headers={"Range": "bytes=-100"})
    assert tail.status_code == 206 and tail.data == PNG_BYTES[-100:]
    rest = tenant.get(path, headers={"Range": f"bytes={size - 10}-"})
    assert rest.status_code == 206 and rest.data == PNG_BYTES[-10:]

    beyond = tenant.get(path, headers={"Range": f"bytes={size + 10}-"})
    assert beyond.status_code == 416
    assert beyond.headers["Content-Range"] == f"bytes */{size}"

    several = tenant.get(path, headers={"Range": "bytes=0-1,5-6"})
    assert several.status_code == 200 and several.data == PNG_BYTES

    etag = tenant.get(path).headers["ETag"]
    assert tenant.get(path, headers={"If-None-Match": etag}).status_code == 304
    stale_if_range = tenant.get(path, headers={"Range": "bytes=0-3", "If-Range": '"other"'})
    assert stale_if_range.status_code == 200 and stale_if_range.data == PNG_BYTES


def test_signed_urls_work_without_a_key_and_expire(tenant: Tenant, app: Flask) -> None:
    claim = _claimed(tenant.owner)
    artifact_id = _save(claim)
    _succeed(claim)
    [listed] = _listed(tenant, claim.job_id)
    anonymous = app.test_client()
    assert anonymous.get(f"/api/v1/artifacts/{artifact_id}").status_code == 401

    signed = anonymous.get(listed["url"])
    assert signed.status_code == 200 and signed.data == PNG_BYTES
    assert "private" in signed.headers["Cache-Control"]

    query = parse_qs(urlsplit(listed["url"]).query)
    expires = int(query["expires"][0])
    assert 0 < expires - time.time() <= runtime().settings.artifact_url_ttl + 1
    signature = query["signature"][0]
    tampered = f"/api/v1/artifacts/{artifact_id}?expires={expires + 1000}&signature={signature}"
    assert anonymous.get(tampered).status_code == 403
    elsewhere = f"/api/v1/artifacts/{uuid.uuid4()}?expires={expires}&signature={signature}"
    assert anonymous.get(elsewhere).status_code == 403

    past = int(time.time()) - 1
    expired = anonymous.get(
        f"/api/v1/artifacts/{artifact_id}?expires={past}&signature={_signature(artifact_id, past)}"
    )
    assert expired.status_code == 403
    assert "expired" in expired.get_json()["detail"]
    half = anonymous.get(f"/api/v1/artifacts/{artifact_id}?expires={expires}")
    assert half.status_code == 403


def _status(job_id: uuid.UUID) -> str:
    with runtime().db.transaction() as session:
        return session.get_one(Job, job_id).status


def test_a_store_failure_is_a_retryable_error_of_the_attempt(
    tenant: Tenant, tmp_path: pathlib.Path
) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the store's root should be")
    jobs = copy.copy(runtime().jobs)
    jobs.artifacts = Artifacts(runtime().settings, runtime().db, FilesystemStore(blocked))
    claim = _claimed(tenant.owner)
    ctx = JobContext(claim, jobs, runtime().model_client)
    with pytest.raises(ModelError) as raised:
        ctx.save_artifact("image-1.png", PNG_BYTES, "image/png")
    assert raised.value.code == "artifact_store_unavailable" and raised.value.retryable
    # Its row was written before the blob failed; it is not published, and once the attempt
    # is over the sweeper removes it.
    assert len(_rows(claim.job_id)) == 1
    assert _listed(tenant, claim.job_id) == []
    runtime().jobs.finish_job(
        claim,
        claim.seq + 1,
        FailedPayload(attempt=1, error=EventError(code="x", message="x")),
        error_code="x",
    )
    wait_until(lambda: (runtime().jobs.sweep(), not _rows(claim.job_id))[1], timeout=20)


def test_listing_without_a_signing_secret_says_so(
    tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    claim = _claimed(tenant.owner)
    _save(claim)
    _succeed(claim)
    unsigned = runtime().settings.model_copy(update={"secret_key": None})
    monkeypatch.setattr(runtime(), "settings", unsigned)
    response = tenant.get(f"/api/v1/jobs/{claim.job_id}/artifacts")
    assert response.status_code == 503
    assert "CONVEYOR_SECRET_KEY" in response.get_json()["detail"]
