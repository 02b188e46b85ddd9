"""Run-wide simulator settings: the defaults every request falls back to."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from app.sim.faults import FaultRates

DEFAULT_TTFT = 0.05
DEFAULT_TPS = 200.0
DEFAULT_RETRY_AFTER = 1.0
# Seconds per sampling step of a ComfyUI prompt: 20 steps take 0.4 s.
DEFAULT_STEP_TIME = 0.02
# A Batch API batch's phases, seconds (app/sim/batches.py).
DEFAULT_BATCH_VALIDATING = 0.2
DEFAULT_BATCH_SECONDS = 2.0
DEFAULT_BATCH_FINALIZING = 0.2


BATCH_KNOBS = (
    "batch_validating",
    "batch_seconds",
    "batch_finalizing",
    "file_upload_delay",
    "batch_create_delay",
)


@dataclass
class SimConfig:
    """Mutable on purpose: the admin API changes these while the server runs."""

    ttft: float = DEFAULT_TTFT
    tps: float = DEFAULT_TPS
    faults: FaultRates = field(default_factory=FaultRates)
    retry_after: float = DEFAULT_RETRY_AFTER
    step_time: float = DEFAULT_STEP_TIME
    seed: int | None = None
    # model (or "*" for every model) -> (requests, period in seconds): more requests than that
    # in any period are answered 429 with the Retry-After of the window's next free place.
    rate_limits: dict[str, tuple[int, float]] = field(default_factory=dict)
    # The Batch API (app/sim/batches.py): how long a batch validates, runs and finalizes, and
    # how long an upload or a batch's create waits before it is answered (after it is done).
    batch_validating: float = DEFAULT_BATCH_VALIDATING
    batch_seconds: float = DEFAULT_BATCH_SECONDS
    batch_finalizing: float = DEFAULT_BATCH_FINALIZING
    file_upload_delay: float = 0.0
    batch_create_delay: float = 0.0
    # Seeded once so a run with the same seed and request order injects the same faults.
    rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def as_dict(self) -> dict[str, object]:
        return {
            "ttft": self.ttft,
            "tps": self.tps,
            "faults": str(self.faults),
            "retry_after": self.retry_after,
            "step_time": self.step_time,
            "seed": self.seed,
            **{name: getattr(self, name) for name in BATCH_KNOBS},
            "rate_limits": {
                model: {"rpm": requests, "period": period}
                for model, (requests, period) in self.rate_limits.items()
            },
        }
