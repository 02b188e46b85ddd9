"""The aiohttp application: OpenAI-compatible endpoints (chat, images), ComfyUI's API, and the
/_sim/ admin API."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from aiohttp import web

from app.sim import admin, batches, chunks, comfy
from app.sim.answer import ChatRequest, InvalidRequest, compose_answer
from app.sim.config import SimConfig
from app.sim.directives import (
    NO_COST,
    DirectiveError,
    Directives,
    fault_key,
    request_directives,
)
from app.sim.faults import HTTP_FAULTS
from app.sim.http_errors import fault_response, invalid_request, rate_limited
from app.sim.images import generate_images
from app.sim.pacing import schedule
from app.sim.state import STATE, SimState
from app.sim.streaming import Reply, send_stream, send_whole
from app.sim.text import message_text, seed_for

log = logging.getLogger(__name__)

MODEL_IDS = ("sim-small", "sim-large", "gpt-4o-mini", "gpt-4o")
OWNER = "conveyor-sim"
# Prompts can be long; OpenAI accepts far more than aiohttp's 1 MiB default.
MAX_REQUEST_BYTES = 32 * 1024 * 1024


def make_app(config: SimConfig | None = None) -> web.Application:
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app[STATE] = SimState(config or SimConfig())
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/images/generations", generate_images)
    batches.add_routes(app)
    comfy.add_routes(app)
    admin.add_routes(app)
    return app


def _model(model_id: str) -> dict[str, object]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": OWNER}


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model(m) for m in MODEL_IDS]})


async def get_model(request: web.Request) -> web.Response:
    # Any model name works in completions, so every name "exists" here too.
    return web.json_response(_model(request.match_info["model"]))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    arrived = asyncio.get_running_loop().time()
    state = request.app[STATE]
    stats = state.stats
    stats.requests += 1
    try:
        chat = ChatRequest.from_body(await request.json())
        knobs = request_directives(chat.messages, request.headers)
    except ValueError as error:  # bad JSON, InvalidRequest and DirectiveError alike
        stats.by_outcome["invalid_request"] += 1
        message = str(error)
        if not isinstance(error, InvalidRequest | DirectiveError):
            message = "We could not parse the JSON body of your request."
        return invalid_request(message)

    if (retry_after := state.over_rate_limit(chat.model, time.time())) is not None:
        stats.by_outcome["rate_limited"] += 1
        state.requests.append(_logged(chat, knobs, "rate_limited"))
        return rate_limited(retry_after)
    messages_hash = seed_for(chat.messages)
    fault = state.choose_fault(knobs, fault_key(chat.messages))
    stats.by_outcome[fault or "ok"] += 1
    state.requests.append(_logged(chat, knobs, fault))
    if fault is not None:
        log.debug("injecting fault %s (knobs %s)", fault, knobs)
    if fault in HTTP_FAULTS:
        return fault_response(fault, knobs, state)
    try:
        answer = compose_answer(chat, messages_hash, knobs.tokens, fault)
    except InvalidRequest as error:
        return invalid_request(str(error))

    config = state.config
    reply = Reply(
        completion_id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
        created=int(time.time()),
        model=chat.model,
        answer=answer,
        timing=schedule(
            len(answer.pieces),
            ttft=knobs.ttft if knobs.ttft is not None else config.ttft,
            tps=knobs.tps if knobs.tps is not None else config.tps,
            duration=knobs.duration,
        ),
        fault=fault,
        include_usage=chat.include_usage,
        arrived=arrived,
        cost=_cost(knobs, answer.prompt_tokens, len(answer.pieces)),
    )
    if chat.stream:
        return await send_stream(request, reply, stats)
    return await send_whole(request, reply, stats)


def _cost(knobs: Directives, prompt_tokens: int, completion_tokens: int) -> float | None:
    """The usage's `cost`: the directive's figure, none for `cost=none`, else the simulator's
    own price of the tokens."""
    if knobs.cost == NO_COST:
        return None
    if knobs.cost is not None:
        return knobs.cost
    return chunks.reported_cost(prompt_tokens, completion_tokens)


def _logged(chat: ChatRequest, knobs: Directives, fault: str | None) -> dict[str, object]:
    """What the request log keeps of a request: enough to tell which call it was."""
    system = next(
        (
            message_text(m)
            for m in chat.messages
            if isinstance(m, dict) and m.get("role") == "system"
        ),
        "",
    )
    return {
        "model": chat.model,
        "tag": knobs.tag,
        "system": system[:120],
        "outcome": fault or "ok",
        # When it arrived (epoch seconds): benchmarks count the requests of any window.
        "at": time.time(),
    }
