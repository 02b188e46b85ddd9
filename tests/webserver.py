"""The real web process for tests that need one (Socket.IO, Server-Sent Events, the browser):
gunicorn with the gevent worker, as the Procfile runs it, on a free port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from app.config import Settings
from app.migrate import ROOT
from devtools.processes import free_port

GUNICORN = Path(sys.executable).with_name("gunicorn")


class WebServer:
    """`host`, `port` and `wrap` (a command prefix) place it elsewhere than on loopback: the
    cluster test runs one in each web host's network namespace."""

    def __init__(
        self,
        settings: Settings,
        workers: int = 1,
        extra_env: dict[str, str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        wrap: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        self.workers = workers
        self.extra_env = extra_env or {}
        self.host = host
        self.port = port or free_port()
        self.wrap = list(wrap)
        self.url = f"http://{host}:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None
        self._log = Path(tempfile.mkstemp(prefix="conveyor-web-", suffix=".log")[1])

    def env(self) -> dict[str, str]:
        s = self.settings
        values = {
            "CONVEYOR_DATABASE_URL": s.database_url,
            "CONVEYOR_REDIS_URL": s.redis_url,
            "CONVEYOR_SECRET_KEY": s.secret_key or "",
            "CONVEYOR_OPENAI_BASE_URL": s.openai_base_url or "",
            "CONVEYOR_OPENAI_API_KEY": s.openai_api_key or "",
            "CONVEYOR_REALTIME_TOKEN_TTL": str(s.realtime_token_ttl),
            "CONVEYOR_ALLOWED_ORIGINS": ",".join(s.allowed_origins),
            # The same artifact store as the tests' in-process app and worker.
            "CONVEYOR_ARTIFACT_STORE": s.artifact_store,
            "CONVEYOR_ARTIFACT_DIR": str(s.artifact_dir.absolute()),
            "CONVEYOR_S3_PREFIX": s.s3_prefix,
            "CONVEYOR_ARTIFACT_URL_TTL": str(s.artifact_url_ttl),
        }
        optional = {
            "CONVEYOR_BROKER_URL": s.broker_url,
            "CONVEYOR_COMFYUI_URL": s.comfyui_url,
            "CONVEYOR_S3_BUCKET": s.s3_bucket,
            "CONVEYOR_S3_ENDPOINT_URL": s.s3_endpoint_url,
            "CONVEYOR_S3_REGION": s.s3_region,
            "CONVEYOR_AWS_ACCESS_KEY_ID": s.s3_access_key_id,
            "CONVEYOR_AWS_SECRET_ACCESS_KEY": s.s3_secret_access_key,
        }
        values |= {name: value for name, value in optional.items() if value is not None}
        return {**os.environ, **values, **self.extra_env, "PYTHONPATH": str(ROOT)}

    def start(self) -> WebServer:
        command = [*self.wrap, str(GUNICORN), "--bind", f"{self.host}:{self.port}"]
        command += ["--worker-class", "gevent"]
        command += ["--workers", str(self.workers), "--graceful-timeout", "2"]
        command += ["-c", "python:app.gunicorn_config", "app:create_app()"]
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(
                command, cwd=ROOT, env=self.env(), stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"gunicorn exited:\n{self._log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/api/v1/live", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"gunicorn did not answer:\n{self._log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self._process is None:
            return
        try:
            os.killpg(self._process.pid, signal.SIGTERM)
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(5)
        except ProcessLookupError:
            pass
        self._process = None

    def kill(self) -> None:
        """SIGKILL, master and workers at once: the host's web process dies, nothing is closed
        politely."""
        if self._process is not None:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(10)
            self._process = None

    def log_text(self) -> str:
        """What gunicorn and its workers wrote (stdout and stderr)."""
        return self._log.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        """The gunicorn workers' process ids (the master's children)."""
        assert self._process is not None, "not started"
        pid = self._process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [int(child) for child in children]

    def restart(self) -> None:
        self.stop()
        self.start()
