"""A private RabbitMQ node for the tests that run Conveyor on an AMQP broker.

Debian's `rabbitmq-server` (installed by `tools/require rabbitmq-server`), started in the
foreground as a child with a node name, ports, data, logs and Erlang cookie of its own: it never
touches a system RabbitMQ that may already listen on 5672. It needs no epmd either (the node
listens for distribution on its own port), so stopping it leaves no Erlang process behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from devtools.errors import ServiceError
from devtools.processes import free_port
from devtools.server import DevServer

logger = logging.getLogger(__name__)

SERVER_SCRIPT = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
# A delivery unacknowledged this long is one RabbitMQ takes back by closing the channel; above
# any job's time limit with room (the default, 30 minutes, is documented in docs/brokers.md).
CONSUMER_TIMEOUT_MS = 2 * 3600 * 1000


def find_rabbitmq_server() -> Path:
    if SERVER_SCRIPT.is_file():
        return SERVER_SCRIPT
    found = shutil.which("rabbitmq-server")
    if found is None:
        raise ServiceError("rabbitmq-server is not installed: run tools/require rabbitmq-server")
    return Path(found)


class RabbitMQServer(DevServer):
    """RabbitMQ on 127.0.0.1:``port`` (guest/guest), its data in a temporary directory."""

    name = "rabbitmq"
    start_timeout = 90  # an Erlang VM booting on a loaded machine
    stop_timeout = 30
    bind_error_markers = ("eaddrinuse",)

    def __init__(self, port: int | None = None) -> None:
        super().__init__(port)
        self.script = find_rabbitmq_server()
        self.dist_port = free_port()
        self._work_dir: Path | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _prepare(self, deadline: float) -> None:
        if self._work_dir is None or not self._work_dir.is_dir():
            self._work_dir = Path(tempfile.mkdtemp(prefix="conveyor-rabbitmq-"))
        work = self._work_dir
        (work / "enabled_plugins").write_text("[].\n")
        (work / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {self.port}\n"
            # guest may connect from 127.0.0.1 only by default; loopback is all we bind.
            "loopback_users = none\n"
            f"consumer_timeout = {CONSUMER_TIMEOUT_MS}\n"
        )
        self.log_path = work / "rabbitmq.out"

    def _spawn(self) -> subprocess.Popen[bytes]:
        assert self._work_dir is not None
        work = self._work_dir
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(work),  # the Erlang cookie is made here: private to this node
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": f"conveyor-{self.port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(work / "mnesia"),
            "RABBITMQ_LOG_BASE": str(work / "log"),
            "RABBITMQ_CONFIG_FILE": str(work / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(work / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(work / "rabbitmq.pid"),
            # No epmd: the node's distribution port is fixed, so nothing outlives the node.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": (
                f"-start_epmd false -erl_epmd_port {self.dist_port}"
            ),
        }
        # The script traps SIGTERM and stops the node gracefully (DevServer's stop signal).
        return self._popen([str(self.script)], cwd=work, env=env)

    def _probe(self) -> bool:
        assert self.log_path is not None
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"AMQP\x00\x00\x09\x01")
                sock.settimeout(5)
                greeting = sock.recv(8)
        except OSError:
            return False
        # connection.start (class 10, method 10) in a method frame: the broker is serving.
        return greeting[:1] == b"\x01"

    def _log_ready(self) -> None:
        logger.info(
            "RabbitMQ (%s) ready on port %d in %.2fs",
            self.script,
            self.port,
            self.timings.get("total", 0.0),
        )

    def _after_stop(self) -> None:
        if self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None
