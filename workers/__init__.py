"""The Celery runtime: `celery -A workers.celery_app worker` / `beat`."""
