"""Entry module for the Celery CLI: builds the same app as the web process and exports its
Celery app (`celery -A workers.celery_app worker`)."""

import logging
from typing import Any

from celery import signals

from app import create_app, logs, metrics

flask_app = create_app()
celery = flask_app.extensions["conveyor"].celery


@signals.setup_logging.connect
def use_conveyor_logging(loglevel: str | int | None = None, **_: Any) -> None:
    """Celery's own lines through Conveyor's handler and format (CONVEYOR_LOG_FORMAT): with a
    receiver of this signal Celery adds no handler of its own, and `--loglevel` still counts."""
    logs.configure(loglevel)


@signals.celeryd_after_setup.connect
def banner_as_a_record(sender: str, instance: Any, **_: Any) -> None:
    """With JSON logs, the startup banner (printed, not logged) becomes one record: a log
    collector reading the process's output then sees JSON only."""
    if logs.log_format() != "json":
        return
    instance.quiet = True
    queues = sorted(instance.app.amqp.queues.consume_from or ())
    logging.getLogger("celery.apps.worker").info(
        "worker %s starting",
        sender,
        extra={"node": sender, "concurrency": instance.concurrency, "queues": queues},
    )


@signals.worker_init.connect
def serve_metrics(sender: Any, **_: Any) -> None:
    """This worker host's /metrics on `CONVEYOR_WORKER_METRICS_PORT` (0: none), served by the
    main process: a gevent or threads pool is that one process; prefork children are read
    through PROMETHEUS_MULTIPROC_DIR when the operator sets it (docs/metrics.md)."""
    settings = flask_app.extensions["conveyor"].settings
    if settings.worker_metrics_port:
        metrics.serve_worker_metrics(
            settings.worker_metrics_host, settings.worker_metrics_port, settings.metrics_token
        )


@signals.worker_process_shutdown.connect
def forget_pool_process(pid: int, **_: Any) -> None:
    """A prefork child that exits stops counting in the live gauges."""
    metrics.process_exited(pid)
