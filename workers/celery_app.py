"""Entry module for the Celery CLI: builds the same app as the web process and exports its
Celery app (`celery -A workers.celery_app worker`)."""

from app import create_app

flask_app = create_app()
celery = flask_app.extensions["conveyor"].celery
