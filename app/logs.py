"""Structured logs: one line per record, with the job id on every record a job causes."""

from __future__ import annotations

import logging
import os

from flask import Flask

FORMAT = "%(asctime)s %(levelname)s %(name)s%(job)s %(message)s"


class JobIdFilter(logging.Filter):
    """Adds ` job=<id>` when a record carries `extra={"job_id": ...}`, else nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        job_id = getattr(record, "job_id", None)
        record.job = f" job={job_id}" if job_id else ""
        return True


def configure(level: str | None = None) -> None:
    root = logging.getLogger()
    if any(isinstance(f, JobIdFilter) for h in root.handlers for f in h.filters):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(JobIdFilter())
    root.addHandler(handler)
    root.setLevel(level or os.environ.get("CONVEYOR_LOG_LEVEL", "INFO"))


def init_app(app: Flask) -> None:
    if not app.testing:
        configure()
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, JobIdFilter) for f in handler.filters):
            handler.addFilter(JobIdFilter())
