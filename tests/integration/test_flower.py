"""Flower as the Procfile runs it: it shows every worker and task, so it must ask for
credentials, refuse to start without them, and listen on localhost unless told otherwise.
The command line is read from the Procfile itself and run by a shell, as honcho runs it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.migrate import ROOT
from devtools.processes import free_port
from tests.conftest import Tenant, wait_until

CREDENTIALS = ("operator", "flower-test-password")


def procfile_command(name: str) -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name} process in the Procfile")


def flower_env(settings: Settings, port: int, **extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("FLOWER_", "CONVEYOR_"))
    }
    env.update(
        {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONPATH": str(ROOT),
            "CONVEYOR_DATABASE_URL": settings.database_url,
            "CONVEYOR_REDIS_URL": settings.redis_url,
            "FLOWER_PORT": str(port),
            **extra,
        }
    )
    return env


def start_flower(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        procfile_command("flower"),
        shell=True,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, 15)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait(5)


@pytest.fixture(scope="module")
def flower(settings: Settings, redis_server) -> Iterator[str]:
    port = free_port()
    process = start_flower(flower_env(settings, port, FLOWER_BASIC_AUTH=":".join(CREDENTIALS)))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            if process.poll() is not None:
                raise AssertionError(process.stdout.read().decode()[-3000:])  # type: ignore[union-attr]
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield url
    finally:
        stop(process)


def test_flower_asks_for_credentials(flower: str) -> None:
    for path in ("/", "/workers", "/tasks", "/api/workers"):
        anonymous = httpx.get(f"{flower}{path}", timeout=10)
        assert anonymous.status_code == 401, path
        wrong = httpx.get(f"{flower}{path}", auth=("operator", "guess"), timeout=10)
        assert wrong.status_code == 401, path
    signed_in = httpx.get(f"{flower}/workers", auth=CREDENTIALS, timeout=10)
    assert signed_in.status_code == 200


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a listening TCP socket on `port` (from /proc/net)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                if len(address) == 8:
                    found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]))
                else:
                    words = [bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, 32, 8)]
                    found.add(socket.inet_ntop(socket.AF_INET6, b"".join(words)))
    return found


def test_flower_listens_on_localhost_only(flower: str) -> None:
    port = int(flower.rsplit(":", 1)[1])
    assert listening_addresses(port) == {"127.0.0.1"}


def test_flower_refuses_to_start_without_credentials(settings: Settings) -> None:
    process = start_flower(flower_env(settings, free_port()))
    try:
        output, _ = process.communicate(timeout=60)
    finally:
        stop(process)
    assert process.returncode != 0
    assert b"FLOWER_BASIC_AUTH" in output


def test_flower_names_a_job_task_by_its_kind_attempt_and_id_never_its_input(
    flower: str, worker: object, tenant: Tenant
) -> None:
    def seeing_workers() -> bool:
        found = httpx.get(f"{flower}/api/workers?refresh=1", auth=CREDENTIALS, timeout=10)
        return found.status_code == 200 and bool(found.json())

    wait_until(seeing_workers, timeout=60)  # Flower receives the workers' events now
    assert seeing_workers()
    canary = f"canary-{uuid.uuid4().hex}"
    job_id = tenant.submit("chat", {"prompt": f"{canary} [[sim fault=500 times=1]]"})["id"]
    assert tenant.wait_for(job_id, timeout=60)["status"] == "succeeded"

    def tasks_of_the_job() -> list[dict[str, Any]]:
        listed = httpx.get(f"{flower}/api/tasks", auth=CREDENTIALS, timeout=10).json()
        return [task for task in listed.values() if job_id in (task.get("args") or "")]

    try:
        tasks = wait_until(lambda: len(tasks_of_the_job()) >= 2 and tasks_of_the_job(), timeout=60)
    except AssertionError:
        raise AssertionError(f"Flower's tasks of the job: {tasks_of_the_job()}") from None
    assert {task["name"] for task in tasks} == {"conveyor.run_job:chat"}
    assert sorted(task["args"] for task in tasks) == [
        f"['{job_id}'] attempt 1",
        f"['{job_id}'] attempt 2",
    ]
    listed = httpx.get(f"{flower}/api/tasks", auth=CREDENTIALS, timeout=10).text
    assert canary not in listed


def test_flowers_prometheus_metrics_are_served_as_documented(flower: str) -> None:
    """docs/architecture.md: Flower's /metrics is Prometheus text, served without credentials
    (which is why Flower's port stays on loopback)."""
    metrics = httpx.get(f"{flower}/metrics", timeout=10)
    assert metrics.status_code == 200
    assert metrics.headers["Content-Type"].startswith("text/plain")
    assert "# TYPE flower_events_total counter" in metrics.text
