"""Writing one answer to the client, streamed (SSE) or whole, with its timing and faults."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web

from app.sim import chunks
from app.sim.answer import Answer
from app.sim.pacing import Schedule, group_end, write_window
from app.sim.stats import SimStats

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
# How often a hanging request looks whether its client has gone; and the longest it hangs,
# so a client that never disconnects cannot pin a handler forever.
HANG_POLL_SECONDS = 0.1
HANG_LIMIT_SECONDS = 3600.0


@dataclass(frozen=True)
class Reply:
    """Everything needed to send one answer."""

    completion_id: str
    created: int
    model: str
    answer: Answer
    timing: Schedule
    fault: str | None
    include_usage: bool
    arrived: float  # loop.time() when the request arrived; all timing is relative to it
    cost: float | None = None  # the usage's `cost`, USD; None leaves it out


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def sleep_until(deadline: float) -> None:
    delay = deadline - asyncio.get_running_loop().time()
    if delay > 0:
        await asyncio.sleep(delay)


async def wait_for_client_to_leave(request: web.Request) -> None:
    deadline = asyncio.get_running_loop().time() + HANG_LIMIT_SECONDS
    while not client_gone(request) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(HANG_POLL_SECONDS)


def drop_connection(request: web.Request) -> None:
    """Close the socket mid-response: what was written is flushed, then the peer sees EOF."""
    transport = request.transport
    if transport is not None:
        transport.close()


async def send_whole(request: web.Request, reply: Reply, stats: SimStats) -> web.StreamResponse:
    """A non-streaming answer, sent after the time the streamed one would have taken."""
    try:
        if reply.fault == "hang":
            await wait_for_client_to_leave(request)
            stats.canceled_by_client += 1
            return web.Response()
        if reply.fault == "drop":
            await sleep_until(reply.arrived + reply.timing.end / 2)
            drop_connection(request)
            return web.Response()
        await sleep_until(reply.arrived + reply.timing.end)
    except asyncio.CancelledError:
        stats.canceled_by_client += 1
        raise
    if client_gone(request):
        stats.canceled_by_client += 1
        return web.Response()
    answer = reply.answer
    body = chunks.completion_body(
        completion_id=reply.completion_id,
        created=reply.created,
        model=reply.model,
        content=answer.content,
        finish_reason=answer.finish_reason,
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=len(answer.pieces),
        cost=reply.cost,
    )
    stats.completion_tokens_sent += len(answer.pieces)
    text = chunks.compact_json(body)
    if reply.fault == "malformed":
        # A 200 whose body is cut off: the client cannot parse it.
        text = text[: len(text) // 2]
    return web.Response(text=text, content_type="application/json")


async def send_stream(request: web.Request, reply: Reply, stats: SimStats) -> web.StreamResponse:
    """An SSE stream of chat.completion.chunk events, paced by the reply's schedule."""
    stats.stream_started()
    response = web.StreamResponse(headers=SSE_HEADERS)
    try:
        await sleep_until(reply.arrived + reply.timing.first)
        await response.prepare(request)
        await _write_events(request, response, reply, stats)
    except ConnectionError:
        # The client went away mid-stream (aiohttp raises ClientConnectionResetError).
        stats.canceled_by_client += 1
    except asyncio.CancelledError:
        # Same, when the server cancels handlers of lost connections.
        stats.canceled_by_client += 1
        raise
    finally:
        stats.stream_ended()
    return response


async def _write_events(
    request: web.Request, response: web.StreamResponse, reply: Reply, stats: SimStats
) -> None:
    answer = reply.answer
    encoder = chunks.ChunkEncoder(
        reply.completion_id, reply.created, reply.model, reply.include_usage
    )
    role = encoder.role()
    if reply.fault == "hang":
        await response.write(role)
        await wait_for_client_to_leave(request)
        raise ConnectionResetError("client left a hanging stream")

    events = [encoder.content(piece) for piece in answer.pieces]
    offsets = reply.timing.token_offsets
    half = len(events) // 2
    if reply.fault == "drop":
        events, offsets = events[:half], offsets[:half]
    if reply.fault == "malformed" and events:
        events[half] = chunks.MALFORMED_EVENT + events[half]
    if events:
        events[0] = role + events[0]
    else:
        await response.write(role)

    arrived = reply.arrived
    index = 0
    while index < len(events):
        end = group_end(offsets, index, write_window(stats.streams_active))
        await sleep_until(arrived + offsets[index])
        await response.write(events[index] if end == index + 1 else b"".join(events[index:end]))
        stats.completion_tokens_sent += end - index
        index = end

    if reply.fault == "drop":
        drop_connection(request)
        return
    await sleep_until(arrived + reply.timing.end)
    tail = encoder.finish(answer.finish_reason)
    if reply.include_usage:
        tail += encoder.usage(answer.prompt_tokens, len(answer.pieces), reply.cost)
    await response.write(tail + chunks.DONE)
    await response.write_eof()
