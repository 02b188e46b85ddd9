"""Following a job live: its streamed text, its progress, and the steps of a multi-step kind
as they start, finish or are reused; then a summary of the steps' costs and of the job."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.text import Text

from app.cli.api import Api, console
from app.jobs.states import TERMINAL_STATUSES, EventType, JobStatus

STEP_MARKS = {"started": "…", "finished": "✓", "reused": "↺"}


@dataclass
class StepLine:
    """A step as its `job.step` events have told it so far."""

    name: str
    role: str
    status: str
    attempt: int
    tokens: int = 0
    cost_usd: str | None = None

    def render(self) -> str:
        line = f"{STEP_MARKS.get(self.status, '?')} {self.name:<12} {self.role:<10}"
        line += f" {self.status:<8} attempt {self.attempt}"
        if self.cost_usd is not None:
            line += f" · {self.tokens} tokens · {money(Decimal(self.cost_usd))}"
        return line


class JobView:
    """What the live view shows, updated event by event."""

    def __init__(self) -> None:
        self.text = Text()
        self.progress = 0.0
        self.status = JobStatus.QUEUED.value
        self.steps: dict[str, StepLine] = {}

    def frame(self) -> Group:
        bar = ProgressBar(total=100, completed=self.progress, width=40)
        steps = [Text(step.render()) for step in self.steps.values()]
        status = Text(f"{self.progress:5.1f}%  {self.status}")
        return Group(self.text, Text(""), *steps, Group(bar, status))

    def apply(self, event: dict[str, Any]) -> None:
        data, kind = event["data"], event["type"]
        if kind == EventType.OUTPUT_DELTA:
            self.text.append(data["text"])
            self.progress = max(self.progress, data.get("progress", self.progress))
        elif kind == EventType.PROGRESS:
            self.progress = data["progress"]
        elif kind == EventType.STEP:
            self.apply_step(data)
        elif kind == EventType.PROVIDER_BATCH:
            self.progress = data["progress"]
            self.status = f"batch: {data['phase'].replace('_', ' ')}"
        elif kind == EventType.STARTED:
            self.status, self.progress = JobStatus.RUNNING.value, 0.0
            if data.get("attempt", 1) > 1:
                self.text.append(f"\n[attempt {data['attempt']}]\n", style="yellow")
        elif kind == EventType.RETRYING:
            self.status = "retrying"
            self.text.append(
                f"\n[{data['error']['code']}: retrying in {data['delay']:.1f} s]", style="yellow"
            )
        elif kind == EventType.SUCCEEDED:
            self.status, self.progress = JobStatus.SUCCEEDED.value, 100.0
        elif kind in (EventType.FAILED, EventType.CANCELED):
            self.status = TERMINAL_STATUSES[kind].value

    def apply_step(self, data: dict[str, Any]) -> None:
        if data["status"] == "started":
            # A step streams its own answer (a structured step's JSON): the live view shows
            # the current step's, not every step's run together.
            self.text = Text()
        self.status = f"{data['step']}: {data['status']}"
        self.progress = data["progress"]
        step = StepLine(data["step"], data["role"], data["status"], data["attempt"])
        if "cost_usd" in data:
            step.tokens = data.get("tokens_in", 0) + data.get("tokens_out", 0)
            step.cost_usd = data["cost_usd"]
        self.steps[step.name] = step


def follow_job(api: Api, job_id: str) -> dict[str, Any]:
    """Follows the job through its Server-Sent Events (resumable by seq) and renders its
    progress, steps and streamed text live; returns the finished job."""
    view = JobView()
    with Live(view.frame(), console=console, refresh_per_second=12, transient=True) as live:
        for event in api.follow_events(job_id):
            view.apply(event)
            live.update(view.frame())
    job = api.request("GET", f"/jobs/{job_id}")
    if not view.steps:
        # A multi-step kind's result is a document to download; a single answer is shown.
        console.print(view.text)
    if not view.text.plain and job["status"] == JobStatus.SUCCEEDED and not view.steps:
        # The stream had expired: the stored result stands in for the deltas.
        output = api.request("GET", f"/jobs/{job_id}/result")["output"]
        console.print(output.get("text") or json.dumps(output, indent=2))
    if view.steps:
        console.print()
        console.print("steps:")
        for step in view.steps.values():
            console.print(f"  {step.render()}", soft_wrap=True, highlight=False)
    console.print()
    console.print(summary_line(job), soft_wrap=True)
    return job


def summary_line(job: dict[str, Any]) -> str:
    started = datetime.fromisoformat(job["created_at"])
    finished = datetime.fromisoformat(job["finished_at"]) if job["finished_at"] else None
    seconds = (finished - started).total_seconds() if finished else float("nan")
    usage = job["usage"]
    tokens = usage["tokens_in"] + usage["tokens_out"]
    line = f"job {job['id'][:8]}… {job['status']} in {seconds:.1f} s · {tokens} tokens · "
    line += money(Decimal(usage["cost_usd"]))
    if job.get("error"):
        line += f" · {job['error']['code']}: {job['error']['message']}"
    return line


def money(cost: Decimal) -> str:
    # Small jobs cost fractions of a cent: show enough digits to see them.
    return f"${cost:.4f}" if cost >= Decimal("0.01") or cost == 0 else f"${cost:.6f}"
