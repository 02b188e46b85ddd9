"""Run the simulator as a subprocess, for tests, benchmarks and `make dev`.

    with SimulatorProcess(ttft=0.01, tps=0) as sim:
        client = openai.OpenAI(base_url=sim.base_url, api_key="sim")
        ...
        assert sim.stats()["requests"] == 1

A real process (not an in-process app) so the code under test talks to it over real sockets
and the simulator's CPU is not shared with the test's event loop.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from devtools.errors import ServiceError
from devtools.server import DevServer

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
_LISTENING = re.compile(r"simulator listening on http://(?P<host>[^:/\s]+):(?P<port>\d+)/v1")
# Run knobs that become CLI flags; anything else is a caller's mistake.
_FLAG_KNOBS = ("ttft", "tps", "faults", "seed", "retry_after", "step_time", "rpm", "rpm_period")


class SimulatorError(ServiceError):
    """The simulator process did not start, or its admin API answered with an error."""


class SimulatorProcess(DevServer):
    """`python -m app.sim` in a subprocess; `port=None` lets the simulator pick a free port."""

    name = "simulator"
    stop_timeout = STOP_TIMEOUT

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        startup_timeout: float = STARTUP_TIMEOUT,
        env: dict[str, str] | None = None,
        **knobs: Any,
    ) -> None:
        unknown = set(knobs) - set(_FLAG_KNOBS)
        if unknown:
            raise TypeError(f"unknown simulator knobs: {', '.join(sorted(unknown))}")
        # Port 0: the simulator binds a free port itself and logs it, so there is no race.
        super().__init__(port or 0)
        self.host = host
        self.knobs = knobs
        self.start_timeout = startup_timeout
        self.extra_env = env or {}

    # --- DevServer hooks --------------------------------------------------------------------

    def _prepare(self, deadline: float) -> None:
        log_fd, log_name = tempfile.mkstemp(prefix="conveyor-sim-", suffix=".log")
        os.close(log_fd)
        self.log_path = Path(log_name)

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, **self.extra_env}
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")])
        )
        command = [sys.executable, "-m", "app.sim", "--host", self.host]
        command += ["--port", str(self.port), "--exit-with-parent", str(os.getpid())]
        for name, value in self.knobs.items():
            if value is not None:
                command += [f"--{name.replace('_', '-')}", str(value)]
        return self._popen(command, cwd=PROJECT_ROOT, env=env)

    def _probe(self) -> bool:
        if self.port == 0:
            match = _LISTENING.search(self.log_text())
            if match is None:
                return False
            self.port = int(match.group("port"))
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=1.0) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def _after_stop(self) -> None:
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None

    def _log_ready(self) -> None:
        logger.info("simulator ready at %s in %.2fs", self.base_url, self.timings["total"])

    def log_text(self) -> str:
        """What the simulator has logged so far (handy when a test fails)."""
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # --- addresses and admin API ------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, e.g. http://127.0.0.1:PORT/v1."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def comfy_url(self) -> str:
        """ComfyUI's API is at the server's root, as on a ComfyUI server: /prompt, /ws, ..."""
        return f"http://{self.host}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.host}:{self.port}/_sim"

    def stats(self) -> dict[str, Any]:
        return self._admin("GET", "stats")

    def requests(self, tag: str | None = None) -> list[dict[str, Any]]:
        """The simulator's log of its latest requests (those with `[[sim tag=...]]` `tag`)."""
        query = "" if tag is None else f"?tag={urllib.parse.quote(tag)}"
        return self._admin("GET", f"requests{query}")["items"]

    def batches(self) -> list[dict[str, Any]]:
        """Every Batch API batch the simulator was given: id, model, status, requests."""
        return self._admin("GET", "batches")["items"]

    def reset(self) -> dict[str, Any]:
        """Zero the counters and the per-messages `times` fault counters."""
        return self._admin("POST", "reset")

    def configure(self, **run_knobs: Any) -> dict[str, Any]:
        """Change run defaults (ttft, tps, faults, retry_after, step_time, seed); returns the new
        config."""
        return self._admin("POST", "config", run_knobs)

    def _admin(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else b"" if method == "POST" else None
        request = urllib.request.Request(
            f"{self.admin_url}/{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10.0) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise SimulatorError(f"{method} {path}: {error.code} {error.read()!r}") from error
