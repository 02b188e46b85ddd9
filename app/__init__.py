"""Conveyor: durable AI generation jobs. `create_app()` wires every subsystem, one line each;
the Celery worker builds the same app (workers/celery_app.py)."""

from __future__ import annotations

from typing import Any

from flask import Flask

from app.config import Settings


def create_app(config: Settings | dict[str, Any] | None = None) -> Flask:
    from app import api, cli, logs, metrics, realtime, web
    from app.db import db
    from app.execution.leases import worker_heartbeat_step
    from app.jobs.artifacts import Artifacts
    from app.jobs.batches import Batches
    from app.jobs.events import EventBus
    from app.jobs.fairness import DispatchWindow
    from app.jobs.intake import JobIntake
    from app.jobs.transitions import Jobs
    from app.llm.client import ModelClient
    from app.queue import make_celery
    from app.runtime import Runtime, build_redis
    from app.storage import build_store

    settings = config if isinstance(config, Settings) else Settings(**(config or {}))
    app = Flask(__name__)
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_request_bytes,
        SECRET_KEY=settings.secret_key,
        TESTING=settings.testing,
        JSON_SORT_KEYS=False,
    )
    logs.init_app(app)
    metrics.configure(tenant_label=settings.metrics_tenant_label)
    db.init_app(app, settings)
    redis_client = build_redis(settings)
    bus = EventBus(settings, redis_client)
    celery = make_celery(app, settings)
    celery.steps["worker"].add(worker_heartbeat_step(app))
    intake = JobIntake(db, bus, celery, DispatchWindow(settings, redis_client))
    artifacts = Artifacts(settings, db, build_store(settings))
    Runtime(
        settings,
        db,
        redis_client,
        bus,
        celery,
        intake,
        Jobs(settings, db, redis_client, bus, celery, intake, artifacts),
        Batches(settings, db, bus, intake),
        ModelClient(settings, redis_client),
        artifacts,
    ).init_app(app)
    api.init_app(app, settings)
    realtime.init_app(app, settings, db)
    web.init_app(app)
    cli.init_app(app)
    return app
