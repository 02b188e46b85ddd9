"""CORS on the REST API: a frontend on an allowed origin (CONVEYOR_ALLOWED_ORIGINS, the same
setting Socket.IO uses) may call it from the browser; other origins get no CORS headers, and
credentials are never allowed. Checked against the real web process."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from app.config import Settings
from tests.conftest import Tenant
from tests.webserver import WebServer

FRONTEND = "https://app.example.com"


@pytest.fixture(scope="module")
def cors_server(settings: Settings, app) -> Iterator[WebServer]:
    server = WebServer(settings.model_copy(update={"allowed_origins": [FRONTEND]})).start()
    yield server
    server.stop()


def test_an_allowed_origin_gets_a_preflight_answer(cors_server: WebServer) -> None:
    preflight = httpx.options(
        f"{cors_server.url}/api/v1/jobs",
        headers={
            "Origin": FRONTEND,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == FRONTEND
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    allowed = preflight.headers["Access-Control-Allow-Headers"].lower()
    for header in ("authorization", "content-type", "idempotency-key"):
        assert header in allowed
    assert "Access-Control-Allow-Credentials" not in preflight.headers


def test_an_allowed_origin_reads_the_response_and_its_headers(
    cors_server: WebServer, tenant: Tenant
) -> None:
    response = httpx.post(
        f"{cors_server.url}/api/v1/jobs",
        json={"kind": "chat", "input": {"prompt": "from another origin"}},
        headers={**tenant.headers, "Origin": FRONTEND, "Idempotency-Key": "cors-1"},
    )
    assert response.status_code == 202
    assert response.headers["Access-Control-Allow-Origin"] == FRONTEND
    exposed = {
        h.strip().lower() for h in response.headers["Access-Control-Expose-Headers"].split(",")
    }
    assert {"location", "retry-after", "idempotent-replayed"} <= exposed
    assert "Access-Control-Allow-Credentials" not in response.headers
    # Errors are readable too, so the frontend can show which field is wrong.
    problem = httpx.post(
        f"{cors_server.url}/api/v1/jobs",
        json={"kind": "chat"},
        headers={**tenant.headers, "Origin": FRONTEND},
    )
    assert problem.status_code == 422
    assert problem.headers["Access-Control-Allow-Origin"] == FRONTEND


def test_another_origin_gets_no_cors_headers(cors_server: WebServer, tenant: Tenant) -> None:
    response = httpx.get(
        f"{cors_server.url}/api/v1/jobs",
        headers={**tenant.headers, "Origin": "https://evil.example.net"},
    )
    assert "Access-Control-Allow-Origin" not in response.headers


def test_without_allowed_origins_the_api_is_same_origin_only(web_server: WebServer) -> None:
    preflight = httpx.options(
        f"{web_server.url}/api/v1/jobs",
        headers={"Origin": FRONTEND, "Access-Control-Request-Method": "POST"},
    )
    assert "Access-Control-Allow-Origin" not in preflight.headers
