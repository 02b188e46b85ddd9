"""Readiness and the health view: answered in milliseconds under concurrent callers from checks
each process shares, in bounded time when a store is down, the artifact store's state in the
health view only, and the system's state taken from the records workers and the sweeper keep
(heartbeats, the last sweep), not from a broadcast."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import func, select

from app.config import Settings
from app.migrate import upgrade
from app.models import Job
from app.queue import QUEUE
from app.runtime import runtime
from devtools.postgres import PostgresServer
from devtools.processes import free_port
from tests import s3server
from tests.conftest import Tenant, undispatched_job, wait_until
from tests.s3server import MotoS3Server
from tests.webserver import WebServer

CALLERS = 20
CALLS_EACH = 10
# Generous: a shared check answers in milliseconds, the former per-call probe in about 0.85 s,
# and the timeout of a check that does not answer is 1 s (CONVEYOR_READY_TIMEOUT).
SLOWEST_ANSWER = 5.0


class SilentServer:
    """A TCP server that accepts connections and never answers: a frozen Redis, as a stalled
    network or a paused server presents itself. Counts the connections it was sent."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self._socket.getsockname()[1]
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return
            self.connections.append(connection)

    def close(self) -> None:
        self._socket.close()
        for connection in self.connections:
            connection.close()


@pytest.fixture(scope="module")
def frozen_redis() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def web_without_redis(settings: Settings, frozen_redis: SilentServer) -> Iterator[WebServer]:
    redis_url = f"redis://127.0.0.1:{frozen_redis.port}/0"
    server = WebServer(settings.model_copy(update={"redis_url": redis_url})).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def web_without_database(settings: Settings) -> Iterator[WebServer]:
    nobody_listens = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/conveyor"
    server = WebServer(settings.model_copy(update={"database_url": nobody_listens})).start()
    yield server
    server.stop()


def call_concurrently(
    url: str, calls_each: int = CALLS_EACH
) -> tuple[list[tuple[int, dict[str, Any], float]], float]:
    """CALLERS clients each making `calls_each` calls: (status, body, seconds) of every answer,
    and how long they all took."""

    def caller(_: int) -> list[tuple[int, dict[str, Any], float]]:
        answers = []
        with httpx.Client(timeout=30) as client:
            for _ in range(calls_each):
                began = time.perf_counter()
                response = client.get(url)
                answers.append((response.status_code, response.json(), time.perf_counter() - began))
        return answers

    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=CALLERS) as pool:
        answers = [answer for chunk in pool.map(caller, range(CALLERS)) for answer in chunk]
    return answers, time.monotonic() - began


def assert_checks_were_shared(
    answers: list[tuple[int, dict[str, Any], float]], took: float, check: str
) -> None:
    """One process runs a check at most once per max age (1 s) and every caller meanwhile gets
    that run's result, so the answers name few distinct runs, not one run per call."""
    runs = {body["checks"][check]["checked_at"] for _, body, _ in answers}
    assert len(runs) <= took / 1.0 + 2, (check, len(runs), took)


def test_readiness_under_twenty_concurrent_callers_is_200_from_shared_checks(
    web_server: WebServer, worker
) -> None:
    answers, took = call_concurrently(f"{web_server.url}/api/v1/ready")
    assert len(answers) == CALLERS * CALLS_EACH
    assert {status for status, _, _ in answers} == {200}
    assert {body["status"] for _, body, _ in answers} == {"healthy"}
    assert max(seconds for _, _, seconds in answers) < SLOWEST_ANSWER
    for check in ("database", "redis"):
        assert all(body["checks"][check]["ok"] for _, body, _ in answers)
        assert_checks_were_shared(answers, took, check)


def test_readiness_is_503_soon_when_redis_stalls_and_probes_it_once(
    web_without_redis: WebServer, frozen_redis: SilentServer
) -> None:
    answers, took = call_concurrently(f"{web_without_redis.url}/api/v1/ready", calls_each=3)
    assert {status for status, _, _ in answers} == {503}
    assert max(seconds for _, _, seconds in answers) < SLOWEST_ANSWER
    for _, body, _ in answers:
        assert body["status"] == "unhealthy"
        assert body["checks"]["database"]["ok"]
        assert not body["checks"]["redis"]["ok"]
    details = {body["checks"]["redis"]["detail"] for _, body, _ in answers}
    assert any(detail.startswith("no answer within") for detail in details), details
    assert_checks_were_shared(answers, took, "database")
    # A stalled ping is not repeated by every caller: a new one starts only when the last one
    # gave up (after its socket timeout), each on a connection of its own.
    assert len(frozen_redis.connections) <= took / 2.0 + 2, (len(frozen_redis.connections), took)


def test_readiness_is_503_at_once_when_the_database_is_unreachable(
    web_without_database: WebServer,
) -> None:
    answers, took = call_concurrently(f"{web_without_database.url}/api/v1/ready", calls_each=3)
    assert {status for status, _, _ in answers} == {503}
    assert max(seconds for _, _, seconds in answers) < SLOWEST_ANSWER
    for _, body, _ in answers:
        assert body["status"] == "unhealthy"
        assert body["checks"]["redis"]["ok"]
        assert not body["checks"]["database"]["ok"]
        assert "OperationalError" in body["checks"]["database"]["detail"]
    assert_checks_were_shared(answers, took, "database")


def test_health_reports_an_unreachable_store_instead_of_failing(
    web_without_redis: WebServer, web_without_database: WebServer
) -> None:
    began = time.monotonic()
    without_redis = httpx.get(f"{web_without_redis.url}/api/v1/health", timeout=30)
    without_database = httpx.get(f"{web_without_database.url}/api/v1/health", timeout=30)
    assert time.monotonic() - began < 2 * SLOWEST_ANSWER
    assert without_redis.status_code == without_database.status_code == 200

    body = without_redis.json()
    assert body["status"] == "down"
    assert body["components"]["redis"]["status"] == "down"
    assert body["components"]["database"]["status"] == "ok"
    assert body["components"]["workers"]["status"] == "degraded"
    assert body["components"]["workers"]["count"] is None  # unknown, not zero
    assert body["components"]["sweeper"]["status"] == "degraded"
    assert isinstance(body["queue"]["queued"], int) and body["queue"]["broker"] is None, body
    assert isinstance(body["failures"]["total"], int)

    body = without_database.json()
    assert body["status"] == "down"
    assert body["components"]["database"]["status"] == "down"
    assert body["components"]["redis"]["status"] == "ok"
    assert body["queue"]["queued"] is None and body["queue"]["detail"]
    assert body["failures"]["total"] is None and body["failures"]["detail"]


def health(tenant: Tenant) -> dict[str, Any]:
    response = tenant.client.get("/api/v1/health")  # no API key needed
    assert response.status_code == 200
    return response.get_json()


def test_health_counts_workers_by_their_heartbeats(tenant: Tenant, worker) -> None:
    heartbeat = runtime().settings.heartbeat_seconds
    workers = wait_until(
        lambda: (w := health(tenant)["components"]["workers"])["count"] and w, timeout=10
    )
    assert workers["status"] == "ok"
    assert workers["pools"].get("threads", 0) >= 1  # the in-process test worker
    assert workers["slots"] >= 8
    assert workers["last_heartbeat_age_s"] < 3 * heartbeat + 1

    # Each heartbeat says how many jobs its process runs.
    job_id = tenant.submit("chat", {"prompt": f"slow {uuid.uuid4()} [[sim tokens=200 tps=50]]"})[
        "id"
    ]
    wait_until(lambda: health(tenant)["components"]["workers"]["running"] >= 1, timeout=10)
    assert tenant.wait_for(job_id)["status"] == "succeeded"


def test_health_reports_the_last_sweep(tenant: Tenant, worker) -> None:
    asked = datetime.now(UTC)
    runtime().celery.send_task("conveyor.sweep")  # as celery beat sends it

    def swept_since_asked() -> dict[str, Any] | None:
        sweeper = health(tenant)["components"]["sweeper"]
        at = sweeper["last_sweep_at"]
        return sweeper if at and datetime.fromisoformat(at) >= asked else None

    sweeper = wait_until(swept_since_asked, timeout=10)
    assert sweeper["status"] == "ok"
    assert sweeper["interval_s"] == runtime().settings.sweeper_interval
    assert 0 <= sweeper["last_sweep_age_s"] < 10
    assert set(sweeper["last_sweep"]) == {
        "republished",
        "recovered",
        "failed",
        "canceled",
        "artifacts_swept",
        "scheduled",
        "released",
        "expired",
    }


def queued_in_database() -> int:
    with runtime().db.transaction() as session:
        return session.scalar(select(func.count()).where(Job.status == "queued"))


def failed_last_hour(code: str) -> int:
    with runtime().db.transaction() as session:
        return session.scalar(
            select(func.count()).where(
                Job.status == "failed",
                Job.error_code == code,
                Job.finished_at >= func.now() - timedelta(hours=1),
            )
        )


def waiting_in_broker() -> int:
    # Kombu keeps one list per priority step: "conveyor", "conveyor:1" ... "conveyor:9".
    keys = [QUEUE, *(f"{QUEUE}:{n}" for n in range(1, 10))]
    return sum(runtime().redis.llen(key) for key in keys)


def test_health_reports_queue_depth_and_failures_by_code(tenant: Tenant, worker) -> None:
    unpublished = [undispatched_job(tenant.owner) for _ in range(3)]  # stay queued: no sweep
    failed = tenant.submit("chat", {"prompt": f"[[sim fault=400]] {uuid.uuid4()}"})["id"]
    assert tenant.wait_for(failed)["error"]["code"] == "model_bad_request"
    try:

        def matches_the_stores() -> bool:
            body = health(tenant)
            return (
                body["queue"]["queued"] == queued_in_database() >= 3
                and body["failures"]["by_code"].get("model_bad_request")
                == failed_last_hour("model_bad_request")
                >= 1
                and body["queue"]["broker"] == waiting_in_broker()
            )

        wait_until(matches_the_stores, timeout=10)
        body = health(tenant)
        assert body["failures"]["window_s"] == 3600
        assert body["queue"]["running"] is not None
    finally:
        for job_id in unpublished:
            runtime().jobs.cancel_job(tenant.owner, job_id)


def test_readiness_and_health_share_one_check_per_second(tenant: Tenant) -> None:
    """In-process: many calls in quick succession reuse one run of each check."""
    first = tenant.client.get("/api/v1/ready").get_json()
    again = [tenant.client.get("/api/v1/ready").get_json() for _ in range(20)]
    runs = {body["checks"]["database"]["checked_at"] for body in [first, *again]}
    assert len(runs) <= 2
    assert health(tenant)["components"]["database"]["status"] == "ok"


def test_readiness_is_not_fooled_by_pooled_connections_a_database_restart_closed(
    settings: Settings, postgres: PostgresServer
) -> None:
    """After a database restart every pooled connection is dead and its first use fails; the
    check tries once more on a new connection rather than call a healthy database down. (A web
    process of its own, on a database of its own, so that only its connections are cut.)"""
    database_url = postgres.create_database("conveyor_cut")
    upgrade(database_url)
    server = WebServer(settings.model_copy(update={"database_url": database_url})).start()
    try:
        with httpx.Client(base_url=f"{server.url}/api/v1", timeout=30) as client:
            first = client.get("/ready").json()["checks"]["database"]
            assert first["ok"]
            dsn = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
            with psycopg.connect(dsn, autocommit=True) as conn:
                closed = conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ).fetchone()[0]
            assert closed >= 1  # at least the connection the first check used, back in its pool

            def next_check() -> dict[str, Any] | None:
                check = client.get("/ready").json()["checks"]["database"]
                return check if check["checked_at"] != first["checked_at"] else None

            check = wait_until(next_check, timeout=10)
        assert check["ok"], check
    finally:
        server.stop()


# The artifact store: in the health view, not in readiness ------------------------------------


def with_s3_store(settings: Settings, server: MotoS3Server, bucket: str) -> Settings:
    return settings.model_copy(
        update={
            "artifact_store": "s3",
            "s3_bucket": bucket,
            "s3_prefix": "health/",
            "s3_endpoint_url": server.endpoint_url,
            "s3_region": s3server.REGION,
            "s3_access_key_id": s3server.ACCESS_KEY_ID,
            "s3_secret_access_key": s3server.SECRET_ACCESS_KEY,
        }
    )


@pytest.fixture(scope="module")
def web_with_s3(settings: Settings, s3_server: MotoS3Server, s3_bucket: str) -> Iterator[WebServer]:
    server = WebServer(with_s3_store(settings, s3_server, s3_bucket)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def web_with_missing_bucket(settings: Settings, s3_server: MotoS3Server) -> Iterator[WebServer]:
    missing = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    server = WebServer(with_s3_store(settings, s3_server, missing)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def web_with_impossible_directory(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WebServer]:
    in_the_way = tmp_path_factory.mktemp("artifacts-broken") / "a-file"
    in_the_way.write_text("a file where the artifact directory's parent should be")
    broken = settings.model_copy(update={"artifact_dir": in_the_way / "artifacts"})
    server = WebServer(broken).start()
    yield server
    server.stop()


def artifacts_once_checked(server: WebServer) -> dict[str, Any]:
    """The health view once its artifact check has answered (the first may still be in flight
    when its caller's wait of CONVEYOR_READY_TIMEOUT ends, on a cold process)."""

    def answered() -> dict[str, Any] | None:
        body = httpx.get(f"{server.url}/api/v1/health", timeout=30).json()
        detail = body["components"]["artifacts"]["detail"] or ""
        return None if detail.startswith("no answer within") else body

    return wait_until(answered, timeout=20, interval=0.2)


def test_health_reports_a_working_artifact_store(tenant: Tenant) -> None:
    artifacts = health(tenant)["components"]["artifacts"]
    assert artifacts["status"] == "ok", artifacts
    assert artifacts["store"] == "filesystem"
    assert artifacts["detail"] is None
    assert artifacts["latency_ms"] >= 0


def test_health_reports_a_working_s3_store(web_with_s3: WebServer) -> None:
    artifacts = artifacts_once_checked(web_with_s3)["components"]["artifacts"]
    assert artifacts["status"] == "ok", artifacts
    assert artifacts["store"] == "s3"


@pytest.mark.parametrize(
    ("server", "says"),
    [
        ("web_with_missing_bucket", "no-such-bucket-"),
        ("web_with_impossible_directory", "artifact directory"),
    ],
)
def test_a_broken_artifact_store_degrades_health_but_not_readiness(
    request: pytest.FixtureRequest, server: str, says: str
) -> None:
    web: WebServer = request.getfixturevalue(server)
    body = artifacts_once_checked(web)
    artifacts = body["components"]["artifacts"]
    assert artifacts["status"] == "down", artifacts
    assert says in artifacts["detail"], artifacts
    assert body["components"]["database"]["status"] == "ok"
    assert body["components"]["redis"]["status"] == "ok"
    assert body["status"] == "degraded"

    # This process still serves everything but artifacts' bytes: it stays in the rotation.
    ready = httpx.get(f"{web.url}/api/v1/ready", timeout=30)
    assert ready.status_code == 200
    assert ready.json()["status"] == "healthy"
    assert set(ready.json()["checks"]) == {"database", "redis"}
