"""Fixtures: private PostgreSQL and Redis on free ports, the model simulator over HTTP, moto's
S3 server, the app, and a real in-process Celery worker. No eager mode, no mocked database or
broker.

Tests isolate themselves by owner (each gets a fresh API key and tenant), not by truncating
tables, so the session-wide worker never sees rows vanish under it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from celery.contrib.testing.worker import start_worker
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func

from app import create_app
from app.config import Settings, testing_settings
from app.jobs.payloads import QueuedPayload
from app.migrate import upgrade
from app.models import Job, JobEvent
from app.runtime import runtime
from devtools.postgres import PostgresServer
from devtools.rabbitmq import RabbitMQServer
from devtools.redis_server import RedisServer
from devtools.simprocess import SimulatorProcess
from tests.s3server import MotoS3Server
from tests.webserver import WebServer

# The multi-host cluster test builds network namespaces as root and takes minutes: it runs with
# `make cluster` (which sets CONVEYOR_CLUSTER_TESTS=1), never inside `make test`.
collect_ignore = [] if os.environ.get("CONVEYOR_CLUSTER_TESTS") == "1" else ["cluster"]


def pytest_configure(config: pytest.Config) -> None:
    """Each session's temporary files in a directory of its own, not pytest's shared
    /tmp/pytest-of-<user>: the private PostgreSQL runs as `postgres` when the tests run as
    root, so its data directory's parents must stay traversable, and every new pytest session
    takes that permission back from pytest-of-<user> (two sessions at once then broke each
    other's initdb). Removed at the end unless CONVEYOR_KEEP_TEST_TMP is set."""
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        config.option.basetemp = tempfile.mkdtemp(prefix="conveyor-tests-")
        config._conveyor_basetemp = config.option.basetemp  # type: ignore[attr-defined]


def pytest_unconfigure(config: pytest.Config) -> None:
    made = getattr(config, "_conveyor_basetemp", None)
    if made and not os.environ.get("CONVEYOR_KEEP_TEST_TMP"):
        shutil.rmtree(made, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    server = PostgresServer(tmp_path_factory.mktemp("pg") / "data", durable=False).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def simulator() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(ttft=0.01, tps=400) as sim:
        yield sim


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3Server]:
    with MotoS3Server() as server:
        yield server


@pytest.fixture(scope="session")
def s3_bucket(s3_server: MotoS3Server) -> str:
    """A bucket on the moto server, made as an operator makes one (the store never does)."""
    name = "conveyor-artifacts"
    s3_server.client().create_bucket(Bucket=name)
    return name


# Pool-wide provider limits of the models of tests/integration/test_provider_limits.py, one
# model per test, periods of seconds; every other model has none.
TEST_PROVIDER_LIMITS: dict[str, dict[str, float]] = {
    "pl-rpm": {"rpm": 3, "period": 4},
    "pl-wait": {"rpm": 1, "period": 6},
    "pl-tpm": {"tpm": 300, "period": 5},
    "pl-pause": {"rpm": 4, "period": 5},
    "pl-breaker": {"failures": 2, "cooldown": 3},
}


@pytest.fixture(scope="session")
def broker_url(redis_server: RedisServer) -> Iterator[str | None]:
    """The session's Celery broker: Redis (None: the broker is the Redis of the events), or a
    private RabbitMQ node with CONVEYOR_TEST_BROKER=rabbitmq (as `make test` runs the lifecycle
    tests a second time)."""
    chosen = os.environ.get("CONVEYOR_TEST_BROKER", "redis")
    if chosen == "redis":
        yield None
        return
    assert chosen == "rabbitmq", f"CONVEYOR_TEST_BROKER is redis or rabbitmq, not {chosen!r}"
    with RabbitMQServer() as server:
        yield server.url


@pytest.fixture(scope="session")
def settings(
    postgres: PostgresServer,
    redis_server: RedisServer,
    broker_url: str | None,
    simulator: SimulatorProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Settings:
    url = postgres.create_database("conveyor_test")
    upgrade(url)
    return testing_settings(
        database_url=url,
        redis_url=redis_server.url,
        broker_url=broker_url,
        openai_base_url=simulator.base_url,
        # The simulator serves ComfyUI's API at its root too.
        comfyui_url=simulator.base_url.removesuffix("/v1"),
        artifact_dir=tmp_path_factory.mktemp("artifacts"),
        provider_limits=TEST_PROVIDER_LIMITS,
    )


@pytest.fixture(scope="session")
def app(settings: Settings) -> Iterator[Flask]:
    flask_app = create_app(settings)
    import workers.tasks  # noqa: F401  registers the tasks on this app's Celery

    with flask_app.app_context():
        yield flask_app


@pytest.fixture(scope="session")
def worker(app: Flask) -> Iterator[object]:
    """A real Celery worker (threads pool) in this process, consuming from the real Redis."""
    celery = app.extensions["conveyor"].celery
    with start_worker(
        celery,
        pool="threads",
        concurrency=8,
        perform_ping_check=False,
        loglevel="WARNING",
        shutdown_timeout=30,
    ) as running:
        yield running


@pytest.fixture(scope="session")
def web_server(settings: Settings, app: Flask) -> Iterator[WebServer]:
    """The real web process (gunicorn, gevent worker) on the tests' PostgreSQL and Redis."""
    server = WebServer(settings).start()
    yield server
    server.stop()


@dataclass
class Tenant:
    owner: str
    key: str
    client: FlaskClient

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.client.get(path, headers=self.headers | kwargs.pop("headers", {}), **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.client.post(path, headers=self.headers | kwargs.pop("headers", {}), **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.client.delete(path, headers=self.headers | kwargs.pop("headers", {}), **kwargs)

    def submit(self, kind: str, job_input: dict[str, Any], **fields: Any) -> dict[str, Any]:
        response = self.post("/api/v1/jobs", json={"kind": kind, "input": job_input, **fields})
        assert response.status_code == 202, response.get_json()
        return response.get_json()

    def wait_for(self, job_id: str, *statuses: str, timeout: float = 20) -> dict[str, Any]:
        """Polls until the job reaches one of `statuses` (default: any terminal one)."""
        wanted = set(statuses or ("succeeded", "failed", "canceled"))
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(f"/api/v1/jobs/{job_id}").get_json()
            if job["status"] in wanted:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(0.05)


@pytest.fixture
def new_tenant(app: Flask) -> Callable[[], Tenant]:
    from app.keys.api_keys import create_api_key

    def make() -> Tenant:
        owner = f"tenant-{uuid.uuid4().hex[:10]}"
        return Tenant(owner, create_api_key(runtime().db, owner), app.test_client())

    return make


@pytest.fixture
def tenant(new_tenant: Callable[[], Tenant]) -> Tenant:
    return new_tenant()


@pytest.fixture
def admin(app: Flask) -> Tenant:
    """A key with the admin scope, of an owner of its own."""
    from app.keys.api_keys import create_api_key

    owner = f"ops-{uuid.uuid4().hex[:8]}"
    return Tenant(owner, create_api_key(runtime().db, owner, scopes=["admin"]), app.test_client())


def put_tenant(admin: Tenant, owner: str, **settings: Any) -> Any:
    """PUT /admin/tenants/<owner>: budgets, dispatch weight and cap, retention."""
    return admin.client.put(f"/api/v1/admin/tenants/{owner}", headers=admin.headers, json=settings)


def wait_until(predicate: Callable[[], Any], timeout: float = 10, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def undispatched_job(
    owner: str,
    prompt: str = "hello",
    dispatched_ago: timedelta = timedelta(0),
    kind: str = "chat",
    extra_input: dict[str, Any] | None = None,
) -> uuid.UUID:
    """A committed queued job whose publish never happened (as after a broker outage).

    Its input is stored as given, without the API's validation."""
    with runtime().db.transaction() as session:
        job_id = uuid.uuid4()
        session.add(
            Job(
                id=job_id,
                owner=owner,
                kind=kind,
                status="queued",
                input={"prompt": f"{prompt} {job_id}", **(extra_input or {})},
                max_attempts=3,
                last_seq=1,
                dispatched_at=func.now() - dispatched_ago,
            )
        )
        queued = QueuedPayload(kind=kind, retry_of=None)
        session.add(
            JobEvent(job_id=job_id, seq=1, type=queued.event_type.value, data=queued.as_data())
        )
    return job_id


def job_row(job_id: uuid.UUID) -> Job:
    with runtime().db.transaction() as session:
        return session.get_one(Job, job_id)
