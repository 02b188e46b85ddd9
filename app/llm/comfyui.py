"""ComfyUI through its own HTTP API: the workflow (API format, from a workflow file) goes to
`POST /prompt`, progress comes as `progress` messages on its websocket (`/ws?clientId=`), the
images are found in `/history/{prompt_id}` and read from `/view`. A cancel removes a prompt
still queued (`POST /queue {"delete": [...]}`) or interrupts it while it runs (`POST
/interrupt {"prompt_id": ...}`, which only stops that prompt).

A workflow file is JSON: `workflow` (ComfyUI's API format: node id -> {class_type, inputs}),
`inputs` (which node input each request field sets: {"prompt": ["6", "text"], ...}), and an
optional `description`. Files live in `CONVEYOR_COMFYUI_WORKFLOWS_DIR` and in the package's
own folder (app/kinds/workflows, with the default `txt2img`).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import websocket

from app.llm.client import CallRecord, Interrupted
from app.llm.errors import ModelError

logger = logging.getLogger(__name__)

WORKFLOW_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
PACKAGED_WORKFLOWS = Path(__file__).resolve().parent.parent / "kinds" / "workflows"
FIELDS = ("prompt", "negative_prompt", "width", "height", "count", "seed", "steps")
PROVIDER = "comfyui"


class WorkflowError(ValueError):
    """A workflow that does not exist or cannot be used."""


@dataclass(frozen=True)
class Workflow:
    name: str
    graph: dict[str, Any]
    inputs: dict[str, tuple[str, str]]
    description: str = ""

    @classmethod
    def parse(cls, name: str, raw: Any) -> Workflow:
        if not isinstance(raw, dict) or not isinstance(raw.get("workflow"), dict):
            raise WorkflowError(f"workflow {name!r}: expected an object with 'workflow'")
        graph, inputs = raw["workflow"], raw.get("inputs") or {}
        mapped: dict[str, tuple[str, str]] = {}
        for field_name, target in inputs.items():
            if field_name not in FIELDS:
                raise WorkflowError(f"workflow {name!r}: unknown input {field_name!r}")
            if (
                not isinstance(target, list)
                or len(target) != 2
                or not isinstance(graph.get(target[0]), dict)
            ):
                raise WorkflowError(
                    f"workflow {name!r}: input {field_name!r} must name [node id, input name] "
                    "of a node in the workflow"
                )
            mapped[field_name] = (str(target[0]), str(target[1]))
        if "prompt" not in mapped:
            raise WorkflowError(f"workflow {name!r}: its inputs must name where 'prompt' goes")
        return cls(name, graph, mapped, str(raw.get("description", "")))

    def render(self, values: dict[str, Any]) -> dict[str, Any]:
        """The API-format graph with the request's values set in the nodes `inputs` names; a
        field the workflow does not map, or a value of None, leaves the node as the file has
        it (its default)."""
        graph = copy.deepcopy(self.graph)
        for field_name, (node, input_name) in self.inputs.items():
            value = values.get(field_name)
            if value is not None:
                graph[node].setdefault("inputs", {})[input_name] = value
        return graph

    def accepts(self, field_name: str) -> bool:
        return field_name in self.inputs


def load_workflow(name: str, folder: Path | None) -> Workflow:
    """The workflow file `name`.json from `folder`, else from the packaged ones."""
    if not WORKFLOW_NAME.match(name):
        raise WorkflowError(f"workflow names match {WORKFLOW_NAME.pattern}")
    for directory in (folder, PACKAGED_WORKFLOWS):
        if directory is None:
            continue
        path = directory / f"{name}.json"
        try:
            stat = path.stat()
        except OSError:
            continue
        if not S_ISREG(stat.st_mode):
            continue
        return _parse_file(name, path, stat.st_mtime_ns, stat.st_size)
    raise WorkflowError(f"no workflow {name!r}")


@functools.lru_cache(maxsize=64)
def _parse_file(name: str, path: Path, mtime_ns: int, size: int) -> Workflow:
    """Each submit of an image job checks its workflow (`admit`): parsed once per version of
    the file (its modification time and size are part of the key), so an edited workflow is
    read again without a restart, and an unchanged one costs a stat."""
    try:
        return Workflow.parse(name, json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise WorkflowError(f"workflow {name!r}: cannot read {path}: {exc}") from exc


@dataclass
class ComfyRun:
    images: list[bytes]
    gpu_seconds: float
    record: CallRecord


@dataclass
class _Watch:
    """What the websocket said about our prompt."""

    prompt_id: str
    started: bool = False
    done: bool = False
    error: str | None = None
    interrupted: bool = False
    seen: list[str] = field(default_factory=list)


class ComfyUIClient:
    def __init__(self, base_url: str, *, timeout: float, connect_timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = timeout
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
        )
        self.provider = urlsplit(self.base_url).netloc

    def run(
        self,
        graph: dict[str, Any],
        *,
        model: str,
        on_progress: Callable[[float], None],
        interrupted: Callable[[], bool],
        register_closer: Callable[[Callable[[], None] | None], None],
    ) -> ComfyRun:
        """Queues `graph`, follows it to its end and fetches its images. Raises ModelError
        (with `.record`) or Interrupted after removing or interrupting the prompt."""
        record = CallRecord(model=model, provider=self.provider)
        started = time.perf_counter()
        client_id = uuid.uuid4().hex
        try:
            connection = self._connect(client_id)
        except ModelError as exc:
            raise _with_record(exc, record, started) from None
        closed = threading.Event()

        def close() -> None:
            closed.set()
            connection.close()

        register_closer(close)
        watch: _Watch | None = None
        try:
            watch = _Watch(self._queue(graph, client_id))
            self._follow(connection, watch, on_progress, lambda: closed.is_set() or interrupted())
            if watch.interrupted or interrupted():
                raise Interrupted
            if watch.error is not None:
                raise ModelError("image_generation_failed", watch.error, retryable=False)
            images, gpu_seconds = self._results(watch.prompt_id)
        except Interrupted:
            if watch is not None:
                self._cancel(watch)
            record.outcome = "interrupted"
            record.latency_ms = (time.perf_counter() - started) * 1000
            raise
        except ModelError as exc:
            raise _with_record(exc, record, started) from None
        finally:
            register_closer(None)
            connection.close()
        record.latency_ms = (time.perf_counter() - started) * 1000
        return ComfyRun(images, gpu_seconds, record)

    def _connect(self, client_id: str) -> websocket.WebSocket:
        parts = urlsplit(self.base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        url = urlunsplit((scheme, parts.netloc, f"{parts.path}/ws", f"clientId={client_id}", ""))
        try:
            return websocket.create_connection(url, timeout=self._timeout)
        except (OSError, websocket.WebSocketException) as exc:
            raise ModelError(
                "model_connection_error", f"cannot reach ComfyUI at {url}: {exc}", retryable=True
            ) from exc

    def _queue(self, graph: dict[str, Any], client_id: str) -> str:
        answer = self._call("POST", "/prompt", json={"prompt": graph, "client_id": client_id})
        prompt_id = answer.json().get("prompt_id")
        if not isinstance(prompt_id, str):
            raise ModelError("model_bad_response", "ComfyUI gave no prompt_id", retryable=True)
        return prompt_id

    def _follow(
        self,
        connection: websocket.WebSocket,
        watch: _Watch,
        on_progress: Callable[[float], None],
        stop: Callable[[], bool],
    ) -> None:
        """Reads the websocket until our prompt ends (or we are told to stop)."""
        while not (watch.done or stop()):
            try:
                message = connection.recv()
            except websocket.WebSocketTimeoutException as exc:
                raise ModelError(
                    "model_timeout",
                    f"ComfyUI said nothing for {self._timeout:g} s",
                    retryable=True,
                ) from exc
            except (OSError, websocket.WebSocketException) as exc:
                if stop():
                    return
                raise ModelError(
                    "model_connection_error", f"ComfyUI's websocket broke: {exc}", retryable=True
                ) from exc
            if isinstance(message, str):  # binary messages are previews
                _observe(watch, message, on_progress)

    def _results(self, prompt_id: str) -> tuple[list[bytes], float]:
        history = self._call("GET", f"/history/{prompt_id}").json().get(prompt_id)
        if not isinstance(history, dict):
            raise ModelError(
                "model_bad_response", f"no history for prompt {prompt_id}", retryable=True
            )
        images = [
            self._call("GET", "/view", params=_view_params(image)).content
            for output in (history.get("outputs") or {}).values()
            for image in output.get("images") or ()
            if image.get("type", "output") == "output"
        ]
        if not images:
            raise ModelError(
                "image_generation_failed", "the workflow saved no image", retryable=False
            )
        return images, _gpu_seconds(history)

    def _cancel(self, watch: _Watch) -> None:
        """Removes our prompt from the queue, and interrupts it if it may be running; only ever
        ours (a prompt_id is given), so another job's image is never stopped."""
        try:
            self._call("POST", "/queue", json={"delete": [watch.prompt_id]})
            if watch.started:
                self._call("POST", "/interrupt", json={"prompt_id": watch.prompt_id})
        except ModelError as exc:
            logger.warning("ComfyUI cancel of %s failed: %s", watch.prompt_id, exc.message)

    def _call(self, method: str, path: str, **options: Any) -> httpx.Response:
        try:
            answer = self._http.request(method, path, **options)
        except httpx.TimeoutException as exc:
            raise ModelError("model_timeout", f"ComfyUI {path}: {exc}", retryable=True) from exc
        except httpx.HTTPError as exc:
            raise ModelError(
                "model_connection_error", f"ComfyUI {path}: {exc}", retryable=True
            ) from exc
        if answer.status_code >= 500:
            raise ModelError(
                "model_unavailable", f"ComfyUI {path}: HTTP {answer.status_code}", retryable=True
            )
        if answer.status_code >= 400:
            raise ModelError(
                "model_bad_request",
                f"ComfyUI {path}: HTTP {answer.status_code}: {answer.text[:500]}",
                retryable=False,
            )
        return answer

    def close(self) -> None:
        self._http.close()


def _observe(watch: _Watch, message: str, on_progress: Callable[[float], None]) -> None:
    try:
        parsed = json.loads(message)
    except json.JSONDecodeError:
        return
    kind, data = parsed.get("type"), parsed.get("data") or {}
    if data.get("prompt_id") != watch.prompt_id:
        return
    watch.seen.append(kind)
    if kind in ("execution_start", "executing", "progress"):
        watch.started = True
    if kind == "progress" and data.get("max"):
        on_progress(min(1.0, float(data.get("value", 0)) / float(data["max"])))
    elif (kind == "executing" and data.get("node") is None) or kind == "execution_success":
        watch.done = True
    elif kind == "execution_error":
        watch.error = (
            f"{data.get('exception_type', 'error')}: {data.get('exception_message', '')}".strip()
        )
        watch.done = True
    elif kind == "execution_interrupted":
        watch.interrupted = True
        watch.done = True


def _view_params(image: dict[str, Any]) -> dict[str, str]:
    return {
        "filename": str(image.get("filename", "")),
        "subfolder": str(image.get("subfolder", "")),
        "type": str(image.get("type", "output")),
    }


def _gpu_seconds(history: dict[str, Any]) -> float:
    """From execution_start to its end, by ComfyUI's own timestamps (milliseconds)."""
    stamps = {
        name: details.get("timestamp")
        for name, details in ((history.get("status") or {}).get("messages") or ())
        if isinstance(details, dict)
    }
    start = stamps.get("execution_start")
    end = stamps.get("execution_success") or stamps.get("execution_error")
    if isinstance(start, int | float) and isinstance(end, int | float) and end >= start:
        return (end - start) / 1000
    return 0.0


def _with_record(exc: ModelError, record: CallRecord, started: float) -> ModelError:
    record.latency_ms = (time.perf_counter() - started) * 1000
    record.outcome = exc.code
    record.error_message = exc.message
    exc.record = record  # type: ignore[attr-defined]
    return exc
