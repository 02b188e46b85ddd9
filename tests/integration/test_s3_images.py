"""A deployment whose artifacts are in S3 (moto's S3 server, a real separate process): a real
Celery worker process makes ComfyUI images into the bucket, the real web process (gunicorn)
serves them by API key, Range and signed URL, and deleting the job deletes the objects.

Its own Redis database, so the session's worker (filesystem store) never takes these jobs; and
its own processes, because a second app in the tests' process would rebind the process-wide
Socket.IO server and Celery's current app under the other tests."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator

import httpx
import pytest
from flask import Flask
from PIL import Image

from app.config import Settings
from app.keys.api_keys import create_api_key
from app.runtime import runtime
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
def s3_web(
    s3_deployment: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WebServer]:
    server = WebServer(s3_deployment).start()
    log = (tmp_path_factory.mktemp("s3-worker") / "worker.log").open("ab")
    command = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker"]
    command += ["--pool", "threads", "--concurrency", "2", "--loglevel", "WARNING"]
    command += ["--without-mingle", "--without-gossip", "-n", f"s3-{uuid.uuid4().hex[:6]}@%h"]
    worker = subprocess.Popen(
        command, env=server.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    yield server
    os.killpg(worker.pid, signal.SIGTERM)
    try:
        worker.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)
    log.close()
    server.stop()


def _keys_in_bucket(server: MotoS3Server, bucket: str) -> list[str]:
    listed = server.client().list_objects_v2(Bucket=bucket, Prefix=PREFIX)
    return [item["Key"] for item in listed.get("Contents", ())]


def test_images_in_s3_are_served_and_deleted_with_their_job(
    app: Flask, s3_web: WebServer, s3_server: MotoS3Server, s3_bucket: str
) -> None:
    key = create_api_key(runtime().db, f"s3-{uuid.uuid4().hex[:8]}")  # the same PostgreSQL
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
        timeout=90,
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
