"""`conveyor`: the command-line client of the HTTP API.

    conveyor submit chat --prompt "Write a haiku" --follow
    conveyor submit structured --prompt "A cat" --schema schema.json --follow
    conveyor jobs list [--status running] [--kind chat]
    conveyor jobs show JOB_ID
    conveyor jobs cancel JOB_ID
    conveyor export JOB_ID --format yaml -o job.yaml
    conveyor jobs export --format csv --status failed -o failed.csv

The API address and key come from --url/--key or CONVEYOR_URL/CONVEYOR_API_KEY.

`submit` always sends an Idempotency-Key (a random one unless --idempotency-key is given) and
retries with that same key when the answer is lost (a dropped connection, a 502/503/504), so a
retry never creates a second job.
"""

from __future__ import annotations

import json
import random
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import click
import httpx
from httpx_sse import connect_sse
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from app.jobs.states import TERMINAL, TERMINAL_STATUSES, EventType, JobStatus

SUBMIT_ATTEMPTS = 5
# A gateway's answers when it lost the API behind it: the request may or may not have arrived.
GATEWAY_ERRORS = {502, 503, 504}
# The request went out but no answer came back (UnsupportedProtocol and the like are the
# caller's mistake, not the network's: they are not retried).
LOST_ANSWER = (httpx.NetworkError, httpx.TimeoutException, httpx.RemoteProtocolError)
console = Console()


class Api:
    def __init__(self, url: str, key: str | None, timeout: float = 40) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(
            base_url=url.rstrip("/") + "/api/v1", headers=headers, timeout=timeout
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise click.ClickException(f"cannot reach the API: {exc}") from None
        return _answer(response)

    def create_job(self, body: dict[str, Any], idempotency_key: str) -> tuple[dict[str, Any], bool]:
        """POSTs the job; returns it, and whether an earlier attempt of this call had created it.

        A POST whose answer is lost (a dropped connection, a web process killed mid-request, a
        gateway that gave up) may still have created the job. Every attempt carries the same
        Idempotency-Key, so a retry gets that job back (200, Idempotent-Replayed) instead of
        creating a second one."""
        headers = {"Idempotency-Key": idempotency_key}
        attempt = 0
        while True:
            attempt += 1
            retry_after = None
            try:
                response = self.http.post("/jobs", json=body, headers=headers)
            except LOST_ANSWER as exc:
                failure = f"{type(exc).__name__}: {exc}"
            except httpx.HTTPError as exc:
                raise click.ClickException(f"cannot reach the API: {exc}") from None
            else:
                if response.status_code not in GATEWAY_ERRORS:
                    replayed = response.headers.get("Idempotent-Replayed") == "true"
                    return _answer(response), replayed and attempt > 1
                failure = f"HTTP {response.status_code}"
                retry_after = _seconds(response.headers.get("Retry-After"))
            if attempt == SUBMIT_ATTEMPTS:
                raise click.ClickException(
                    f"cannot reach the API after {attempt} attempts ({failure}); resubmit with "
                    f"--idempotency-key {idempotency_key} to get the job if one was created"
                )
            delay = min(8.0, 0.5 * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
            delay = min(retry_after, 10.0) if retry_after is not None else delay
            click.echo(f"{failure}; retrying in {delay:.1f} s with the same key", err=True)
            time.sleep(delay)

    def download(self, path: str, params: dict[str, Any], output: str) -> None:
        """Writes the response's body to `output` ("-": standard output) as it arrives. A file
        is written beside its name and renamed once whole, so an interrupted download never
        leaves a file that looks complete."""
        partial = Path(f"{output}.part") if output != "-" else None
        try:
            with self.http.stream("GET", path, params=params) as response:
                if response.status_code >= 400:
                    response.read()
                    raise click.ClickException(_problem_text(response))
                with click.open_file(str(partial or output), "wb") as sink:
                    for chunk in response.iter_bytes():
                        sink.write(chunk)
        except httpx.HTTPError as exc:
            if partial is not None:
                partial.unlink(missing_ok=True)
            raise click.ClickException(f"the download failed: {exc}") from None
        if partial is not None:
            partial.replace(output)

    def follow_events(self, job_id: str) -> Iterator[dict[str, Any]]:
        """The job's events as Server-Sent Events until its terminal one, each once and in
        order: a dropped connection is resumed with Last-Event-ID after a short backoff."""
        last_seq, failures = 0, 0
        while True:
            headers = {"Last-Event-ID": str(last_seq)}
            try:
                with connect_sse(
                    self.http, "GET", f"/jobs/{job_id}/events", headers=headers, timeout=None
                ) as source:
                    if source.response.status_code >= 400:
                        source.response.read()
                        raise click.ClickException(_problem_text(source.response))
                    for message in source.iter_sse():
                        if not message.data:  # the server's `retry:` advice
                            continue
                        event = json.loads(message.data)
                        if event["seq"] <= last_seq:
                            continue
                        last_seq, failures = event["seq"], 0
                        yield event
                        if event["type"] in TERMINAL_STATUSES:
                            return
            except httpx.HTTPError as exc:
                failures += 1
                if failures > 5:
                    raise click.ClickException(f"lost the event stream: {exc}") from None
            # The server closed a stream that had not ended, or the connection dropped.
            time.sleep(min(5.0, 0.25 * 2**failures))


def _answer(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise click.ClickException(_problem_text(response))
    return response.json() if response.content else None


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _problem_text(response: httpx.Response) -> str:
    try:
        problem = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    lines = [f"{problem.get('title', 'Error')} (HTTP {response.status_code})"]
    if problem.get("detail"):
        lines.append(problem["detail"])
    lines += [f"  {e['field']}: {e['message']}" for e in problem.get("errors") or []]
    return "\n".join(lines)


@click.group()
@click.option("--url", envvar="CONVEYOR_URL", default="http://127.0.0.1:8000", show_default=True)
@click.option("--key", envvar="CONVEYOR_API_KEY", help="API key (or CONVEYOR_API_KEY).")
@click.pass_context
def main(ctx: click.Context, url: str, key: str | None) -> None:
    """Submit and follow Conveyor jobs."""
    ctx.obj = Api(url, key)


@main.command()
@click.argument("kind")
@click.option("--prompt", help="The prompt (chat and structured kinds).")
@click.option(
    "--schema",
    "schema_file",
    type=click.Path(exists=True, dir_okay=False),
    help="JSON Schema file (structured kind).",
)
@click.option("--input", "input_json", help="The whole input as JSON, or @file.json.")
@click.option("--priority", type=click.IntRange(0, 9), default=0)
@click.option(
    "--idempotency-key",
    help="Resubmitting with the same key returns the same job (default: a fresh random key).",
)
@click.option("--follow/--no-follow", default=False, help="Stream the job until it finishes.")
@click.pass_obj
def submit(
    api: Api,
    kind: str,
    prompt: str | None,
    schema_file: str | None,
    input_json: str | None,
    priority: int,
    idempotency_key: str | None,
    follow: bool,
) -> None:
    """Submit a job of KIND."""
    job_input: dict[str, Any] = _load_json(input_json) if input_json else {}
    if prompt is not None:
        job_input["prompt"] = prompt
    if schema_file is not None:
        job_input["schema"] = _load_json("@" + schema_file)
    body = {"kind": kind, "input": job_input, "priority": priority}
    job, created_earlier = api.create_job(body, idempotency_key or str(uuid.uuid4()))
    if created_earlier:
        click.echo(f"job {job['id']}: created by an earlier attempt, not twice", err=True)
    if not follow:
        click.echo(job["id"])
        return
    console.print(f"[dim]job {job['id']} queued[/dim]")
    final = follow_job(api, job["id"])
    sys.exit(0 if final["status"] == JobStatus.SUCCEEDED else 1)


@main.group()
def jobs() -> None:
    """List, show and cancel jobs."""


@jobs.command("list")
@click.option("--status")
@click.option("--kind")
@click.option("--limit", type=click.IntRange(1, 100), default=20)
@click.pass_obj
def list_jobs(api: Api, status: str | None, kind: str | None, limit: int) -> None:
    params = {k: v for k, v in {"status": status, "kind": kind, "limit": limit}.items() if v}
    page = api.request("GET", "/jobs", params=params)
    table = Table("id", "kind", "status", "progress", "tokens", "cost", "created")
    for job in page["items"]:
        usage = job["usage"]
        table.add_row(
            job["id"],
            job["kind"],
            job["status"],
            f"{job['progress']:.0f}%",
            str(usage["tokens_in"] + usage["tokens_out"]),
            f"${usage['cost_usd']}",
            job["created_at"][:19],
        )
    console.print(table)
    if page["next_cursor"]:
        console.print(f"[dim]more: --cursor {page['next_cursor']}[/dim]")


@jobs.command("show")
@click.argument("job_id")
@click.pass_obj
def show(api: Api, job_id: str) -> None:
    job = api.request("GET", f"/jobs/{job_id}")
    if job["status"] in TERMINAL:
        job["result"] = api.request("GET", f"/jobs/{job_id}/result")["output"]
    click.echo(json.dumps(job, indent=2))


@jobs.command("cancel")
@click.argument("job_id")
@click.pass_obj
def cancel(api: Api, job_id: str) -> None:
    job = api.request("POST", f"/jobs/{job_id}/cancel")
    state = "cancel requested" if job["status"] == JobStatus.RUNNING else job["status"]
    click.echo(f"job {job_id}: {state}")


OUTPUT_OPTION = click.option(
    "-o",
    "--output",
    default="-",
    show_default=True,
    type=click.Path(dir_okay=False, allow_dash=True),
    help="File to write; - is standard output.",
)


@main.command("export")
@click.argument("job_id")
@click.option("--format", "fmt", type=click.Choice(["json", "yaml", "csv"]), default="json")
@OUTPUT_OPTION
@click.pass_obj
def export_job(api: Api, job_id: str, fmt: str, output: str) -> None:
    """Download a job's whole record: the job, its input and output, its timeline and its
    model calls."""
    api.download(f"/jobs/{job_id}/export", {"format": fmt}, output)


@jobs.command("export")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl")
@click.option("--status")
@click.option("--kind")
@click.option("--created-after", help="ISO 8601; no offset means UTC.")
@click.option("--created-before", help="ISO 8601; no offset means UTC.")
@click.option(
    "--include",
    multiple=True,
    type=click.Choice(["input", "output"]),
    help="Add a large field to every job (repeatable).",
)
@OUTPUT_OPTION
@click.pass_obj
def export_jobs(
    api: Api,
    fmt: str,
    status: str | None,
    kind: str | None,
    created_after: str | None,
    created_before: str | None,
    include: tuple[str, ...],
    output: str,
) -> None:
    """Download every matching job, newest first, one line (jsonl) or row (csv) each."""
    params: dict[str, Any] = {
        "format": fmt,
        "status": status,
        "kind": kind,
        "created_after": created_after,
        "created_before": created_before,
        "include": list(include),
    }
    api.download("/jobs/export", {k: v for k, v in params.items() if v}, output)


def follow_job(api: Api, job_id: str) -> dict[str, Any]:
    """Follows the job through its Server-Sent Events (resumable by seq) and renders its
    progress and streamed text live; returns the finished job."""
    text = Text()
    progress = 0.0
    status = JobStatus.QUEUED.value

    def frame() -> Group:
        bar = ProgressBar(total=100, completed=progress, width=40)
        return Group(text, Text(""), Group(bar, Text(f"{progress:5.1f}%  {status}")))

    with Live(frame(), console=console, refresh_per_second=12, transient=False) as live:
        for event in api.follow_events(job_id):
            data = event["data"]
            kind = event["type"]
            if kind == EventType.OUTPUT_DELTA:
                text.append(data["text"])
                progress = max(progress, data.get("progress", progress))
            elif kind == EventType.PROGRESS:
                progress = data["progress"]
            elif kind == EventType.STEP:
                status, progress = f"{data['step']}: {data['status']}", data["progress"]
            elif kind == EventType.STARTED:
                status, progress = JobStatus.RUNNING.value, 0.0
                if data.get("attempt", 1) > 1:
                    text.append(f"\n[attempt {data['attempt']}]\n", style="yellow")
            elif kind == EventType.RETRYING:
                status = "retrying"
                text.append(
                    f"\n[{data['error']['code']}: retrying in {data['delay']:.1f} s]",
                    style="yellow",
                )
            elif kind == EventType.SUCCEEDED:
                status, progress = JobStatus.SUCCEEDED.value, 100.0
            elif kind in (EventType.FAILED, EventType.CANCELED):
                status = TERMINAL_STATUSES[kind].value
            live.update(frame())
    job = api.request("GET", f"/jobs/{job_id}")
    if not text.plain and job["status"] == JobStatus.SUCCEEDED:
        # The stream had expired: the stored result stands in for the deltas.
        output = api.request("GET", f"/jobs/{job_id}/result")["output"]
        console.print(output.get("text") or json.dumps(output, indent=2))
    console.print()
    console.print(summary_line(job), soft_wrap=True)
    return job


def summary_line(job: dict[str, Any]) -> str:
    started = datetime.fromisoformat(job["created_at"])
    finished = datetime.fromisoformat(job["finished_at"]) if job["finished_at"] else None
    seconds = (finished - started).total_seconds() if finished else float("nan")
    usage = job["usage"]
    tokens = usage["tokens_in"] + usage["tokens_out"]
    cost = Decimal(usage["cost_usd"])
    # Small jobs cost fractions of a cent: show enough digits to see them.
    cost_text = f"${cost:.4f}" if cost >= Decimal("0.01") or cost == 0 else f"${cost:.6f}"
    line = f"job {job['id'][:8]}… {job['status']} in {seconds:.1f} s · {tokens} tokens · "
    line += cost_text
    if job.get("error"):
        line += f" · {job['error']['code']}: {job['error']['message']}"
    return line


def _load_json(value: str) -> Any:
    try:
        raw = Path(value[1:]).read_text() if value.startswith("@") else value
        return json.loads(raw)
    except (OSError, json.JSONDecodeError) as exc:
        raise click.BadParameter(f"not JSON: {exc}") from None


def wait_for_api(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url.rstrip("/") + "/api/v1/live", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise click.ClickException(f"the API at {url} did not come up within {timeout:g} s")
