"""`POST /v1/images/generations`: OpenAI's Images API, answered with rendered PNGs.

Sizes are checked per model as OpenAI checks them; any model name OpenAI does not have takes
any WxH in multiples of 8 from 64 to 2048. Images always come back as `b64_json` (the simulator
hosts no image URLs). The prompt may carry `[[sim ...]]` directives; they steer the request
(fault, times, retry_after, duration, tag) and are not part of the picture.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from app.sim.answer import InvalidRequest
from app.sim.chunks import compact_json
from app.sim.directives import DirectiveError, Directives, text_directives, text_fault_key
from app.sim.faults import HTTP_FAULTS
from app.sim.http_errors import fault_response, invalid_request
from app.sim.render import render_png
from app.sim.state import STATE, SimState
from app.sim.streaming import (
    client_gone,
    drop_connection,
    sleep_until,
    wait_for_client_to_leave,
)
from app.sim.text import seed_for

DEFAULT_MODEL = "dall-e-2"  # OpenAI's, when a request names none
GPT_IMAGE_PREFIX = "gpt-image-"
FIXED_SIZES: dict[str, tuple[str, ...]] = {
    "dall-e-2": ("256x256", "512x512", "1024x1024"),
    "dall-e-3": ("1024x1024", "1792x1024", "1024x1792"),
    GPT_IMAGE_PREFIX: ("1024x1024", "1536x1024", "1024x1536", "auto"),
}
AUTO_SIZE = (1024, 1024)
MIN_SIDE, MAX_SIDE, SIDE_STEP = 64, 2048, 8
MAX_IMAGES = 10
MAX_PROMPT_CHARS = {"dall-e-2": 1000, "dall-e-3": 4000}
DEFAULT_MAX_PROMPT_CHARS = 32000
QUALITIES = ("auto", "low", "medium", "high", "xhigh", "max", "standard", "hd")
# Output tokens of one 1024x1024 image per quality, as OpenAI bills gpt-image-1; other sizes
# scale with their area. `auto` counts as medium.
OUTPUT_TOKENS_PER_MEGAPIXEL = {"low": 272, "medium": 1056, "high": 4160}


@dataclass(frozen=True)
class ImageRequest:
    model: str
    prompt: str
    n: int
    width: int
    height: int
    quality: str

    @classmethod
    def from_body(cls, body: Any) -> ImageRequest:
        if not isinstance(body, Mapping):
            raise InvalidRequest("The request body must be a JSON object.")
        model = body.get("model") or DEFAULT_MODEL
        if not isinstance(model, str):
            raise InvalidRequest("Invalid type for 'model': expected a string.", "model")
        _refuse_unsupported(body)
        width, height = _size(model, body.get("size"))
        quality = body.get("quality") or "auto"
        if quality not in QUALITIES:
            raise InvalidRequest(_not_one_of(quality, QUALITIES), "quality")
        return cls(
            model=model,
            prompt=_prompt(model, body.get("prompt")),
            n=_count(model, body.get("n")),
            width=width,
            height=height,
            quality=quality,
        )

    @property
    def is_dall_e(self) -> bool:
        return self.model in ("dall-e-2", "dall-e-3")

    @property
    def is_gpt_image(self) -> bool:
        return self.model.startswith(GPT_IMAGE_PREFIX)

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


def _not_one_of(value: object, allowed: tuple[str, ...]) -> str:
    quoted = [f"'{item}'" for item in allowed]
    listed = ", ".join(quoted[:-1]) + f", and {quoted[-1]}" if len(quoted) > 1 else quoted[0]
    return f"Invalid value: '{value}'. Supported values are: {listed}."


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    if body.get("response_format") not in (None, "b64_json"):
        raise InvalidRequest(
            "The simulator hosts no image URLs: use response_format 'b64_json'.",
            "response_format",
        )
    if body.get("output_format") not in (None, "png"):
        raise InvalidRequest("The simulator renders PNG only.", "output_format")
    if body.get("stream"):
        raise InvalidRequest("The simulator does not stream images.", "stream")


def _prompt(model: str, prompt: Any) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequest("Missing required parameter: 'prompt'.", "prompt")
    limit = MAX_PROMPT_CHARS.get(model, DEFAULT_MAX_PROMPT_CHARS)
    if len(prompt) > limit:
        raise InvalidRequest(
            f"Invalid 'prompt': string too long. Expected a string with maximum length "
            f"{limit}, but got a string with length {len(prompt)} instead.",
            "prompt",
        )
    return prompt


def _count(model: str, n: Any) -> int:
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidRequest("Invalid 'n': expected an integer of at least 1.", "n")
    most = 1 if model == "dall-e-3" else MAX_IMAGES
    if n > most:
        raise InvalidRequest(
            f"Invalid 'n': integer above maximum value. Expected a value <= {most}, but got "
            f"{n} instead.",
            "n",
        )
    return n


def _size(model: str, size: Any) -> tuple[int, int]:
    size = size or ("auto" if model.startswith(GPT_IMAGE_PREFIX) else "1024x1024")
    family = GPT_IMAGE_PREFIX if model.startswith(GPT_IMAGE_PREFIX) else model
    allowed = FIXED_SIZES.get(family)
    if allowed is not None and size not in allowed:
        raise InvalidRequest(_not_one_of(size, allowed), "size")
    if size == "auto":
        return AUTO_SIZE
    width, _, height = str(size).partition("x")
    if not (width.isdigit() and height.isdigit()) or not all(
        MIN_SIDE <= int(side) <= MAX_SIDE and int(side) % SIDE_STEP == 0 for side in (width, height)
    ):
        raise InvalidRequest(
            f"Invalid value: '{size}'. Sizes are 'auto' or WIDTHxHEIGHT, both multiples of "
            f"{SIDE_STEP} from {MIN_SIDE} to {MAX_SIDE}.",
            "size",
        )
    return int(width), int(height)


def output_tokens(asked: ImageRequest) -> int:
    per_megapixel = OUTPUT_TOKENS_PER_MEGAPIXEL.get(asked.quality, 1056)
    return asked.n * round(per_megapixel * asked.width * asked.height / (1024 * 1024))


def response_body(asked: ImageRequest, prompt: str, pictures: list[bytes]) -> dict[str, Any]:
    """OpenAI's ImagesResponse: dall-e models answer data only (dall-e-3 with its revised
    prompt); GPT image models (and the simulator's own names) add size, quality and usage."""
    data: list[dict[str, Any]] = []
    for picture in pictures:
        item: dict[str, Any] = {"b64_json": base64.b64encode(picture).decode("ascii")}
        if asked.model == "dall-e-3" or not (asked.is_dall_e or asked.is_gpt_image):
            item["revised_prompt"] = prompt
        data.append(item)
    body: dict[str, Any] = {"created": int(time.time()), "data": data}
    if asked.is_dall_e:
        return body
    input_tokens = len(prompt.split())
    produced = output_tokens(asked)
    body.update(
        background="opaque",
        output_format="png",
        quality=asked.quality if asked.quality in OUTPUT_TOKENS_PER_MEGAPIXEL else "medium",
        size=asked.size,
        usage={
            "input_tokens": input_tokens,
            "input_tokens_details": {"text_tokens": input_tokens, "image_tokens": 0},
            "output_tokens": produced,
            "output_tokens_details": {"text_tokens": 0, "image_tokens": produced},
            "total_tokens": input_tokens + produced,
        },
    )
    return body


def render_batch(asked: ImageRequest, prompt: str) -> list[bytes]:
    # OpenAI takes no seed: the picture's seed comes from the prompt, so it is repeatable.
    seed = seed_for(prompt)
    return [render_png(prompt, seed, asked.width, asked.height, i) for i in range(asked.n)]


async def generate_images(request: web.Request) -> web.StreamResponse:
    arrived = asyncio.get_running_loop().time()
    state = request.app[STATE]
    state.stats.requests += 1
    try:
        asked = ImageRequest.from_body(await request.json())
        knobs, prompt = text_directives(asked.prompt, request.headers)
    except ValueError as error:  # bad JSON, InvalidRequest and DirectiveError alike
        state.stats.by_outcome["invalid_request"] += 1
        if not isinstance(error, InvalidRequest | DirectiveError):
            return invalid_request("We could not parse the JSON body of your request.")
        return invalid_request(str(error), getattr(error, "param", None))

    fault = state.choose_fault(knobs, text_fault_key(asked.prompt))
    state.stats.by_outcome[fault or "ok"] += 1
    state.requests.append(
        {
            "endpoint": "/v1/images/generations",
            "model": asked.model,
            "tag": knobs.tag,
            "prompt": prompt[:120],
            "outcome": fault or "ok",
        }
    )
    if fault in HTTP_FAULTS:
        return fault_response(fault, knobs, state)
    return await _answer(request, state, asked, prompt, _delay(knobs, state), fault, arrived)


def _delay(knobs: Directives, state: SimState) -> float:
    """How long the answer takes: `duration`, else the `ttft` knob, else the run's ttft."""
    if knobs.duration is not None:
        return knobs.duration
    return knobs.ttft if knobs.ttft is not None else state.config.ttft


async def _answer(
    request: web.Request,
    state: SimState,
    asked: ImageRequest,
    prompt: str,
    delay: float,
    fault: str | None,
    arrived: float,
) -> web.StreamResponse:
    stats = state.stats
    try:
        if fault == "hang":
            await wait_for_client_to_leave(request)
            stats.canceled_by_client += 1
            return web.Response()
        if fault == "drop":
            await sleep_until(arrived + delay / 2)
            drop_connection(request)
            return web.Response()
        # Rendering is CPU work: off the event loop, so other requests keep their pace.
        pictures = await asyncio.get_running_loop().run_in_executor(
            None, render_batch, asked, prompt
        )
        await sleep_until(arrived + delay)
    except asyncio.CancelledError:
        stats.canceled_by_client += 1
        raise
    if client_gone(request):
        stats.canceled_by_client += 1
        return web.Response()
    text = compact_json(response_body(asked, prompt, pictures))
    if fault == "malformed":
        text = text[: len(text) // 2]  # a 200 whose body is cut off
    return web.Response(text=text, content_type="application/json")
