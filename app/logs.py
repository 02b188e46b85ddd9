"""Logs: one line per record, as text or as JSON (`CONVEYOR_LOG_FORMAT`), from every process.

Every record a job's attempt causes carries the job's id, attempt, kind and tenant: the worker
sets them for the attempt (`job_context`), and a filter on the handler adds them to each record,
whichever module logged it. Records about a job outside an attempt pass `extra={"job_id": ...}`.

Celery's lines (its `setup_logging` signal, workers/celery_app.py) and gunicorn's
(app/gunicorn_config.py) go through the same handler and format. What a user sent or a model
answered is never logged: messages name jobs, codes and counts; a test runs jobs with a canary
prompt through real processes and looks for it in every line (tests/chaos/test_logs.py).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from flask import Flask
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(job)s %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"
JSON_NAMES = {"asctime": "time", "levelname": "level", "name": "logger"}
JOB_FIELDS = ("job_id", "attempt", "kind", "tenant")


@dataclass(frozen=True)
class JobFields:
    job_id: str
    attempt: int
    kind: str
    tenant: str


# Per thread, and per greenlet under gevent (each greenlet runs in a context of its own).
_current_job: ContextVar[JobFields | None] = ContextVar("conveyor_job", default=None)


@contextmanager
def job_context(job_id: object, attempt: int, kind: str, tenant: str) -> Iterator[None]:
    """Every record logged inside carries the job's fields."""
    token = _current_job.set(JobFields(str(job_id), attempt, kind, tenant))
    try:
        yield
    finally:
        _current_job.reset(token)


class JobFieldsFilter(logging.Filter):
    """Adds the running job's fields to a record that does not carry them itself, and `job`,
    their text form (` job=<id> attempt=<n> ...`, or nothing), for the text format."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = _current_job.get()
        if current is not None:
            for name in JOB_FIELDS:
                if getattr(record, name, None) is None:
                    setattr(record, name, getattr(current, name))
        parts = [
            f" {name}={value}"
            for name in JOB_FIELDS
            if (value := getattr(record, name, None)) is not None
        ]
        record.job = "".join(parts)
        return True


def log_format(value: str | None = None) -> str:
    chosen = (value or os.environ.get("CONVEYOR_LOG_FORMAT") or "text").strip().lower()
    if chosen not in FORMATS:
        raise ValueError(f"CONVEYOR_LOG_FORMAT must be one of {', '.join(FORMATS)}, not {chosen!r}")
    return chosen


def formatter(chosen: str | None = None) -> logging.Formatter:
    if log_format(chosen) == "json":
        return JsonFormatter(
            JSON_FIELDS,
            rename_fields=JSON_NAMES,
            # `job` is the text format's rendering of fields JSON has as its own keys.
            reserved_attrs=[*RESERVED_ATTRS, "job", "color_message"],
            json_default=str,
        )
    return logging.Formatter(TEXT_FORMAT)


def handler(chosen: str | None = None) -> logging.Handler:
    made = logging.StreamHandler(sys.stderr)
    made.setFormatter(formatter(chosen))
    made.addFilter(JobFieldsFilter())
    return made


def configure(level: str | int | None = None) -> None:
    """The root logger's one handler, in the chosen format; called once per process (again is
    a no-op but for the level)."""
    root = logging.getLogger()
    if not any(isinstance(f, JobFieldsFilter) for h in root.handlers for f in h.filters):
        root.addHandler(handler())
    root.setLevel(level or os.environ.get("CONVEYOR_LOG_LEVEL", "INFO"))
    # Python's warnings (Celery's SecurityWarning, deprecations) as records in the same format.
    logging.captureWarnings(True)
    # At DEBUG the openai client logs each request's options, messages included: never here.
    logging.getLogger("openai").setLevel(max(logging.INFO, root.level))


def gunicorn_logconfig() -> dict[str, Any]:
    """gunicorn's `logconfig_dict`: its error and access loggers through the same format."""
    format_name = log_format()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"job": {"()": JobFieldsFilter}},
        "formatters": {"conveyor": {"()": formatter, "chosen": format_name}},
        "handlers": {
            "conveyor": {
                "class": "logging.StreamHandler",
                "formatter": "conveyor",
                "filters": ["job"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": os.environ.get("CONVEYOR_LOG_LEVEL", "INFO"), "handlers": ["conveyor"]},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": [], "propagate": True},
            "gunicorn.access": {"level": "INFO", "handlers": [], "propagate": True},
        },
    }


def init_app(app: Flask) -> None:
    if not app.testing:
        configure()
    for each in logging.getLogger().handlers:
        if not any(isinstance(f, JobFieldsFilter) for f in each.filters):
            each.addFilter(JobFieldsFilter())
