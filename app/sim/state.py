"""What one simulator app keeps between requests."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from app.sim.batches_store import Batches
from app.sim.config import SimConfig
from app.sim.directives import NO_FAULT, Directives, FaultCounter
from app.sim.stats import SimStats

REQUEST_LOG = 2_000


@dataclass
class SimState:
    config: SimConfig
    stats: SimStats = field(default_factory=SimStats)
    fault_counter: FaultCounter = field(default_factory=FaultCounter)
    # The latest requests (GET /_sim/requests), bounded so a benchmark cannot grow it forever.
    requests: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=REQUEST_LOG))
    # Arrival times of the requests each rate limit let through, by the limit's key.
    admitted: dict[str, deque[float]] = field(default_factory=dict)
    # The Batch API's files and batches (app/sim/batches.py).
    batches: Batches = field(default_factory=Batches)

    def over_rate_limit(self, model: str, now: float) -> float | None:
        """None if the run's rate limit of `model` (or `*`) lets the request through (it is
        then counted), else the seconds until the window has room: its Retry-After."""
        key = model if model in self.config.rate_limits else "*"
        limit = self.config.rate_limits.get(key)
        if limit is None:
            return None
        requests, period = limit
        times = self.admitted.setdefault(key, deque())
        while times and times[0] <= now - period:
            times.popleft()
        if len(times) >= requests:
            return times[len(times) - requests] + period - now
        times.append(now)
        return None

    def choose_fault(self, knobs: Directives, messages_hash: int) -> str | None:
        """The fault for one request: its own directive if any, else the run's random rates."""
        if knobs.fault is not None:
            if knobs.fault == NO_FAULT:
                return None
            return (
                knobs.fault if self.fault_counter.should_fault(messages_hash, knobs.times) else None
            )
        return self.config.faults.pick(self.config.rng)

    def retry_after(self, knobs: Directives) -> float:
        """The Retry-After of a 429 fault: the request's knob, else the run's."""
        return knobs.retry_after if knobs.retry_after is not None else self.config.retry_after

    def reset(self) -> None:
        self.stats.reset()
        self.fault_counter.reset()
        self.requests.clear()
        self.admitted.clear()
        self.batches.reset()


STATE = web.AppKey("sim_state", SimState)
