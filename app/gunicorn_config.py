"""gunicorn's settings file (`gunicorn -c python:app.gunicorn_config`, as the Procfile runs it):
gunicorn's own lines, the master's included, in Conveyor's log format (CONVEYOR_LOG_FORMAT)."""

from app.logs import gunicorn_logconfig

logconfig_dict = gunicorn_logconfig()
