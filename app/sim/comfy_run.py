"""Running one ComfyUI prompt: its nodes in order, the sampler's steps, its websocket messages
and its history entry.

The messages and their order are ComfyUI's: `execution_start`, `execution_cached`, then per
node `executing` (the sampler adds one `progress` per step, an output node `executed` with its
images), and at the end `execution_success` (or `execution_interrupted`, `execution_error`)
followed by `executing` with node null. The history entry is written before those last two,
so a client that sees the end can fetch it at once.

Faults (from `[[sim ...]]` in the positive prompt) strike when half the steps are done:
`execution_error` fails the sampler, `hang` stops it until interrupted, `drop` cuts the
client's websockets and lets the prompt finish.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from app.sim.comfy_queue import ComfyQueue, PromptRun
from app.sim.render import render_png
from app.sim.state import SimState
from app.sim.workflow import Output

log = logging.getLogger(__name__)

# The longest a `hang` lasts without an interrupt, so a forgotten prompt cannot hold the
# queue forever.
HANG_LIMIT_SECONDS = 600.0
LATENT_SCALE = 8  # ComfyUI's latents are 1/8 of the image: sides round down to a multiple


class Interrupted(Exception):
    def __init__(self, node_id: str) -> None:
        super().__init__(node_id)
        self.node_id = node_id


class ExecutionFailed(Exception):
    def __init__(self, node_id: str, exception_type: str, message: str) -> None:
        super().__init__(message)
        self.node_id = node_id
        self.exception_type = exception_type


def _now_ms() -> int:
    return int(time.time() * 1000)


async def run_prompts(queue: ComfyQueue, state: SimState) -> None:
    """The simulated GPU: takes queued prompts one at a time, for as long as the app runs."""
    while True:
        run = await queue.take_next()
        await queue.broadcast_status()
        try:
            await PromptExecution(queue, run, _step_time(run, state)).execute()
        except Exception:
            # A bug of the simulator's own: the prompt ends as an error, the queue goes on.
            log.exception("prompt %s failed inside the simulator", run.prompt_id)
            queue.record(run.prompt_id, _entry(run, {}, "error", []))
            await queue.send(run.client_id, "executing", {"node": None, "prompt_id": run.prompt_id})
        finally:
            queue.running = None
            queue.current_node = None
        await queue.broadcast_status()


def _step_time(run: PromptRun, state: SimState) -> float:
    """`duration` spreads the sampling over that time; else `step_time`, else the run's."""
    knobs, steps = run.knobs, run.workflow.steps
    if knobs.duration is not None and steps:
        return knobs.duration / steps
    return knobs.step_time if knobs.step_time is not None else state.config.step_time


def _entry(
    run: PromptRun, outputs: dict[str, Any], status: str, messages: list[Any]
) -> dict[str, Any]:
    """The prompt's /history entry."""
    return {
        "prompt": run.queue_item(),
        "outputs": outputs,
        "status": {"status_str": status, "completed": status == "success", "messages": messages},
        "meta": {
            node: {"node_id": node, "display_node": node, "parent_node": None, "real_node_id": node}
            for node in outputs
        },
    }


class PromptExecution:
    def __init__(self, queue: ComfyQueue, run: PromptRun, step_time: float) -> None:
        self.queue = queue
        self.run = run
        self.workflow = run.workflow
        self.step_time = step_time
        self.messages: list[Any] = []  # the history's status messages
        self.executed: list[str] = []
        self.outputs: dict[str, Any] = {}
        self.pictures: list[bytes] | None = None

    async def send(self, event: str, data: dict[str, Any]) -> None:
        await self.queue.send(self.run.client_id, event, data)

    async def announce(self, event: str, data: dict[str, Any]) -> None:
        """A message that the history keeps too."""
        data = {**data, "prompt_id": self.run.prompt_id, "timestamp": _now_ms()}
        self.messages.append([event, data])
        await self.send(event, data)

    async def execute(self) -> None:
        prompt_id = self.run.prompt_id
        await self.announce("execution_start", {})
        await self.announce("execution_cached", {"nodes": []})
        try:
            await self.execute_nodes()
            event, data = "execution_success", {}
        except Interrupted as stop:
            event, data = "execution_interrupted", self.stop_details(stop.node_id)
        except ExecutionFailed as failure:
            event, data = "execution_error", self.failure_details(failure)
        data = {**data, "prompt_id": prompt_id, "timestamp": _now_ms()}
        status = "success" if event == "execution_success" else "error"
        self.queue.record(
            prompt_id, _entry(self.run, self.outputs, status, [*self.messages, [event, data]])
        )
        await self.send(event, data)
        await self.send("executing", {"node": None, "prompt_id": prompt_id})

    def stop_details(self, node_id: str) -> dict[str, Any]:
        return {
            "node_id": node_id,
            "node_type": self.workflow.class_type(node_id),
            "executed": list(self.executed),
        }

    def failure_details(self, failure: ExecutionFailed) -> dict[str, Any]:
        return {
            **self.stop_details(failure.node_id),
            "exception_message": str(failure),
            "exception_type": failure.exception_type,
            "traceback": [],
            "current_inputs": {},
            "current_outputs": {},
        }

    async def execute_nodes(self) -> None:
        outputs = {output.node_id: output for output in self.workflow.outputs}
        for node_id in self.workflow.order:
            if self.run.interrupted.is_set():
                raise Interrupted(node_id)
            self.queue.current_node = node_id
            await self.send(
                "executing",
                {"node": node_id, "display_node": node_id, "prompt_id": self.run.prompt_id},
            )
            if node_id == self.workflow.sampler:
                await self.sample(node_id)
            if node_id in outputs:
                await self.save(outputs[node_id])
            self.executed.append(node_id)

    async def sample(self, node_id: str) -> None:
        steps = self.workflow.steps
        fault_step = steps // 2 + 1  # the fault strikes once half the steps are done
        started = asyncio.get_running_loop().time()
        for step in range(1, steps + 1):
            if step == fault_step:
                await self.strike(node_id)
            await self.wait_until(started + step * self.step_time, node_id)
            await self.send(
                "progress",
                {"value": step, "max": steps, "prompt_id": self.run.prompt_id, "node": node_id},
            )

    async def strike(self, node_id: str) -> None:
        fault = self.run.fault
        if fault == "execution_error":
            raise ExecutionFailed(
                node_id, "torch.OutOfMemoryError", "Allocation on device (simulated)."
            )
        if fault == "hang":
            now = asyncio.get_running_loop().time()
            await self.wait_until(now + HANG_LIMIT_SECONDS, node_id)
            raise ExecutionFailed(node_id, "TimeoutError", "The simulated hang gave up.")
        if fault == "drop":
            self.queue.drop_client(self.run.client_id)

    async def wait_until(self, deadline: float, node_id: str) -> None:
        """Sleep until `deadline`; an interrupt ends the wait (and the prompt) at once."""
        if self.run.interrupted.is_set():
            raise Interrupted(node_id)
        delay = deadline - asyncio.get_running_loop().time()
        try:
            await asyncio.wait_for(self.run.interrupted.wait(), max(0.0, delay))
        except TimeoutError:
            return
        raise Interrupted(node_id)

    async def save(self, output: Output) -> None:
        if self.pictures is None:
            # Rendering is CPU work: off the event loop, so websockets and HTTP stay live.
            self.pictures = await asyncio.get_running_loop().run_in_executor(None, self.render)
        images = [
            self.queue.save_image(output.folder_type, output.prefix, png) for png in self.pictures
        ]
        self.outputs[output.node_id] = {"images": images}
        await self.send(
            "executed",
            {
                "node": output.node_id,
                "display_node": output.node_id,
                "output": {"images": images},
                "prompt_id": self.run.prompt_id,
            },
        )

    def render(self) -> list[bytes]:
        workflow = self.workflow
        width = max(LATENT_SCALE, workflow.width // LATENT_SCALE * LATENT_SCALE)
        height = max(LATENT_SCALE, workflow.height // LATENT_SCALE * LATENT_SCALE)
        # ComfyUI keeps the workflow that made an image in the PNG's "prompt" text chunk.
        chunks = {"prompt": json.dumps(workflow.nodes)}
        return [
            render_png(self.run.prompt_text, workflow.seed, width, height, index, chunks)
            for index in range(workflow.batch_size)
        ]
