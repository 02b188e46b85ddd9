"""What one simulator app keeps between requests."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from app.sim.config import SimConfig
from app.sim.directives import NO_FAULT, Directives, FaultCounter
from app.sim.stats import SimStats


@dataclass
class SimState:
    config: SimConfig
    stats: SimStats = field(default_factory=SimStats)
    fault_counter: FaultCounter = field(default_factory=FaultCounter)

    def choose_fault(self, knobs: Directives, messages_hash: int) -> str | None:
        """The fault for one request: its own directive if any, else the run's random rates."""
        if knobs.fault is not None:
            if knobs.fault == NO_FAULT:
                return None
            return (
                knobs.fault if self.fault_counter.should_fault(messages_hash, knobs.times) else None
            )
        return self.config.faults.pick(self.config.rng)

    def reset(self) -> None:
        self.stats.reset()
        self.fault_counter.reset()


STATE = web.AppKey("sim_state", SimState)
