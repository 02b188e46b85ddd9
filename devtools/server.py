"""The one lifecycle of every server we run as a child process: PostgreSQL, Redis and the
model simulator.

A server runs in the foreground as a child of the calling Python process, on a private port,
so it never touches (or depends on) system services that may already listen on 5432/6379.
It stays in our process group: a terminal's Ctrl-C reaches it together with us.

Why not mirakuru's Executor: it starts every child in a session of its own (setsid), so a
Ctrl-C would no longer reach the servers; it SIGKILLs a server that is slow to come up
instead of shutting it down; it cannot drop the developer's PG* variables from a child's
environment; and DevServer rebuilt on it (probe, log tails, port retry kept) came out 11
lines longer. pytest-postgresql wipes its data directory on every start and daemonizes
through pg_ctl, which rules out make dev's kept cluster and running as a non-root account.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from devtools.errors import PortInUseError, ServiceError
from devtools.processes import (
    free_port,
    is_process_named,
    log_tail,
    pid_alive,
    process_start_ticks,
    read_pid_file,
)

logger = logging.getLogger(__name__)

# Records which Python process launched the server, so a later run can tell a
# server orphaned by a killed parent from one that is legitimately in use.
OWNER_FILE_NAME = ".conveyor-owner"
_POLL_INTERVAL = 0.05

_running: set[DevServer] = set()
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


class DevServer:
    """Spawn, wait until ready, stop, restart; a context manager that starts and stops.

    ``port=None`` picks a free port, and picks another if someone takes it before the server
    binds it; ``port=0`` is for a server that binds port 0 and reports what it got (its
    ``_probe`` sets ``self.port``).
    """

    name = "server"
    stop_signal = signal.SIGTERM
    start_timeout: float = 30
    stop_timeout: float = 15
    bind_error_markers: tuple[str, ...] = ("Address already in use",)

    def __init__(self, port: int | None) -> None:
        self._auto_port = port is None
        self.port = free_port() if port is None else port
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: IO[bytes] | None = None
        self._started_once = False
        self.log_path: Path | None = None
        self._log_offset = 0
        self.timings: dict[str, float] = {}

    # -- subclass hooks
    def _prepare(self, deadline: float) -> None:
        """Everything before the spawn: data and log directories, leftovers of a killed run."""

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

    def start(self, timeout: float | None = None) -> Self:
        if self.running:
            return self
        began = time.monotonic()
        deadline = began + (self.start_timeout if timeout is None else timeout)
        # A port handed out by free_port() can be grabbed by someone else before
        # the server binds it; only then (and only for ports we chose) retry.
        attempts = 3 if self._auto_port and not self._started_once else 1
        try:
            for attempt in range(attempts):
                try:
                    self._start_once(deadline)
                    break
                except PortInUseError:
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

    def stop(self, timeout: float | None = None) -> None:
        self._shutdown(self.stop_timeout if timeout is None else timeout, cleanup=True)

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

    # -- for subclasses
    def _popen(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``cmd`` with its output appended to ``self.log_path``, after the command."""
        assert self.log_path is not None
        self._log_fh = self.log_path.open("ab")
        self._log_offset = self._log_fh.tell()
        self._log_fh.write(f"--- conveyor: starting {' '.join(cmd)}\n".encode())
        self._log_fh.flush()
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._log_fh, stderr=subprocess.STDOUT, **kwargs
        )

    def _reclaim_leftover(self, pid_file: Path, names: tuple[str, ...], data_dir: Path) -> None:
        """Deal with a server left running on ``data_dir`` by a previous, killed run."""
        pid = read_pid_file(pid_file)
        if pid is None or not is_process_named(pid, names):
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
        owner_file = data_dir / OWNER_FILE_NAME
        owner = owner_file.read_text().split() if owner_file.exists() else []
        owner_alive = (
            len(owner) == 2
            and owner[0].isdigit()
            and pid_alive(int(owner[0]))
            and process_start_ticks(int(owner[0])) == owner[1]
        )
        if owner and not owner_alive:
            logger.warning(
                "%s pid %d on %s was orphaned by a killed run; stopping it",
                self.name,
                pid,
                data_dir,
            )
            self._kill_orphan(pid)
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
        (data_dir / OWNER_FILE_NAME).write_text(f"{me} {process_start_ticks(me)}\n")

    # -- internals
    def _kill_orphan(self, pid: int) -> None:
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

    def _start_once(self, deadline: float) -> None:
        began = time.monotonic()
        try:
            self._prepare(deadline)
            spawned = time.monotonic()
            self._proc = self._spawn()
            while True:
                code = self._proc.poll()
                if code is not None:
                    tail = log_tail(self.log_path, since=self._log_offset)
                    bind_error = any(marker in tail for marker in self.bind_error_markers)
                    raise (PortInUseError if bind_error else ServiceError)(
                        f"{self.name} exited with code {code} during startup on port "
                        f"{self.port}; last lines of {self.log_path}:\n{tail}"
                    )
                if self._probe():
                    break
                if time.monotonic() > deadline:
                    raise ServiceError(
                        f"{self.name} did not accept connections on port {self.port} in time; "
                        f"last lines of {self.log_path}:\n"
                        f"{log_tail(self.log_path, since=self._log_offset)}"
                    )
                time.sleep(_POLL_INTERVAL)
        except BaseException:
            # Never leave a half-started child behind (also on KeyboardInterrupt).
            self._shutdown(5, cleanup=False)
            raise
        self.timings["ready"] = time.monotonic() - spawned
        self.timings["start"] = time.monotonic() - began
