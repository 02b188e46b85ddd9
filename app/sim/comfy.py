"""ComfyUI's HTTP API, at the server's root as ComfyUI has it: /prompt, /ws, /history, /view,
/interrupt, /queue and /system_stats.

A prompt's `[[sim ...]]` directives go in its positive prompt text (or in X-Sim-* headers of
POST /prompt): `fault` (429, 500, 400 and 401 refuse the POST; execution_error, hang and drop
strike while it runs), `times`, `retry_after`, `step_time`, `duration` and `tag`. Calls to
POST /prompt, /interrupt and /queue go into the request log (GET /_sim/requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import platform
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from app.sim.comfy_queue import ComfyQueue, PromptRun
from app.sim.comfy_run import run_prompts
from app.sim.directives import DirectiveError, text_directives, text_fault_key
from app.sim.faults import HTTP_FAULTS
from app.sim.state import STATE
from app.sim.workflow import WorkflowError, parse_workflow

COMFY = web.AppKey("comfy_queue", ComfyQueue)
WEBSOCKET_HEARTBEAT = 30.0


def _refusal(error: WorkflowError) -> web.Response:
    return web.json_response(error.body(), status=400)


def _fault_refusal(fault: str, retry_after: float) -> web.Response:
    status, error_type, _, message = HTTP_FAULTS[fault]
    body = {
        "error": {"type": error_type, "message": message, "details": "", "extra_info": {}},
        "node_errors": {},
    }
    headers = {"Retry-After": f"{retry_after:g}"} if status == 429 else None
    return web.json_response(body, status=status, headers=headers)


async def _body(request: web.Request) -> dict[str, Any]:
    """A JSON object body; an empty or non-object body counts as {}, as ComfyUI treats it."""
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


async def post_prompt(request: web.Request) -> web.Response:
    state, queue = request.app[STATE], request.app[COMFY]
    state.stats.requests += 1
    body = await _body(request)
    try:
        if "prompt" not in body:
            raise WorkflowError("no_prompt", "No prompt provided", "No prompt provided")
        workflow = parse_workflow(body["prompt"])
        knobs, prompt_text = text_directives(workflow.positive, request.headers)
    except (WorkflowError, DirectiveError) as error:
        state.stats.by_outcome["invalid_request"] += 1
        if isinstance(error, DirectiveError):
            error = WorkflowError("invalid_prompt", str(error))
        return _refusal(error)

    fault = state.choose_fault(knobs, text_fault_key(workflow.positive))
    state.stats.by_outcome[fault or "ok"] += 1
    given_id = body.get("prompt_id")
    prompt_id = given_id if isinstance(given_id, str) and given_id else str(uuid.uuid4())
    state.requests.append(
        {
            "endpoint": "/prompt",
            "model": workflow.checkpoint,
            "tag": knobs.tag,
            "prompt": prompt_text[:120],
            "prompt_id": prompt_id,
            "outcome": fault or "ok",
        }
    )
    if fault in HTTP_FAULTS:
        return _fault_refusal(fault, state.retry_after(knobs))
    client_id = body.get("client_id")
    extra_data = body.get("extra_data")
    run = PromptRun(
        prompt_id=prompt_id,
        number=queue.next_number(front=bool(body.get("front"))),
        client_id=client_id if isinstance(client_id, str) else None,
        workflow=workflow,
        prompt_text=prompt_text,
        knobs=knobs,
        fault=fault,
        extra_data=extra_data if isinstance(extra_data, dict) else {},
    )
    await queue.submit(run)
    await queue.broadcast_status()
    return web.json_response({"prompt_id": prompt_id, "number": run.number, "node_errors": {}})


async def get_prompt(request: web.Request) -> web.Response:
    return web.json_response({"exec_info": {"queue_remaining": request.app[COMFY].queue_remaining}})


async def websocket(request: web.Request) -> web.WebSocketResponse:
    queue = request.app[COMFY]
    client_id = request.query.get("clientId") or uuid.uuid4().hex
    socket = web.WebSocketResponse(heartbeat=WEBSOCKET_HEARTBEAT)
    await socket.prepare(request)
    queue.connect(client_id, socket, request)
    try:
        await socket.send_json(queue.status_message(client_id))
        running = queue.running
        if running is not None and running.client_id == client_id and queue.current_node:
            # A client back from a lost connection learns where its prompt is, as in ComfyUI.
            node = queue.current_node
            data = {"node": node, "display_node": node, "prompt_id": running.prompt_id}
            await socket.send_json({"type": "executing", "data": data})
        async for _ in socket:
            pass  # what clients send ComfyUI does not steer a prompt
    except ConnectionError:
        pass  # the client left; unregistered below
    finally:
        queue.disconnect(client_id, socket)
    return socket


async def get_history(request: web.Request) -> web.Response:
    history = request.app[COMFY].history
    items = list(history.items())
    max_items = request.query.get("max_items", "")
    if max_items.isdigit():
        items = items[len(items) - int(max_items) :] if int(max_items) else []
    return web.json_response(dict(items))


async def get_history_entry(request: web.Request) -> web.Response:
    prompt_id = request.match_info["prompt_id"]
    entry = request.app[COMFY].history.get(prompt_id)
    return web.json_response({} if entry is None else {prompt_id: entry})


async def post_history(request: web.Request) -> web.Response:
    history = request.app[COMFY].history
    body = await _body(request)
    if body.get("clear"):
        history.clear()
    for prompt_id in body.get("delete") or []:
        history.pop(str(prompt_id), None)
    return web.Response()


async def view(request: web.Request) -> web.Response:
    query = request.query
    filename = query.get("filename", "")
    if not filename:
        return web.Response(status=400, text="filename is required")
    png = request.app[COMFY].image(
        query.get("type", "output"), query.get("subfolder", ""), filename
    )
    if png is None:
        return web.Response(status=404)
    return web.Response(body=png, content_type="image/png")


async def interrupt(request: web.Request) -> web.Response:
    """Interrupt the running prompt; with {"prompt_id": id}, only if that one is running."""
    state, queue = request.app[STATE], request.app[COMFY]
    asked = (await _body(request)).get("prompt_id")
    running = queue.running
    target = running if running and asked in (None, running.prompt_id) else None
    if target is not None:
        target.interrupted.set()
    named = queue.find(asked) if isinstance(asked, str) else target
    state.requests.append(
        {
            "endpoint": "/interrupt",
            "tag": named.knobs.tag if named else None,
            "prompt_id": named.prompt_id if named else asked,
            "outcome": "interrupted" if target else "not_running",
        }
    )
    return web.Response()


async def get_queue(request: web.Request) -> web.Response:
    queue = request.app[COMFY]
    running = [queue.running.queue_item()] if queue.running else []
    pending = [run.queue_item() for run in queue.pending]
    return web.json_response({"queue_running": running, "queue_pending": pending})


async def post_queue(request: web.Request) -> web.Response:
    """{"delete": [prompt ids]} removes queued prompts, {"clear": true} all of them; a running
    prompt stays (POST /interrupt ends it)."""
    state, queue = request.app[STATE], request.app[COMFY]
    body = await _body(request)
    removed = queue.clear() if body.get("clear") else []
    delete = body.get("delete")
    if isinstance(delete, list):
        removed += queue.delete(str(prompt_id) for prompt_id in delete)
    state.requests.append(
        {
            "endpoint": "/queue",
            "tag": next((run.knobs.tag for run in removed if run.knobs.tag), None),
            "delete": delete if isinstance(delete, list) else [],
            "clear": bool(body.get("clear")),
            "removed": [run.prompt_id for run in removed],
            "outcome": "ok",
        }
    )
    if removed:
        await queue.broadcast_status()
    return web.Response()


async def system_stats(request: web.Request) -> web.Response:
    device = {"name": "conveyor-sim", "type": "cpu", "index": 0, "vram_total": 0, "vram_free": 0}
    system = {
        "os": platform.system().lower(),
        "python_version": platform.python_version(),
        "embedded_python": False,
        "comfyui_version": "conveyor-sim",
        "ram_total": 0,
        "ram_free": 0,
    }
    return web.json_response({"system": system, "devices": [device]})


async def _run_queue(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(run_prompts(app[COMFY], app[STATE]))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _close_websockets(app: web.Application) -> None:
    await app[COMFY].close_all()


def add_routes(app: web.Application) -> None:
    app[COMFY] = ComfyQueue()
    app.cleanup_ctx.append(_run_queue)
    app.on_shutdown.append(_close_websockets)
    app.router.add_post("/prompt", post_prompt)
    app.router.add_get("/prompt", get_prompt)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/history", get_history)
    app.router.add_get("/history/{prompt_id}", get_history_entry)
    app.router.add_post("/history", post_history)
    app.router.add_get("/view", view)
    app.router.add_post("/interrupt", interrupt)
    app.router.add_get("/queue", get_queue)
    app.router.add_post("/queue", post_queue)
    app.router.add_get("/system_stats", system_stats)
