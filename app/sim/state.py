"""What one simulator app keeps between requests."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

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


STATE = web.AppKey("sim_state", SimState)
