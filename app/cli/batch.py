"""`conveyor batch`: many jobs from one JSON Lines file, followed by their counts."""

from __future__ import annotations

import sys
import time
import uuid
from decimal import Decimal
from typing import IO, Any

import click
from rich.console import Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.text import Text

from app.cli.api import OUTPUT_OPTION, Api, console
from app.cli.follow import money
from app.jobs.states import JobStatus

STATUS_ORDER = [status.value for status in JobStatus]


@click.group()
def batch() -> None:
    """Submit, follow, cancel and collect batches of jobs."""


@batch.command("submit")
@click.argument("items", type=click.File("rb"))
@click.option(
    "--idempotency-key",
    help="Resubmitting with the same key returns the same batch (default: a fresh random key).",
)
@click.option("--follow/--no-follow", default=False, help="Poll the batch until it finishes.")
@click.option("--interval", type=click.FloatRange(0.1), default=1.0, show_default=True)
@click.pass_obj
def submit_batch(
    api: Api, items: IO[bytes], idempotency_key: str | None, follow: bool, interval: float
) -> None:
    """Submit ITEMS, a JSON Lines file (- for standard input): one job per line, each what
    POST /api/v1/jobs takes, such as {"kind": "chat", "input": {"prompt": "…"}}."""
    headers = {"Content-Type": "application/jsonl"}
    key = idempotency_key or str(uuid.uuid4())
    created, created_earlier = api.create("/batches", key, content=items.read(), headers=headers)
    if created_earlier:
        click.echo(f"batch {created['id']}: created by an earlier attempt, not twice", err=True)
    if not follow:
        click.echo(created["id"])
        return
    console.print(f"[dim]batch {created['id']}: {created['item_count']} jobs queued[/dim]")
    final = follow_batch(api, created["id"], interval)
    sys.exit(0 if final["counts"].get(JobStatus.SUCCEEDED.value) == final["item_count"] else 1)


@batch.command("show")
@click.argument("batch_id")
@click.pass_obj
def show_batch(api: Api, batch_id: str) -> None:
    """The batch's jobs counted by status, its progress and its cost so far."""
    for line in describe(api.request("GET", f"/batches/{batch_id}")):
        console.print(line, highlight=False, soft_wrap=True)


@batch.command("cancel")
@click.argument("batch_id")
@click.pass_obj
def cancel_batch(api: Api, batch_id: str) -> None:
    """Cancel the batch's queued jobs and stop its running ones; finished jobs keep theirs."""
    canceled = api.request("POST", f"/batches/{batch_id}/cancel")
    click.echo(f"batch {batch_id}: cancel requested · {counts_text(canceled['counts'])}")


@batch.command("results")
@click.argument("batch_id")
@OUTPUT_OPTION
@click.pass_obj
def batch_results(api: Api, batch_id: str, output: str) -> None:
    """Download one JSON line per job, in item order: its status and output or error."""
    api.download(f"/batches/{batch_id}/results", {}, output)


def follow_batch(api: Api, batch_id: str, interval: float) -> dict[str, Any]:
    """Polls the batch until every job has finished, showing its counts live."""
    current = api.request("GET", f"/batches/{batch_id}")
    with Live(frame(current), console=console, refresh_per_second=4, transient=True) as live:
        while not current["done"]:
            time.sleep(interval)
            current = api.request("GET", f"/batches/{batch_id}")
            live.update(frame(current))
    for line in describe(current):
        console.print(line, highlight=False, soft_wrap=True)
    return current


def frame(current: dict[str, Any]) -> Group:
    bar = ProgressBar(total=100, completed=current["progress"]["percent"], width=40)
    return Group(bar, *(Text(line) for line in describe(current)))


def describe(current: dict[str, Any]) -> list[str]:
    progress, usage = current["progress"], current["usage"]
    tokens = usage["tokens_in"] + usage["tokens_out"]
    state = "done" if current["done"] else "running"
    if current.get("canceled_at"):
        state += ", canceled"
    return [
        f"batch {current['id']} ({state})",
        f"  {progress['finished']}/{progress['total']} finished · {progress['percent']:.1f}%"
        f" · {tokens} tokens · {money(Decimal(usage['cost_usd']))}",
        f"  {counts_text(current['counts'])}",
    ]


def counts_text(counts: dict[str, int]) -> str:
    ordered = sorted(counts, key=lambda s: STATUS_ORDER.index(s) if s in STATUS_ORDER else 99)
    return " · ".join(f"{status} {counts[status]}" for status in ordered)
