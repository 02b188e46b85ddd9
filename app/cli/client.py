"""`conveyor`: the command-line client of the HTTP API.

    conveyor submit chat --prompt "Write a haiku" --follow
    conveyor submit structured --prompt "A cat" --schema schema.json --follow
    conveyor submit character_card --concept "A lighthouse keeper" --name "Mira" \
        --lorebook-entries 4 --tag sea --tag mystery --follow
    conveyor submit KIND --input @input.json --set max_tokens=512
    conveyor download JOB_ID --format png [-o card.png]
    conveyor jobs list [--status running] [--kind chat]
    conveyor jobs show JOB_ID
    conveyor jobs cancel JOB_ID
    conveyor export JOB_ID --format yaml -o job.yaml
    conveyor jobs export --format csv --status failed -o failed.csv
    conveyor batch submit items.jsonl --follow
    conveyor batch show|cancel BATCH_ID
    conveyor batch results BATCH_ID -o results.jsonl
    conveyor keys create --owner acme --scope jobs:read --expires-at 2027-01-01
    conveyor keys list [--owner acme] [--state active]
    conveyor keys revoke KEY_ID

The API address and key come from --url/--key or CONVEYOR_URL/CONVEYOR_API_KEY.

A job's input is built from --input (JSON or @file), then each --set key=value, then the named
flags of the kinds (app/cli/inputs.py); the API validates it, and a 422 names the flag beside
the field. `--follow` shows a multi-step kind's steps as they start, finish or are reused,
and ends with each step's tokens and cost.

`submit` and `batch submit` always send an Idempotency-Key (a random one unless
--idempotency-key is given) and retry with that same key when the answer is lost (a dropped
connection, a 502/503/504), so a retry never creates a second job or batch. Downloads are
written beside their file and renamed once whole; without -o, `download` uses the file name
the server gives, in the current directory.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from typing import Any

import click
import httpx
from rich.table import Table

from app.cli.api import OUTPUT_OPTION, Api, console
from app.cli.batch import batch
from app.cli.follow import follow_job
from app.cli.inputs import input_options, job_input, name_flags
from app.cli.key_commands import keys
from app.jobs.states import TERMINAL, JobStatus

__all__ = ["Api", "console", "follow_job", "main", "wait_for_api"]


@click.group()
@click.option("--url", envvar="CONVEYOR_URL", default="http://127.0.0.1:8000", show_default=True)
@click.option("--key", envvar="CONVEYOR_API_KEY", help="API key (or CONVEYOR_API_KEY).")
@click.pass_context
def main(ctx: click.Context, url: str, key: str | None) -> None:
    """Submit and follow Conveyor jobs."""
    ctx.obj = Api(url, key)


@main.command(epilog="Kinds and their fields: GET /api/v1/kinds, docs/kinds.md.")
@click.argument("kind")
@click.option("--input", "input_json", help="The whole input as JSON, or @file.json.")
@click.option(
    "--set",
    "assignments",
    multiple=True,
    metavar="KEY=VALUE",
    help="An input field (repeatable; dots reach inside objects); VALUE is JSON or else text.",
)
@input_options
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
    input_json: str | None,
    assignments: tuple[str, ...],
    priority: int,
    idempotency_key: str | None,
    follow: bool,
) -> None:
    """Submit a job of KIND (chat, structured, character_card, …); its input is --input, then
    each --set, then the named flags."""
    body = {"kind": kind, "input": job_input(input_json, assignments), "priority": priority}
    try:
        job, created_earlier = api.create_job(body, idempotency_key or str(uuid.uuid4()))
    except click.ClickException as exc:
        raise click.ClickException(name_flags(exc.message)) from None
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


@main.command("export")
@click.argument("job_id")
@click.option("--format", "fmt", type=click.Choice(["json", "yaml", "csv"]), default="json")
@OUTPUT_OPTION
@click.pass_obj
def export_job(api: Api, job_id: str, fmt: str, output: str) -> None:
    """Download a job's whole record: the job, its input and output, its timeline and its
    model calls."""
    api.download(f"/jobs/{job_id}/export", {"format": fmt}, output)


@main.command("download")
@click.argument("job_id")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["json", "card_v2", "png"]),
    default="json",
    show_default=True,
    help="json: the output of any kind; card_v2 and png: a character_card's card.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, allow_dash=True),
    help="File to write, - for standard output (default: the server's file name, here).",
)
@click.pass_obj
def download(api: Api, job_id: str, fmt: str, output: str | None) -> None:
    """Download a succeeded job's result as a file (a card as V2 JSON or a card PNG)."""
    written = api.download(f"/jobs/{job_id}/download/{fmt}", {}, output)
    if written != "-":
        click.echo(written, err=True)


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


main.add_command(batch)
main.add_command(keys)
