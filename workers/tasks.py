"""Thin tasks: ids in, one call into the job domain, Celery's concerns only."""

from __future__ import annotations

import uuid

from celery import shared_task

from app.execution.provider_batches import ProviderBatches
from app.execution.runner import execute_job
from app.jobs import retention, transitions, webhooks
from app.queue import (
    PROVIDER_BATCH_TASK,
    RETENTION_TASK,
    SWEEP_TASK,
    WEBHOOK_DISPATCH_TASK,
    WEBHOOK_SEND_TASK,
)
from app.runtime import runtime


@shared_task(name=transitions.RUN_JOB_TASK, ignore_result=True)
def run_job(job_id: str) -> str:
    return execute_job(uuid.UUID(job_id), runtime().jobs, runtime().model_client).value


@shared_task(name=SWEEP_TASK, ignore_result=True, soft_time_limit=60, time_limit=90)
def sweep() -> dict[str, int]:
    return vars(runtime().jobs.sweep())


# The limits only catch a stuck run: a run's provider calls are short, each with its timeout.
@shared_task(name=PROVIDER_BATCH_TASK, ignore_result=True, soft_time_limit=600, time_limit=660)
def run_provider_batches() -> dict[str, int]:
    return vars(ProviderBatches(runtime().jobs, runtime().model_client).run())


@shared_task(name=WEBHOOK_DISPATCH_TASK, ignore_result=True, soft_time_limit=30, time_limit=60)
def dispatch_webhooks() -> int:
    settings = runtime().settings
    return webhooks.dispatch_due(runtime().db, runtime().celery, webhooks.Policy.of(settings))


@shared_task(name=WEBHOOK_SEND_TASK, ignore_result=True)
def send_webhook(delivery_id: str, attempt: int) -> str:
    policy = webhooks.Policy.of(runtime().settings)
    return webhooks.deliver(runtime().db, policy, uuid.UUID(delivery_id), attempt)


# A run stops by itself after CONVEYOR_RETENTION_MAX_JOBS; the limits only catch a stuck one.
@shared_task(name=RETENTION_TASK, ignore_result=True, soft_time_limit=3600, time_limit=3660)
def purge_expired_jobs() -> dict[str, object]:
    policy = retention.Policy.of(runtime().settings)
    report = retention.purge(runtime().db, runtime().bus, runtime().artifacts, policy)
    return vars(report)
