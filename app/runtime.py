"""The per-application runtime: settings and the clients every subsystem shares.

Built once by `create_app()` (in the web process and in every worker process alike) and reached
through `runtime()` inside an app context, so no module reads configuration at import time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis
from flask import Flask, current_app

if TYPE_CHECKING:
    # Types only: the runtime sits below the layers whose clients it holds (the import contract
    # in pyproject.toml), and create_app() builds them.
    from celery import Celery

    from app.config import Settings
    from app.db import Database
    from app.jobs.artifacts import Artifacts
    from app.jobs.batches import Batches
    from app.jobs.events import EventBus
    from app.jobs.intake import JobIntake
    from app.jobs.transitions import Jobs
    from app.llm.client import ModelClient

EXTENSION_KEY = "conveyor"


@dataclass
class Runtime:
    settings: Settings
    db: Database
    redis: redis.Redis
    bus: EventBus
    celery: Celery
    intake: JobIntake
    # Every transition that needs the clients above (app/jobs/transitions.py).
    jobs: Jobs
    # Creating and canceling batches of jobs (app/jobs/batches.py).
    batches: Batches
    # Lazy: no network until the first call; one connection pool shared by every slot.
    model_client: ModelClient
    # Binary outputs: rows in PostgreSQL, bytes in the configured store (app/jobs/artifacts.py).
    artifacts: Artifacts

    def init_app(self, app: Flask) -> None:
        app.extensions[EXTENSION_KEY] = self


def build_redis(settings: Settings) -> redis.Redis:
    """Short socket timeouts: the API must answer (or 503) quickly when Redis stalls.

    A blocking pool sized for every slot of a worker: redis-py's default pool caps at 100
    connections and raises instead of waiting, which a worker with 200 slots hits."""
    pool = redis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.worker_concurrency + 50,
        timeout=5,
        socket_timeout=2.0,
        socket_connect_timeout=2.0,
        health_check_interval=30,
    )
    return redis.Redis(connection_pool=pool)


def runtime() -> Runtime:
    """This app's runtime, for the edges: views, Socket.IO handlers, Celery tasks and CLI
    commands. Code below them is given what it uses."""
    return runtime_of(current_app)


def runtime_of(app: Flask) -> Runtime:
    return app.extensions[EXTENSION_KEY]
