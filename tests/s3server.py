"""moto's S3 server (its server mode) as a process of its own, for the S3 artifact store's tests:
the store talks to it over real HTTP with boto3, as it talks to AWS S3 or MinIO, and nothing
of moto is patched into the test process.

    with MotoS3Server() as s3:
        s3.client().create_bucket(Bucket="artifacts")
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import boto3

from devtools.server import DevServer

logger = logging.getLogger(__name__)

# moto accepts any credentials; these only keep boto3 from looking for real ones.
ACCESS_KEY_ID = "conveyor-test"
SECRET_ACCESS_KEY = "conveyor-test-secret"
REGION = "us-east-1"


class MotoS3Server(DevServer):
    """`python -m moto.server` on 127.0.0.1 and a free port."""

    name = "moto-s3"
    # Importing moto and its Flask app takes a few seconds on a cold, busy machine.
    start_timeout = 60
    stop_timeout = 10

    def __init__(self, port: int | None = None) -> None:
        super().__init__(port)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> Any:
        """A boto3 S3 client of this server, for a test's own look at the bucket."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
        )

    # DevServer hooks --------------------------------------------------------------------------

    def _prepare(self, deadline: float) -> None:
        fd, name = tempfile.mkstemp(prefix="conveyor-moto-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)

    def _spawn(self) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        # The developer's AWS variables must not reach the server (or a profile it would read).
        env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
        return self._popen(command, env=env)

    def _probe(self) -> bool:
        # moto's own API, so an unrelated server that took the port does not pass for it.
        try:
            with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/data.json", timeout=1):
                return True
        except (OSError, urllib.error.URLError):
            return False

    def _after_stop(self) -> None:
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None

    def _log_ready(self) -> None:
        logger.info("moto S3 server at %s in %.2fs", self.endpoint_url, self.timings["total"])
