"""Run the simulator as a subprocess, for tests and local development.

    with SimulatorProcess(ttft=0.01, tps=0) as sim:
        client = openai.OpenAI(base_url=sim.base_url, api_key="sim")
        ...
        assert sim.stats()["requests"] == 1

A real process (not an in-process app) so the code under test talks to it over real sockets
and the simulator's CPU is not shared with the test's event loop.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self

PROJECT_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
_LISTENING = re.compile(r"simulator listening on http://(?P<host>[^:/\s]+):(?P<port>\d+)/v1")
# Run knobs that become CLI flags; anything else is a caller's mistake.
_FLAG_KNOBS = ("ttft", "tps", "faults", "seed", "retry_after")


class SimulatorError(RuntimeError):
    """The simulator process did not start, or its admin API answered with an error."""


class SimulatorProcess:
    """`python -m app.sim` in a subprocess; `port=None` lets the simulator pick a free port."""

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
        self.host = host
        self.port = port
        self.knobs = knobs
        self.startup_timeout = startup_timeout
        self.extra_env = env or {}
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> Self:
        if self._process is not None:
            return self
        log_fd, log_name = tempfile.mkstemp(prefix="conveyor-sim-", suffix=".log")
        self._log_path = Path(log_name)
        env = {**os.environ, **self.extra_env}
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")])
        )
        try:
            self._process = subprocess.Popen(
                self._command(),
                cwd=PROJECT_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
            )
        finally:
            os.close(log_fd)  # the child has its own copy
        atexit.register(self.stop)
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _command(self) -> list[str]:
        command = [sys.executable, "-m", "app.sim", "--host", self.host]
        command += ["--port", str(self.port or 0), "--exit-with-parent", str(os.getpid())]
        for name, value in self.knobs.items():
            if value is not None:
                command += [f"--{name.replace('_', '-')}", str(value)]
        return command

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise SimulatorError(
                    f"simulator exited with {self._process.returncode}:\n{self.log_text()}"
                )
            if self.port in (None, 0):
                self.port = self._port_from_log()
            if self.port and self._answers():
                return
            time.sleep(0.05)
        raise SimulatorError(
            f"simulator not ready after {self.startup_timeout:g} s:\n{self.log_text()}"
        )

    def _port_from_log(self) -> int | None:
        match = _LISTENING.search(self.log_text())
        return int(match.group("port")) if match else None

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=1.0) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        """Terminate the simulator and wait for it; kill it if it does not go in time."""
        process, self._process = self._process, None
        atexit.unregister(self.stop)
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log_path is not None:
            with contextlib.suppress(OSError):
                self._log_path.unlink()
            self._log_path = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_text(self) -> str:
        """What the simulator has logged so far (handy when a test fails)."""
        if self._log_path is None:
            return ""
        try:
            return self._log_path.read_text(errors="replace")
        except OSError:
            return ""

    # --- addresses and admin API ------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, e.g. http://127.0.0.1:PORT/v1."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def admin_url(self) -> str:
        return f"http://{self.host}:{self.port}/_sim"

    def stats(self) -> dict[str, Any]:
        return self._admin("GET", "stats")

    def reset(self) -> dict[str, Any]:
        """Zero the counters and the per-messages `times` fault counters."""
        return self._admin("POST", "reset")

    def configure(self, **run_knobs: Any) -> dict[str, Any]:
        """Change run defaults (ttft, tps, faults, retry_after, seed); returns the new config."""
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
