"""The `conveyor` command-line client against the API served over real HTTP."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest
from click.testing import CliRunner
from werkzeug.serving import make_server

from app.cli.client import main
from tests.conftest import Tenant

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture(scope="module")
def api_url(app) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def run(api_url: str, tenant: Tenant, *args: str):
    return CliRunner().invoke(main, ["--url", api_url, "--key", tenant.key, *args])


def test_submit_follow_streams_the_text_and_ends_with_a_summary(
    api_url: str, tenant: Tenant
) -> None:
    result = run(api_url, tenant, "submit", "chat", "--prompt", "Say hello", "--follow")
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("job ") and " succeeded in " in last
    assert "tokens · $" in last
    listed = tenant.get("/api/v1/jobs").get_json()["items"]
    text = tenant.get(f"/api/v1/jobs/{listed[0]['id']}/result").get_json()["output"]["text"]
    assert text.split()[0] in result.output


def test_submit_follow_exits_nonzero_when_the_job_fails(api_url: str, tenant: Tenant) -> None:
    result = run(api_url, tenant, "submit", "chat", "--prompt", "[[sim fault=400]]", "--follow")
    assert result.exit_code == 1
    assert "failed" in result.output and "model_bad_request" in result.output


def test_jobs_list_show_cancel(api_url: str, tenant: Tenant) -> None:
    submitted = run(api_url, tenant, "submit", "chat", "--prompt", "slow [[sim tokens=500 tps=20]]")
    job_id = submitted.output.strip()
    tenant.wait_for(job_id, "running")
    assert job_id[:8] in run(api_url, tenant, "jobs", "list").output
    shown = json.loads(run(api_url, tenant, "jobs", "show", job_id).output)
    assert shown["id"] == job_id and shown["kind"] == "chat"
    canceled = run(api_url, tenant, "jobs", "cancel", job_id)
    assert "cancel requested" in canceled.output
    assert tenant.wait_for(job_id)["status"] == "canceled"


def test_bad_input_shows_the_problem(api_url: str, tenant: Tenant) -> None:
    result = run(api_url, tenant, "submit", "chat", "--input", '{"prompt": 5}')
    assert result.exit_code != 0
    assert "input.prompt" in result.output


def test_unreachable_api_is_a_clear_error(tenant: Tenant) -> None:
    result = CliRunner().invoke(main, ["--url", "http://127.0.0.1:9", "--key", "k", "jobs", "list"])
    assert result.exit_code != 0 and "cannot reach the API" in result.output
