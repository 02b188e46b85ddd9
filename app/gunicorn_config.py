"""gunicorn's settings file (`gunicorn -c python:app.gunicorn_config`, as the Procfile runs it):
gunicorn's own lines, the master's included, in Conveyor's log format (CONVEYOR_LOG_FORMAT), and
the metrics' multiprocess directory (docs/metrics.md).

prometheus_client chooses between in-memory and multiprocess values when it is first imported,
from `PROMETHEUS_MULTIPROC_DIR`. The master reads this file before any worker loads the app, so
the directory set here is the one every worker inherits; without it a scrape would answer with
the one worker it reached. It is emptied when the master starts, because values a previous run
left there would be counted again (counters would jump), and a worker that exits is marked dead
so that its live gauges (Socket.IO clients) stop counting.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from app.logs import gunicorn_logconfig

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

logconfig_dict = gunicorn_logconfig()

# A directory of this master's own, removed when it exits; one the operator sets must be one
# per gunicorn master too (and is emptied, not removed).
_made_here = not os.environ.get(MULTIPROC_ENV)
if _made_here:
    os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="conveyor-metrics-")


def on_starting(server: Any) -> None:
    directory = Path(os.environ[MULTIPROC_ENV])
    if directory.is_dir():
        for entry in directory.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    directory.mkdir(parents=True, exist_ok=True)


def child_exit(server: Any, worker: Any) -> None:
    # Imported here: the master itself never records a metric, and importing prometheus_client
    # only once the directory is set is what keeps it in multiprocess mode.
    from app.metrics import process_exited

    process_exited(worker.pid)


def on_exit(server: Any) -> None:
    if _made_here:
        shutil.rmtree(os.environ[MULTIPROC_ENV], ignore_errors=True)
