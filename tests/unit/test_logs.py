"""The log formats: a job's fields on every record logged inside its attempt, as text or JSON."""

from __future__ import annotations

import json
import logging

import pytest

from app import logs


def render(chosen: str, record: logging.LogRecord) -> str:
    logs.JobFieldsFilter().filter(record)
    return logs.formatter(chosen).format(record)


def make_record(message: str = "streamed %d tokens", **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("app.kinds.chat", logging.INFO, __file__, 1, message, (3,), None)
    for name, value in extra.items():
        setattr(record, name, value)
    return record


def test_records_inside_an_attempt_carry_the_job_in_both_formats() -> None:
    with logs.job_context("j-1", 2, "chat", "acme"):
        text = render("text", make_record())
        data = json.loads(render("json", make_record()))
    assert text.endswith(
        " INFO app.kinds.chat job_id=j-1 attempt=2 kind=chat tenant=acme streamed 3 tokens"
    )
    assert data["message"] == "streamed 3 tokens"
    assert (data["job_id"], data["attempt"], data["kind"], data["tenant"]) == (
        "j-1",
        2,
        "chat",
        "acme",
    )
    assert (data["level"], data["logger"]) == ("INFO", "app.kinds.chat")
    assert "job" not in data  # the text format's rendering is not a JSON field


def test_outside_an_attempt_only_what_the_record_names() -> None:
    assert render("text", make_record()).endswith(" INFO app.kinds.chat streamed 3 tokens")
    data = json.loads(render("json", make_record(job_id="j-9")))
    assert data["job_id"] == "j-9" and "attempt" not in data


def test_the_format_is_checked() -> None:
    assert logs.log_format("JSON") == "json"
    with pytest.raises(ValueError, match="CONVEYOR_LOG_FORMAT must be one of text, json"):
        logs.log_format("xml")
