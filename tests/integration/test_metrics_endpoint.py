"""GET /metrics with metrics off: the tests' settings set no CONVEYOR_METRICS_TOKEN, and
without one the endpoint is not served (tests/chaos/test_metrics.py scrapes it with one)."""

from __future__ import annotations

from flask import Flask


def test_metrics_are_off_without_a_token(app: Flask) -> None:
    assert app.extensions["conveyor"].settings.metrics_token is None
    answer = app.test_client().get("/metrics", headers={"Authorization": "Bearer anything"})
    assert answer.status_code == 404
    assert answer.content_type == "application/problem+json"
    assert "CONVEYOR_METRICS_TOKEN" in answer.get_json()["detail"]
