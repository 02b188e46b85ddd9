"""A deployment whose artifacts are in S3 (moto's S3 server, a real separate process): a real
Celery worker makes ComfyUI images into the bucket, the real web process (gunicorn) serves them
by API key, Range and signed URL, and deleting the job deletes the objects.

Its own Redis database, so the session's worker (filesystem store) never takes these jobs."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator

import httpx
import pytest
from celery.contrib.testing.worker import start_worker
from flask import Flask
from PIL import Image

from app import create_app
from app.config import Settings
from app.keys.api_keys import create_api_key
from app.runtime import runtime_of
from tests import s3server
from tests.conftest import wait_until
from tests.s3server import MotoS3Server
from tests.webserver import WebServer

PREFIX = f"e2e-{uuid.uuid4().hex[:8]}/"


@pytest.fixture(scope="module")
def s3_deployment(settings: Settings, s3_server: MotoS3Server, s3_bucket: str) -> Settings:
    return settings.model_copy(
        update={
            "redis_url": settings.redis_url.rsplit("/", 1)[0] + "/5",
            "artifact_store": "s3",
            "s3_bucket": s3_bucket,
            "s3_prefix": PREFIX,
            "s3_endpoint_url": s3_server.endpoint_url,
            "s3_region": s3server.REGION,
            "s3_access_key_id": s3server.ACCESS_KEY_ID,
            "s3_secret_access_key": s3server.SECRET_ACCESS_KEY,
        }
    )


@pytest.fixture(scope="module")
def s3_app(s3_deployment: Settings) -> Iterator[Flask]:
    flask_app = create_app(s3_deployment)
    import workers.tasks  # noqa: F401  the shared tasks, on this app's Celery too

    celery = runtime_of(flask_app).celery
    with start_worker(
        celery, pool="threads", concurrency=2, perform_ping_check=False, loglevel="WARNING"
    ):
        yield flask_app


@pytest.fixture(scope="module")
def s3_web(s3_deployment: Settings, s3_app: Flask) -> Iterator[WebServer]:
    server = WebServer(s3_deployment).start()
    yield server
    server.stop()


def _keys_in_bucket(server: MotoS3Server, bucket: str) -> list[str]:
    listed = server.client().list_objects_v2(Bucket=bucket, Prefix=PREFIX)
    return [item["Key"] for item in listed.get("Contents", ())]


def test_images_in_s3_are_served_and_deleted_with_their_job(
    s3_app: Flask, s3_web: WebServer, s3_server: MotoS3Server, s3_bucket: str
) -> None:
    with s3_app.app_context():
        key = create_api_key(runtime_of(s3_app).db, f"s3-{uuid.uuid4().hex[:8]}")
    api = httpx.Client(
        base_url=f"{s3_web.url}/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    job_input = {"prompt": "a paper crane", "workflow": "txt2img", "width": 256, "height": 192}
    created = api.post("/jobs", json={"kind": "image", "input": {**job_input, "count": 2}})
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    done = wait_until(
        lambda: (
            (job := api.get(f"/jobs/{job_id}").json())["status"] in ("succeeded", "failed") and job
        ),
        timeout=60,
    )
    assert done["status"] == "succeeded", done

    items = api.get(f"/jobs/{job_id}/artifacts").json()["items"]
    assert len(items) == 2
    stored = _keys_in_bucket(s3_server, s3_bucket)
    assert sorted(k.rsplit("/", 1)[1].split(".")[0] for k in stored) == sorted(
        item["id"] for item in items
    )
    first = items[0]
    body = api.get(f"/artifacts/{first['id']}")
    assert body.status_code == 200 and len(body.content) == first["size"]
    with Image.open(io.BytesIO(body.content)) as picture:
        assert picture.size == (256, 192)
    part = api.get(f"/artifacts/{first['id']}", headers={"Range": "bytes=1-3"})
    assert part.status_code == 206 and part.content == body.content[1:4]
    anonymous = httpx.get(f"{s3_web.url}{first['url']}", timeout=10)
    assert anonymous.status_code == 200 and anonymous.content == body.content

    assert api.delete(f"/jobs/{job_id}").status_code == 204
    assert api.get(f"/artifacts/{first['id']}").status_code == 404
    assert _keys_in_bucket(s3_server, s3_bucket) == []
