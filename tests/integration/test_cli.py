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

from app.cards import card_from_value, read_png_card
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


def test_a_card_submitted_with_flags_is_followed_through_its_steps_and_downloaded(
    api_url: str, tenant: Tenant, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    concept = f"A lighthouse keeper who collects storms [[sim tag=cli{uuid.uuid4().hex[:8]}]]"
    result = run(
        api_url, tenant, "submit", "character_card", "--concept", concept,
        "--name", "Mira Holloway", "--genre", "gothic", "--point-of-view", "second",
        "--lorebook-entries", "2", "--alternate-greetings", "1", "--content-rating", "sfw",
        "--tag", "sea", "--tag", "mystery", "--creator", "conveyor-cli", "--set", "tone=wistful",
        "--follow",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert " succeeded in " in lines[-1]
    for step, role in [
        ("profile", "creative"),
        ("greetings", "creative"),
        ("lorebook", "analysis"),
        ("review", "analysis"),
    ]:
        [line] = [line for line in lines if re.match(rf"\s*✓ {step}\s+{role}\s+finished", line)]
        assert re.search(r"\d+ tokens · \$\d", line), line
    job_id = tenant.get("/api/v1/jobs").get_json()["items"][0]["id"]
    job = tenant.get(f"/api/v1/jobs/{job_id}").get_json()
    assert job["input"]["tone"] == "wistful" and job["input"]["tags"] == ["sea", "mystery"]
    assert job["input"]["point_of_view"] == "second" and job["input"]["lorebook_entries"] == 2
    output = tenant.get(f"/api/v1/jobs/{job_id}/result").get_json()["output"]

    target = tmp_path / "mira.png"
    result = run(api_url, tenant, "download", job_id, "--format", "png", "-o", str(target))
    assert result.exit_code == 0, result.output
    card = read_png_card(target.read_bytes())
    assert card == card_from_value(output) and card.data.creator == "conveyor-cli"
    assert not list(tmp_path.glob("*.part"))

    monkeypatch.chdir(tmp_path)  # without -o: the server's file name, here
    result = run(api_url, tenant, "download", job_id, "--format", "card_v2")
    assert result.exit_code == 0, result.output
    named = tmp_path / "Mira Holloway.card.json"
    assert card_from_value(json.loads(named.read_text(encoding="utf-8"))) == card


def test_card_flags_out_of_bounds_show_the_field_and_the_flag(api_url: str, tenant: Tenant) -> None:
    result = run(
        api_url, tenant, "submit", "character_card", "--concept", "a baker",
        "--lorebook-entries", "51",
    )  # fmt: skip
    assert result.exit_code == 1
    assert "(HTTP 422)" in result.output
    assert "input.lorebook_entries (--lorebook-entries): " in result.output


def test_download_of_an_unfinished_job_is_a_409_and_writes_nothing(
    api_url: str, tenant: Tenant, tmp_path: Path
) -> None:
    job_id = tenant.submit("chat", {"prompt": "slow [[sim ttft=30]]"})["id"]
    target = tmp_path / "out.json"
    result = run(api_url, tenant, "download", job_id, "-o", str(target))
    assert result.exit_code == 1 and "(HTTP 409)" in result.output, result.output
    assert not list(tmp_path.iterdir())
    result = run(api_url, tenant, "download", job_id, "--format", "png", "-o", str(target))
    assert result.exit_code == 1 and "(HTTP 404)" in result.output, result.output
    tenant.post(f"/api/v1/jobs/{job_id}/cancel")


def test_a_batch_from_a_jsonl_file_is_followed_and_its_results_downloaded(
    api_url: str, tenant: Tenant, tmp_path: Path
) -> None:
    items = tmp_path / "items.jsonl"
    prompts = ["first", "second", "third"]
    lines = [json.dumps({"kind": "chat", "input": {"prompt": p}}) for p in prompts]
    items.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run(api_url, tenant, "batch", "submit", str(items), "--follow", "--interval", "0.2")
    assert result.exit_code == 0, result.output
    assert "3/3 finished · 100.0%" in result.output and "succeeded 3" in result.output
    batch_id = re.search(r"batch ([0-9a-f-]{36}) \(done\)", result.output).group(1)  # type: ignore[union-attr]

    shown = run(api_url, tenant, "batch", "show", batch_id)
    assert shown.exit_code == 0 and "succeeded 3" in shown.output

    target = tmp_path / "results.jsonl"
    result = run(api_url, tenant, "batch", "results", batch_id, "-o", str(target))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert [row["item"] for row in rows] == [0, 1, 2]
    assert all(row["status"] == "succeeded" and row["output"]["text"] for row in rows)


def test_a_batch_is_canceled_and_a_bad_line_is_named(
    api_url: str, tenant: Tenant, tmp_path: Path
) -> None:
    items = tmp_path / "slow.jsonl"
    slow = json.dumps({"kind": "chat", "input": {"prompt": "slow [[sim ttft=30]]"}})
    items.write_text(f"{slow}\n{slow}\n", encoding="utf-8")
    submitted = run(api_url, tenant, "batch", "submit", str(items))
    assert submitted.exit_code == 0, submitted.output
    batch_id = submitted.stdout.strip()
    canceled = run(api_url, tenant, "batch", "cancel", batch_id)
    assert canceled.exit_code == 0 and "cancel requested" in canceled.output
    for job in tenant.get("/api/v1/jobs?limit=2").get_json()["items"]:
        assert tenant.wait_for(job["id"])["status"] == "canceled"

    items.write_text(f'{slow}\n{{"kind": "chat", "input": {{"prompt": 5}}}}\n', encoding="utf-8")
    bad = run(api_url, tenant, "batch", "submit", str(items))
    assert bad.exit_code == 1 and "lines[2].input.prompt" in bad.output, bad.output
