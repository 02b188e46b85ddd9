"""Thin tasks: ids in, one call into the job domain, Celery's concerns only."""

from __future__ import annotations

import uuid

from celery import shared_task

from app.execution.runner import execute_job
from app.jobs import transitions
from app.queue import SWEEP_TASK
from app.runtime import runtime


@shared_task(name=transitions.RUN_JOB_TASK, ignore_result=True)
def run_job(job_id: str) -> str:
    return execute_job(uuid.UUID(job_id), runtime().jobs, runtime().model_client).value


@shared_task(name=SWEEP_TASK, ignore_result=True, soft_time_limit=60, time_limit=90)
def sweep() -> dict[str, int]:
    return vars(runtime().jobs.sweep())
