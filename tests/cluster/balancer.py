"""HAProxy in front of the web replicas, as a deployment has it: health checks on
/api/v1/live, WebSockets tunnelled, a connection to a dead replica sent to the other one.

Socket.IO here is WebSocket-only (app/realtime), so no sticky sessions are needed: a
reconnecting client may land on any live replica and resumes by seq there.
"""

from __future__ import annotations

import csv
import shutil
import socket
import subprocess
import time
from pathlib import Path

CONFIG = """\
global
    maxconn 2000
    stats socket {socket} mode 600 level admin

defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    # A WebSocket outlives any request timeout: it is a tunnel once upgraded.
    timeout tunnel 1h
    # A connection refused by a dead replica is tried again on the other.
    option redispatch 1
    retries 3

frontend conveyor
    bind {address}:{port}
    default_backend web

backend web
    # Long-lived connections: the replica with the fewest takes the next.
    balance leastconn
    option httpchk GET /api/v1/live
    http-check expect status 200
{servers}
"""


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(found).exists():
        raise RuntimeError("haproxy is missing: run tools/require haproxy (make cluster does)")
    return found


class Balancer:
    def __init__(self, workdir: Path, address: str, port: int, replicas: dict[str, str]) -> None:
        """`replicas`: each web replica's name and its address:port."""
        self.address = address
        self.port = port
        self.url = f"http://{address}:{port}"
        self.socket = workdir / "haproxy.sock"
        self.config = workdir / "haproxy.cfg"
        self.process: subprocess.Popen[bytes] | None = None  # set by whoever starts it
        servers = "\n".join(
            f"    server {name} {target} check inter 500 fall 2 rise 2"
            for name, target in replicas.items()
        )
        self.config.write_text(
            CONFIG.format(socket=self.socket, address=address, port=port, servers=servers)
        )

    def command(self) -> list[str]:
        return [haproxy_binary(), "-db", "-f", str(self.config)]

    def wait_ready(self, within: float = 30) -> None:
        """Until HAProxy answers on its socket and sees every replica up."""
        assert self.process is not None, "not started"
        deadline = time.monotonic() + within
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited with code {self.process.returncode}")
            try:
                if all(row["status"] == "UP" for row in self.servers().values()):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"haproxy not ready within {within} s")
            time.sleep(0.1)

    def servers(self) -> dict[str, dict[str, str]]:
        """`show stat` of the web backend's servers: status (UP, DOWN) and scur, the
        connections each holds right now (health checks not counted)."""
        rows = csv.DictReader(self._ask("show stat").lstrip("# ").splitlines())
        return {
            row["svname"]: row
            for row in rows
            if row["pxname"] == "web" and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def holding(self) -> list[str]:
        """The replicas that hold a client connection right now."""
        return [name for name, row in self.servers().items() if int(row["scur"] or 0) > 0]

    def _ask(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(5)
            conn.connect(str(self.socket))
            conn.sendall(f"{command}\n".encode())
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()
