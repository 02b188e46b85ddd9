"""What the ComfyUI side keeps: the prompt queue, the history, saved images and websockets.

One prompt runs at a time, in queue order, as on a ComfyUI server with one GPU. History and
images live in memory, each bounded so that a long benchmark cannot grow them without end.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import posixpath
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from app.sim.directives import Directives
from app.sim.workflow import Workflow

log = logging.getLogger(__name__)

MAX_HISTORY = 1_000
MAX_IMAGES = 1_000

ImageKey = tuple[str, str, str]  # (folder type, subfolder, filename)


@dataclass(eq=False)
class PromptRun:
    prompt_id: str
    number: int
    client_id: str | None
    workflow: Workflow
    prompt_text: str  # the positive prompt without its directives: what the picture shows
    knobs: Directives
    fault: str | None
    extra_data: dict[str, Any] = field(default_factory=dict)
    interrupted: asyncio.Event = field(default_factory=asyncio.Event)

    def queue_item(self) -> list[Any]:
        """The prompt as ComfyUI lists it in /queue and in its history."""
        outputs = [output.node_id for output in self.workflow.outputs]
        return [self.number, self.prompt_id, dict(self.workflow.nodes), self.extra_data, outputs]


class ComfyQueue:
    def __init__(self) -> None:
        self.pending: list[PromptRun] = []
        self.running: PromptRun | None = None
        # The node the running prompt is at, told to a client that reconnects mid-run.
        self.current_node: str | None = None
        self.history: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.images: OrderedDict[ImageKey, bytes] = OrderedDict()
        self.sockets: dict[str, dict[web.WebSocketResponse, web.Request]] = {}
        self._file_counters: dict[str, int] = {}
        self._numbers = itertools.count()
        self._work = asyncio.Condition()

    # --- the queue ----------------------------------------------------------------------------

    def next_number(self, front: bool) -> int:
        number = next(self._numbers)
        return -number if front else number  # ComfyUI's `front`: ahead of everything queued

    async def submit(self, run: PromptRun) -> None:
        async with self._work:
            self.pending.append(run)
            self.pending.sort(key=lambda queued: queued.number)
            self._work.notify()

    async def take_next(self) -> PromptRun:
        """Wait for a queued prompt and mark it running."""
        async with self._work:
            await self._work.wait_for(lambda: bool(self.pending))
            self.running = self.pending.pop(0)
            return self.running

    def delete(self, prompt_ids: Iterable[str]) -> list[PromptRun]:
        """Remove queued (not running) prompts; returns those removed."""
        doomed = set(prompt_ids)
        removed = [run for run in self.pending if run.prompt_id in doomed]
        self.pending = [run for run in self.pending if run.prompt_id not in doomed]
        return removed

    def clear(self) -> list[PromptRun]:
        removed, self.pending = self.pending, []
        return removed

    def find(self, prompt_id: str) -> PromptRun | None:
        if self.running is not None and self.running.prompt_id == prompt_id:
            return self.running
        return next((run for run in self.pending if run.prompt_id == prompt_id), None)

    @property
    def queue_remaining(self) -> int:
        return len(self.pending) + (self.running is not None)

    # --- history and images -------------------------------------------------------------------

    def record(self, prompt_id: str, entry: dict[str, Any]) -> None:
        self.history[prompt_id] = entry
        while len(self.history) > MAX_HISTORY:
            self.history.popitem(last=False)

    def save_image(self, folder_type: str, prefix: str, png: bytes) -> dict[str, str]:
        """Store a PNG under ComfyUI's next file name for `prefix`; returns its listing."""
        subfolder, name = posixpath.split(prefix)
        counter = self._file_counters.get(prefix, 0) + 1
        self._file_counters[prefix] = counter
        filename = f"{name}_{counter:05}_.png"
        self.images[(folder_type, subfolder, filename)] = png
        while len(self.images) > MAX_IMAGES:
            self.images.popitem(last=False)
        return {"filename": filename, "subfolder": subfolder, "type": folder_type}

    def image(self, folder_type: str, subfolder: str, filename: str) -> bytes | None:
        return self.images.get((folder_type, subfolder, filename))

    # --- websockets ---------------------------------------------------------------------------

    def connect(self, client_id: str, socket: web.WebSocketResponse, request: web.Request) -> None:
        self.sockets.setdefault(client_id, {})[socket] = request

    def disconnect(self, client_id: str, socket: web.WebSocketResponse) -> None:
        sockets = self.sockets.get(client_id, {})
        sockets.pop(socket, None)
        if not sockets:
            self.sockets.pop(client_id, None)

    async def send(self, client_id: str | None, event: str, data: dict[str, Any]) -> None:
        """One message to the sockets of the client that queued the prompt, as ComfyUI sends
        progress only to its submitter."""
        if client_id is not None:
            await self._send_to(
                list(self.sockets.get(client_id, {})), {"type": event, "data": data}
            )

    def status_message(self, client_id: str | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {"status": {"exec_info": {"queue_remaining": self.queue_remaining}}}
        if client_id is not None:
            data["sid"] = client_id
        return {"type": "status", "data": data}

    async def broadcast_status(self) -> None:
        everyone = [socket for sockets in self.sockets.values() for socket in sockets]
        await self._send_to(everyone, self.status_message())

    def drop_client(self, client_id: str | None) -> None:
        """Cut the client's connections without a closing handshake, as a network failure
        would (the `drop` fault)."""
        for request in list(self.sockets.get(client_id or "", {}).values()):
            if request.transport is not None:
                request.transport.close()

    async def close_all(self) -> None:
        for sockets in list(self.sockets.values()):
            for socket in list(sockets):
                await socket.close(code=1001, message=b"server shutdown")

    async def _send_to(self, sockets: list[web.WebSocketResponse], message: dict[str, Any]) -> None:
        for socket in sockets:
            if socket.closed:
                continue
            try:
                await socket.send_json(message)
            except ConnectionError:
                # Gone between the check and the write; its handler unregisters it.
                log.debug("a websocket closed while a message was sent to it")
