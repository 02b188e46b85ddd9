"""Retention's rules that need no store: which retention applies, and the beat schedule."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app import config
from app.jobs.retention import Policy, retention_days
from app.queue import RETENTION_TASK, WEBHOOK_QUEUE, celery_config


@pytest.mark.parametrize(
    ("tenant", "default", "expected"),
    [
        (None, None, None),  # nobody set one: forever
        (None, 30, 30),  # the deployment's default
        (7, 30, 7),  # the tenant's own wins, shorter
        (90, 30, 90),  # or longer
        (0, 30, None),  # the tenant's 0 is forever, whatever the default
        (None, 0, None),  # so is the deployment's
        (7, None, 7),
    ],
)
def test_which_retention_applies(
    tenant: int | None, default: int | None, expected: int | None
) -> None:
    assert retention_days(tenant, default) == expected


def test_the_beat_schedules_the_purge_off_the_job_queue() -> None:
    celery = celery_config(config.testing_settings(retention_interval=600))
    entry = celery["beat_schedule"]["retention"]  # type: ignore[index]
    assert entry["task"] == RETENTION_TASK
    assert entry["schedule"] == 600
    assert entry["options"]["expires"] == 600
    assert celery["task_routes"][RETENTION_TASK] == {"queue": WEBHOOK_QUEUE}  # type: ignore[index]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("retention_days", -1),
        ("retention_days", 36_501),
        ("retention_batch_size", 0),
        ("retention_batch_size", 10_001),
        ("retention_pause", -0.1),
        ("retention_max_jobs", 0),
        ("retention_interval", 0),
        ("retention_max_busy", 0),
        ("retention_max_busy", 1.01),
    ],
)
def test_a_retention_setting_out_of_range_is_refused(name: str, value: object) -> None:
    with pytest.raises(ValidationError, match=name):
        config.testing_settings(**{name: value})


def test_the_settings_limits_are_accepted() -> None:
    settings = config.testing_settings(retention_days=36_500, retention_batch_size=10_000)
    assert settings.retention_days == 36_500
    assert config.testing_settings().retention_days is None


def test_a_run_waits_in_proportion_to_its_batches() -> None:
    half = Policy(None, 500, pause=0.05, max_jobs=1000, max_busy=0.5)
    assert half.pause_after(0.2) == pytest.approx(0.2)
    assert half.pause_after(0.01) == 0.05  # never less than the pause
    quarter = Policy(None, 500, pause=0.0, max_jobs=1000, max_busy=0.25)
    assert quarter.pause_after(0.2) == pytest.approx(0.6)
    assert Policy(None, 500, pause=0.0, max_jobs=1000, max_busy=1.0).pause_after(0.2) == 0
