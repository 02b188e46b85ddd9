"""The Celery app, configured from settings. The web process uses it only to publish
(`send_task` by name, so it never imports the worker's task modules)."""

from __future__ import annotations

from celery import Celery, Task, bootsteps
from flask import Flask
from kombu import Exchange, Queue

from app.config import Settings

SWEEP_TASK = "conveyor.sweep"
# Collects, submits and polls provider batches (app/execution/provider_batches.py). On the jobs'
# queue: it is model traffic, and needs the model endpoint's workers.
PROVIDER_BATCH_TASK = "conveyor.provider_batches"
QUEUE = "conveyor"
# Webhook deliveries have a queue of their own, so that a slow receiver never holds a slot a
# job could use: run a worker with `-Q webhooks` for them and the job workers with
# `-Q conveyor` (the Procfile and docker-compose.yml do). A worker given no -Q consumes both.
WEBHOOK_QUEUE = "webhooks"
WEBHOOK_SEND_TASK = "conveyor.webhooks.send"
WEBHOOK_DISPATCH_TASK = "conveyor.webhooks.dispatch"
# Runs on the webhooks queue too: it is the deployment's worker for everything that is not a
# job, and a purge run that holds a job slot for minutes would take one from the jobs.
RETENTION_TASK = "conveyor.retention"
PRIORITY_STEPS = list(range(10))
QUEUE_SEP = ":"
AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp", "librabbitmq"})


def make_celery(app: Flask, settings: Settings) -> Celery:
    class AppContextTask(Task):
        # Tasks reach the database and settings through the Flask app; without its context
        # they would fail at the first `runtime()` call, not at import.
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery = Celery(app.import_name, task_cls=AppContextTask)
    celery.conf.update(celery_config(settings))
    celery.steps["consumer"].add(GreenPoolHeadroom)
    celery.set_default()
    return celery


def broker_queue_keys() -> list[str]:
    """The Redis lists that hold the broker's waiting messages: kombu keeps one per priority
    step ("conveyor", "conveyor:1" ... "conveyor:9"). Reserved (unacknowledged) messages are in
    none of them."""
    return [QUEUE, *(f"{QUEUE}{QUEUE_SEP}{step}" for step in PRIORITY_STEPS if step)]


class GreenPoolHeadroom(bootsteps.StartStopStep):
    """Lets a gevent worker reserve one message more than it has slots.

    With a green pool Celery runs its blocking consumer loop, which waits for the broker for up
    to 2 s at a time. When every slot is busy, kombu's Redis transport stops its BRPOP (no
    prefetch credit) and that wait is not woken when a job finishes and credit returns: the
    worker sat idle for up to 2 s after each wave, and one process ran only 40 % of its slots
    (docs/performance.md). With one message of headroom the consumer instead blocks on the
    pool itself, whose semaphore wakes it the moment a slot frees, so a slot is refilled within
    a round trip. The cost is one reserved message per worker process, which Redis redelivers
    if the process dies (the claim makes that harmless)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: object) -> None:
        if getattr(c.pool, "is_green", False):  # type: ignore[attr-defined]
            c.qos.increment_eventually(1)  # type: ignore[attr-defined]
            c.qos.update()  # type: ignore[attr-defined]


def is_amqp(broker_url: str) -> bool:
    """RabbitMQ (or another AMQP 0-9-1 broker) rather than Redis (docs/brokers.md)."""
    return broker_url.split(":", 1)[0] in AMQP_SCHEMES


def message_priority(broker_url: str, priority: int) -> int:
    """A job's priority (0-9, 9 the most urgent) as its message's: RabbitMQ delivers the
    highest first (queues declared with x-max-priority), kombu's Redis emulation its lowest
    step first."""
    return priority if is_amqp(broker_url) else PRIORITY_STEPS[-1] - priority


def transport_options(settings: Settings) -> dict[str, object]:
    if is_amqp(settings.celery_broker_url):
        # RabbitMQ redelivers a dead consumer's messages when its connection closes: no
        # visibility timeout. Its consumer_timeout must outlast a job (docs/brokers.md).
        return {}
    return {
        # Longer than any job may run, so Redis redelivers only what a dead worker held.
        # A redelivery of a live job is harmless anyway: the claim is a compare-and-set.
        "visibility_timeout": settings.broker_visibility_timeout
        or max(3600, int(settings.job_time_limit) * 2),
        "socket_timeout": 5,
        "socket_connect_timeout": 3,
        "priority_steps": PRIORITY_STEPS,
        "sep": QUEUE_SEP,
        "queue_order_strategy": "priority",
        # kombu's default of 10 makes acks fail with MaxConnectionsError at high slot counts.
        "max_connections": settings.worker_concurrency + 20,
    }


def celery_config(settings: Settings) -> dict[str, object]:
    return {
        "broker_url": settings.celery_broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 3,
        "broker_transport_options": transport_options(settings),
        "task_default_queue": QUEUE,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "worker_send_task_events": True,
        # Off: Celery holds a process-wide mutex across the Redis round trip of each "sent"
        # event, which serialised the API's threads (docs/performance.md); Flower still sees
        # every task from the worker's own events.
        "task_send_sent_event": False,
        "task_soft_time_limit": settings.job_soft_time_limit,
        "task_time_limit": settings.job_time_limit,
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        "worker_concurrency": settings.worker_concurrency,
        # A broker blip must not abort hundreds of model calls mid-stream; their acks may be
        # lost, and the redelivered messages are no-ops thanks to the claim.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_hijack_root_logger": False,
        "beat_schedule": {
            "sweep": {"task": SWEEP_TASK, "schedule": settings.sweeper_interval},
            "webhooks": webhook_dispatch_schedule(settings),
            "retention": retention_schedule(settings),
            "provider_batches": {
                "task": PROVIDER_BATCH_TASK,
                "schedule": settings.provider_batch_interval,
                # A run does everything due: runs missed while no worker consumed are not
                # worth doing later, one after another.
                "options": {"expires": max(10.0, settings.provider_batch_interval * 5)},
            },
        },
        "include": ["workers.tasks"],
        **webhook_routing(settings),
    }


def webhook_routing(settings: Settings) -> dict[str, object]:
    """Both queues, consumed by a worker given no -Q; webhook tasks routed to theirs."""
    attempt = settings.webhook_timeout + settings.webhook_connect_timeout
    # On RabbitMQ a queue has priorities only when declared with x-max-priority.
    priorities = {"max_priority": PRIORITY_STEPS[-1]} if is_amqp(settings.celery_broker_url) else {}
    return {
        "task_queues": [
            Queue(name, Exchange(name), routing_key=name, **priorities)
            for name in (QUEUE, WEBHOOK_QUEUE)
        ],
        "task_routes": {
            WEBHOOK_SEND_TASK: {"queue": WEBHOOK_QUEUE},
            WEBHOOK_DISPATCH_TASK: {"queue": WEBHOOK_QUEUE},
            RETENTION_TASK: {"queue": WEBHOOK_QUEUE},
        },
        # An attempt bounds itself (CONVEYOR_WEBHOOK_TIMEOUT); these only catch a stuck one.
        "task_annotations": {
            WEBHOOK_SEND_TASK: {"soft_time_limit": attempt + 30, "time_limit": attempt + 60}
        },
    }


def webhook_dispatch_schedule(settings: Settings) -> dict[str, object]:
    return {
        "task": WEBHOOK_DISPATCH_TASK,
        "schedule": settings.webhook_dispatch_interval,
        # Not piled up while no worker consumes the queue: the next scan does the same work.
        "options": {"expires": max(10.0, settings.webhook_dispatch_interval * 5)},
    }


def retention_schedule(settings: Settings) -> dict[str, object]:
    return {
        "task": RETENTION_TASK,
        "schedule": settings.retention_interval,
        # Runs missed while no worker consumed the queue are not all run later: the next run
        # does what they would have done.
        "options": {"expires": settings.retention_interval},
    }
