"""The admin API under /_sim/: counters for tests, and run defaults changed at run time."""

from __future__ import annotations

import random
from typing import Any

from aiohttp import web

from app.sim.config import BATCH_KNOBS
from app.sim.faults import FaultRates, FaultSpecError
from app.sim.state import STATE


async def get_stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(state.stats.as_dict() | state.batches.stats())


async def get_requests(request: web.Request) -> web.Response:
    """The latest requests (at most the last 2,000), oldest first: model, `tag` directive,
    the start of the system message and the outcome; `?tag=` keeps one tag's."""
    tag = request.query.get("tag")
    items = [entry for entry in request.app[STATE].requests if tag is None or entry["tag"] == tag]
    return web.json_response({"items": items})


async def post_reset(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.reset()
    return web.json_response(state.stats.as_dict() | state.batches.stats())


async def get_config(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].config.as_dict())


async def post_config(request: web.Request) -> web.Response:
    """Change run defaults.

    Body: any of {"ttft": s, "tps": n, "faults": "429=0.1", "retry_after": s, "step_time": s,
    "seed": n, "rate_limits": {model or "*": {"rpm": n, "period": s}}} (rate_limits replaces
    the run's; {} removes them), and the Batch API's seconds (config.BATCH_KNOBS).
    """
    config = request.app[STATE].config
    try:
        changes = await request.json()
        if not isinstance(changes, dict):
            raise ValueError("the body must be a JSON object")
        known = {"ttft", "tps", "faults", "retry_after", "step_time", "seed", "rate_limits"}
        known |= set(BATCH_KNOBS)
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
        # Validate everything before changing anything, so a bad request changes nothing.
        ttft = _seconds(changes, "ttft", config.ttft)
        tps = _seconds(changes, "tps", config.tps)
        retry_after = _seconds(changes, "retry_after", config.retry_after)
        step_time = _seconds(changes, "step_time", config.step_time)
        faults = _fault_rates(changes.get("faults"), config.faults)
        rate_limits = _rate_limits(changes.get("rate_limits"), config.rate_limits)
        batch_knobs = {name: _seconds(changes, name, getattr(config, name)) for name in BATCH_KNOBS}
    except (ValueError, FaultSpecError) as error:
        return web.json_response({"error": {"message": str(error)}}, status=400)
    config.ttft, config.tps, config.retry_after, config.faults = ttft, tps, retry_after, faults
    config.step_time = step_time
    for name, value in batch_knobs.items():
        setattr(config, name, value)
    if rate_limits is not config.rate_limits:
        config.rate_limits = rate_limits
        request.app[STATE].admitted.clear()
    if "seed" in changes:
        config.seed = changes["seed"]
        config.rng = random.Random(config.seed)
    return web.json_response(config.as_dict())


def _seconds(changes: dict[str, Any], key: str, current: float) -> float:
    if key not in changes:
        return current
    value = changes[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{key} must be a number >= 0")
    return float(value)


def _fault_rates(value: Any, current: FaultRates) -> FaultRates:
    if value is None:
        return current
    if isinstance(value, dict):  # {"429": 0.1} is accepted as well as "429=0.1"
        value = ",".join(f"{kind}={rate}" for kind, rate in value.items())
    if not isinstance(value, str):
        raise ValueError('faults must be a string like "429=0.05,500=0.02"')
    return FaultRates.parse(value)


def _rate_limits(value: Any, current: dict[str, tuple[int, float]]) -> dict[str, tuple[int, float]]:
    if value is None:
        return current
    if not isinstance(value, dict):
        raise ValueError('rate_limits must be an object like {"*": {"rpm": 60, "period": 60}}')
    limits: dict[str, tuple[int, float]] = {}
    for model, limit in value.items():
        if not isinstance(limit, dict) or set(limit) - {"rpm", "period"}:
            raise ValueError(f"rate_limits.{model} must be {{'rpm': n, 'period': s}}")
        rpm, period = limit.get("rpm"), limit.get("period", 60)
        if isinstance(rpm, bool) or not isinstance(rpm, int) or rpm < 1:
            raise ValueError(f"rate_limits.{model}.rpm must be an integer >= 1")
        if isinstance(period, bool) or not isinstance(period, int | float) or period <= 0:
            raise ValueError(f"rate_limits.{model}.period must be a number > 0")
        limits[model] = (rpm, float(period))
    return limits


def add_routes(app: web.Application) -> None:
    app.router.add_get("/_sim/stats", get_stats)
    app.router.add_get("/_sim/requests", get_requests)
    app.router.add_post("/_sim/reset", post_reset)
    app.router.add_get("/_sim/config", get_config)
    app.router.add_post("/_sim/config", post_config)
