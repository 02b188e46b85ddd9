"""The `conveyor` client's view of the HTTP API: requests, problems shown readably, POSTs
retried with their Idempotency-Key, downloads and the job's event stream."""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import click
import httpx
from httpx_sse import connect_sse
from rich.console import Console

from app.jobs.states import TERMINAL_STATUSES

SUBMIT_ATTEMPTS = 5
# A gateway's answers when it lost the API behind it: the request may or may not have arrived.
GATEWAY_ERRORS = {502, 503, 504}
# The request went out but no answer came back (UnsupportedProtocol and the like are the
# caller's mistake, not the network's: they are not retried).
LOST_ANSWER = (httpx.NetworkError, httpx.TimeoutException, httpx.RemoteProtocolError)
console = Console()

OUTPUT_OPTION = click.option(
    "-o",
    "--output",
    default="-",
    show_default=True,
    type=click.Path(dir_okay=False, allow_dash=True),
    help="File to write; - is standard output.",
)


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
        """POSTs the job; returns it, and whether an earlier attempt of this call had created it."""
        return self.create("/jobs", idempotency_key, json=body)

    def create(self, path: str, idempotency_key: str, **kwargs: Any) -> tuple[dict[str, Any], bool]:
        """POSTs a job or a batch; returns it, and whether an earlier attempt had created it.

        A POST whose answer is lost (a dropped connection, a web process killed mid-request, a
        gateway that gave up) may still have created it. Every attempt carries the same
        Idempotency-Key, so a retry gets that one back (200, Idempotent-Replayed) instead of
        creating a second."""
        headers = {**kwargs.pop("headers", {}), "Idempotency-Key": idempotency_key}
        attempt = 0
        while True:
            attempt += 1
            retry_after = None
            try:
                response = self.http.post(path, headers=headers, **kwargs)
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
                    f"--idempotency-key {idempotency_key} to get what was created, if anything"
                )
            delay = min(8.0, 0.5 * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
            delay = min(retry_after, 10.0) if retry_after is not None else delay
            click.echo(f"{failure}; retrying in {delay:.1f} s with the same key", err=True)
            time.sleep(delay)

    def download(self, path: str, params: dict[str, Any], output: str | None) -> str:
        """Writes the response's body to `output` ("-": standard output; None: the file the
        Content-Disposition names, in the current directory) as it arrives, and returns where.
        A file is written beside its name and renamed once whole, so an interrupted download
        never leaves a file that looks complete."""
        partial: Path | None = None
        try:
            with self.http.stream("GET", path, params=params) as response:
                if response.status_code >= 400:
                    response.read()
                    raise click.ClickException(_problem_text(response))
                output = output or attachment_name(response.headers) or "download"
                partial = Path(f"{output}.part") if output != "-" else None
                with click.open_file(str(partial or output), "wb") as sink:
                    for chunk in response.iter_bytes():
                        sink.write(chunk)
        except httpx.HTTPError as exc:
            if partial is not None:
                partial.unlink(missing_ok=True)
            raise click.ClickException(f"the download failed: {exc}") from None
        if partial is not None:
            partial.replace(output)
        return output

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


def attachment_name(headers: httpx.Headers) -> str | None:
    """The file name a Content-Disposition offers (the UTF-8 `filename*` first), reduced to a
    bare name: a server's answer never chooses a directory to write in."""
    disposition = headers.get("Content-Disposition", "")
    encoded = re.search(r"filename\*\s*=\s*UTF-8''([^;\s]+)", disposition, re.IGNORECASE)
    plain = re.search(r'filename\s*=\s*"([^"]*)"', disposition, re.IGNORECASE)
    name = unquote(encoded.group(1)) if encoded else plain.group(1) if plain else ""
    name = Path(name.replace("\\", "/")).name.strip()
    return name if name not in ("", ".", "..") else None


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
