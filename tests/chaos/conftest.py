"""Fault injection: every test gets its own PostgreSQL, Redis, simulator, web process and worker
processes, so it may kill or restart any of them. Nothing here runs inside the pytest process
but the assertions: the app is reached over HTTP and the stores with plain clients.

Settings are short so that recovery happens within seconds (lease 3 s, heartbeat 1 s, sweep
every 1 s, dispatch grace 2 s); each test states the bound it holds a job to.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from app.config import Settings
from app.migrate import ROOT, upgrade
from devtools.postgres import PostgresServer
from devtools.rabbitmq import RabbitMQServer
from devtools.redis_server import RedisServer
from devtools.simprocess import SimulatorProcess
from tests.webserver import WebServer

FAST_RECOVERY = {
    "CONVEYOR_LEASE_SECONDS": "3",
    "CONVEYOR_HEARTBEAT_SECONDS": "1",
    "CONVEYOR_SWEEPER_INTERVAL": "1",
    "CONVEYOR_DISPATCH_GRACE_SECONDS": "2",
    "CONVEYOR_RETRY_BASE_DELAY": "0.2",
    "CONVEYOR_RETRY_MAX_DELAY": "2",
    "CONVEYOR_PROGRESS_WRITE_INTERVAL": "0.5",
    "CONVEYOR_LOG_LEVEL": "WARNING",
}
TERMINAL = {"succeeded", "failed", "canceled"}


@dataclass
class Cluster:
    workdir: Path
    pg: PostgresServer
    redis: RedisServer
    sim: SimulatorProcess
    database_url: str
    secret: str = "chaos-secret"
    broker_url: str | None = None  # None: Redis is the broker too
    web: WebServer | None = None
    # Where clients reach the API when it is not `web`: a load balancer in front of several.
    entry_url: str | None = None
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    key: str = ""

    # Environment and processes -----------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        blocked = ("CONVEYOR_", "DATABASE_URL", "REDIS_URL", "BROKER_URL", "OPENAI_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(blocked)}
        env.update(FAST_RECOVERY)
        env.update(
            DATABASE_URL=self.database_url,
            REDIS_URL=self.redis.url,
            OPENAI_BASE_URL=self.sim.base_url,
            OPENAI_API_KEY="sim",
            CONVEYOR_SECRET_KEY=self.secret,
            PYTHONPATH=str(ROOT),
        )
        if self.broker_url is not None:
            env["BROKER_URL"] = self.broker_url
        env.update(extra)
        return env

    def settings(self) -> Settings:
        return Settings(
            database_url=self.database_url,
            redis_url=self.redis.url,
            openai_base_url=self.sim.base_url,
            openai_api_key="sim",
            secret_key=self.secret,
            broker_url=self.broker_url,
        )

    def spawn(
        self, name: str, args: list[str], wrap: Sequence[str] = (), **env: str
    ) -> subprocess.Popen[bytes]:
        """`wrap` prefixes the command (the cluster test runs processes on its hosts so)."""
        log = (self.workdir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [*wrap, *args],
            cwd=ROOT,
            env=self.env(**env),
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    def start_worker(
        self,
        name: str = "w1",
        pool: str = "threads",
        concurrency: int = 8,
        wrap: Sequence[str] = (),
        **env: str,
    ) -> subprocess.Popen[bytes]:
        level = env.get("CONVEYOR_LOG_LEVEL", "WARNING")
        args = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker"]
        args += ["--pool", pool, "--concurrency", str(concurrency), "-Q", "conveyor"]
        args += ["-n", f"{name}-{uuid.uuid4().hex[:6]}@%h", "--loglevel", level]
        args += ["--without-mingle", "--without-gossip"]
        return self.spawn(name, args, wrap, **env)

    def start_beat(self, wrap: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        args = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "beat"]
        args += ["--loglevel", "WARNING", "--schedule", str(self.workdir / "beat-schedule")]
        return self.spawn("beat", args, wrap)

    def stop(self, process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        if process.poll() is None:
            os.killpg(process.pid, sig)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # The API -----------------------------------------------------------------------------

    def http(self, timeout: float = 10) -> httpx.Client:
        url = self.entry_url or (self.web.url if self.web is not None else None)
        assert url is not None, "no web process"
        return httpx.Client(
            base_url=f"{url}/api/v1",
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=timeout,
        )

    def submit(self, prompt: str, **fields: Any) -> str:
        with self.http() as client:
            response = client.post(
                "/jobs", json={"kind": "chat", "input": {"prompt": prompt}, **fields}
            )
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def wait_terminal(self, job_id: str, within: float) -> tuple[dict[str, Any], float]:
        """The job once terminal, and how long that took; fails past `within` seconds."""
        began = time.monotonic()
        while True:
            job = self.db_job(job_id)
            if job["status"] in TERMINAL:
                return job, time.monotonic() - began
            if time.monotonic() - began > within:
                raise AssertionError(f"job {job_id} still {job['status']} after {within} s")
            time.sleep(0.1)

    def wait_status(self, job_id: str, status: str, within: float = 30) -> None:
        deadline = time.monotonic() + within
        while self.db_job(job_id)["status"] != status:
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} never {status} within {within} s")
            time.sleep(0.05)

    # Straight to the stores (they are the truth the API reports) -------------------------

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        dsn = self.database_url.replace("postgresql+psycopg://", "postgresql://", 1)
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            cursor = conn.execute(query, params)
            return cursor.fetchall() if cursor.description else []

    def db_job(self, job_id: str) -> dict[str, Any]:
        rows = self.sql(
            "SELECT status, attempt, lease_expires_at, output, error_code, worker "
            "FROM jobs WHERE id = %s",
            job_id,
        )
        status, attempt, lease, output, error_code, worker = rows[0]
        return {
            "status": status,
            "attempt": attempt,
            "lease_expires_at": lease,
            "output": output,
            "error_code": error_code,
            "worker": worker,
        }

    def assert_model_budget(self, jobs: int, max_attempts: int = 3) -> None:
        """What the model really saw (the simulator's count, killed calls included) stays
        within the attempt budget of the test's jobs."""
        assert self.sim.stats()["requests"] <= jobs * max_attempts

    def model_calls(self, job_id: str) -> int:
        return self.sql("SELECT count(*) FROM model_calls WHERE job_id = %s", job_id)[0][0]

    def feed_problem(self, job_id: str) -> str | None:
        """What a client resuming from seq 0 gets must have no gap: contiguous seqs from the
        stream, or from PostgreSQL every durable event, each naming the one before it."""
        with self.http() as client:
            for _ in range(3):  # a 503 from a pooled connection the database dropped: retry
                response = client.get(f"/jobs/{job_id}/events", params={"limit": 1000})
                if response.status_code != 503:
                    break
            page = response.json()
        seqs = [item["seq"] for item in page["items"]]
        if page["source"] == "stream":
            return None if seqs == list(range(1, len(seqs) + 1)) else f"stream seqs {seqs[:6]}…"
        durable = [
            seq
            for (seq,) in self.sql(
                "SELECT seq FROM job_events WHERE job_id = %s ORDER BY seq", job_id
            )
        ]
        prevs = [item.get("prev") for item in page["items"]]
        if seqs != durable or prevs != [0, *seqs[:-1]]:
            return f"database replay {seqs[:6]}… against {durable[:6]}…"
        return None

    def assert_sound(self, job_id: str, max_attempts: int = 3) -> None:
        """Every chaos test's invariants for a job that has ended."""
        job = self.db_job(job_id)
        assert job["status"] in TERMINAL
        assert job["lease_expires_at"] is None
        assert job["attempt"] <= max_attempts
        assert self.model_calls(job_id) <= max_attempts
        terminal_events = self.sql(
            "SELECT count(*) FROM job_events WHERE job_id = %s AND type IN "
            "('job.succeeded', 'job.failed', 'job.canceled')",
            job_id,
        )[0][0]
        assert terminal_events == 1  # exactly one final result
        assert self.feed_problem(job_id) is None  # a client resuming from 0 sees no gap
        stuck = self.sql(
            "SELECT count(*) FROM jobs WHERE status = 'running' AND lease_expires_at < now()"
        )[0][0]
        assert stuck == 0


def create_key(cluster: Cluster, owner: str = "chaos") -> str:
    """An API key made the way an operator makes one: `flask keys create`."""
    command = [sys.executable, "-m", "flask", "--app", "app:create_app()", "keys", "create"]
    keys = subprocess.run(
        [*command, "--owner", owner],
        cwd=ROOT,
        env=cluster.env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return next(word for word in keys.stdout.split() if word.startswith("cvk_"))


@contextmanager
def running_cluster(
    workdir: Path,
    *,
    web_workers: int = 1,
    web_env: dict[str, str] | None = None,
    broker_url: str | None = None,
    **simulator_knobs: float,
) -> Iterator[Cluster]:
    """PostgreSQL, Redis (with its AOF, so it survives its restarts), the simulator, the web
    process and an API key; on the way out, every process the cluster started is killed."""
    pg = PostgresServer(workdir / "pg", durable=False).start()
    redis = RedisServer(data_dir=workdir / "redis").start()
    sim = SimulatorProcess(**simulator_knobs).start()
    database_url = pg.create_database("conveyor_chaos")
    upgrade(database_url)
    made = Cluster(workdir, pg, redis, sim, database_url, broker_url=broker_url)
    try:
        made.web = WebServer(made.settings(), workers=web_workers, extra_env=web_env).start()
        made.key = create_key(made)
        yield made
    finally:
        for process in made.processes:
            made.stop(process, signal.SIGKILL)
        if made.web is not None:
            made.web.stop()
        sim.stop()
        redis.stop()
        pg.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with running_cluster(tmp_path, ttft=0.05, tps=100) as made:
        yield made


@pytest.fixture
def rabbitmq_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """The same, with a private RabbitMQ node as the Celery broker."""
    with (
        RabbitMQServer() as rabbitmq,
        running_cluster(tmp_path, broker_url=rabbitmq.url, ttft=0.05, tps=100) as made,
    ):
        yield made
