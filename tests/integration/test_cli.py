"""The `conveyor` command-line client against the API served over real HTTP."""

from __future__ import annotations

import contextlib
import csv
import json
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from click.testing import CliRunner
from werkzeug.serving import make_server

from app.cli.client import main
from tests.conftest import Tenant
from tests.integration.test_exports import AWKWARD, crafted_job

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


class AnswerLosingProxy:
    """A TCP proxy in front of the API that loses the answer to the first request: it forwards
    the request whole, waits until the API starts answering (so the job is committed), then
    closes the client's connection without a byte (`dropped`) or answers 504 itself, as a
    gateway that gave up waiting would. Later connections are relayed as they are."""

    def __init__(self, upstream_url: str, failure: str) -> None:
        upstream = urlsplit(upstream_url)
        self.upstream = (upstream.hostname, upstream.port)
        self.failure = failure
        self.sent: list[bytes] = []  # everything clients sent, in order
        self.lost_one = False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self.accept, daemon=True).start()

    def __enter__(self) -> AnswerLosingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.close()

    def idempotency_keys(self) -> list[str]:
        sent = b"".join(self.sent).decode()
        return re.findall(r"(?im)^idempotency-key: *(\S+)", sent)

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self.handle, args=(client,), daemon=True).start()

    def handle(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream)
        if self.lost_one:
            threading.Thread(target=self.pipe, args=(client, upstream, True), daemon=True).start()
            self.pipe(upstream, client, False)
            return
        self.lost_one = True
        request = read_request(client)
        self.sent.append(request)
        upstream.sendall(request)
        upstream.recv(1)  # the API has answered: whatever it did is committed
        if self.failure == "504":
            client.sendall(b"HTTP/1.1 504 Gateway Timeout\r\nContent-Length: 0\r\n\r\n")
        upstream.close()
        client.close()

    def pipe(self, source: socket.socket, target: socket.socket, record: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if record:
                    self.sent.append(chunk)
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):  # the other direction got there first
                    sock.shutdown(socket.SHUT_RDWR)


def read_request(client: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += client.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += client.recv(65536)
    return head + b"\r\n\r\n" + body


@pytest.mark.parametrize(("failure", "given_key"), [("dropped", None), ("504", "nightly-report-7")])
def test_submit_whose_answer_is_lost_retries_with_its_key_and_creates_one_job(
    api_url: str, tenant: Tenant, failure: str, given_key: str | None
) -> None:
    submit = ["submit", "chat", "--prompt", "only once"]
    submit += ["--idempotency-key", given_key] if given_key else []
    with AnswerLosingProxy(api_url, failure) as proxy:
        result = CliRunner().invoke(main, ["--url", proxy.url, "--key", tenant.key, *submit])
    assert result.exit_code == 0, result.output
    listed = [job["id"] for job in tenant.get("/api/v1/jobs").get_json()["items"]]
    assert listed == [result.stdout.strip()]
    keys = proxy.idempotency_keys()
    assert len(keys) == 2 and keys[0] == keys[1], keys
    assert keys[0] == (given_key or keys[0])
    assert "created by an earlier attempt" in result.stderr


def test_export_writes_a_job_and_the_job_list_to_files(
    api_url: str, tenant: Tenant, tmp_path: Path
) -> None:
    job_id = crafted_job(tenant.owner)
    target = tmp_path / "job.yaml"
    result = run(api_url, tenant, "export", str(job_id), "--format", "yaml", "-o", str(target))
    assert result.exit_code == 0, result.output
    document = yaml.safe_load(target.read_text(encoding="utf-8"))
    assert document["job"]["id"] == str(job_id) and document["input"]["prompt"] == AWKWARD
    assert not list(tmp_path.glob("*.part"))

    listed = tmp_path / "jobs.csv"
    result = run(
        api_url, tenant, "jobs", "export", "--format", "csv", "--status", "succeeded",
        "--include", "output", "-o", str(listed),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with listed.open(newline="", encoding="utf-8") as file:
        [row] = list(csv.DictReader(file))
    assert row["id"] == str(job_id) and json.loads(row["output"])["text"] == AWKWARD

    stdout = run(api_url, tenant, "jobs", "export", "--status", "canceled")
    assert stdout.exit_code == 0 and stdout.output == ""


def test_export_of_an_unknown_job_fails_with_the_problem(
    api_url: str, tenant: Tenant, tmp_path: Path
) -> None:
    target = tmp_path / "job.json"
    result = run(api_url, tenant, "export", str(uuid.uuid4()), "-o", str(target))
    assert result.exit_code == 1 and "Not found (HTTP 404)" in result.output
    assert not target.exists() and not list(tmp_path.iterdir())
    result = run(api_url, tenant, "jobs", "export", "--created-after", "someday")
    assert result.exit_code == 1 and "created_after" in result.output
