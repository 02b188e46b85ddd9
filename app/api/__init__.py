"""The HTTP API under /api/v1, and its generated OpenAPI document and reference page."""

from __future__ import annotations

from flask import Flask
from flask_cors import CORS

from app.api import (
    admin,
    artifacts,
    batches,
    budgets,
    canvases,
    cards,
    downloads,
    exports,
    health,
    jobs,
    keys,
    metrics,
    openapi,
    problems,
    ratelimits,
    realtime,
    system,
    webhooks,
)
from app.config import Settings

PREFIX = jobs.PREFIX
# Registered in this order, which is also the order of the OpenAPI document's paths.
BLUEPRINTS = (
    jobs.bp,
    batches.bp,
    canvases.bp,
    exports.bp,
    downloads.bp,
    artifacts.bp,
    cards.bp,
    system.bp,
    realtime.bp,
    keys.bp,
    admin.bp,
    budgets.bp,
    webhooks.bp,
    openapi.bp,
)

# What a browser app on an allowed origin may send and read. Credentials (cookies) are never
# allowed: the API authenticates with a bearer key the app sends itself.
CORS_REQUEST_HEADERS = ["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"]
CORS_EXPOSED_HEADERS = [
    "Location",
    "Retry-After",
    "Idempotent-Replayed",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
    "RateLimit-Policy",
]
CORS_MAX_AGE = 600


def init_app(app: Flask, settings: Settings) -> None:
    problems.init_app(app)
    health.init_app(app)
    metrics.init_app(app)
    ratelimits.init_app(app, settings)
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint, url_prefix=PREFIX)
    if settings.allowed_origins:
        # The same origins Socket.IO accepts; none configured means same-origin only.
        CORS(
            app,
            resources={f"{PREFIX}/*": {"origins": settings.allowed_origins}},
            allow_headers=CORS_REQUEST_HEADERS,
            expose_headers=CORS_EXPOSED_HEADERS,
            supports_credentials=False,
            max_age=CORS_MAX_AGE,
        )
