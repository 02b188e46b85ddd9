"""Counters the admin API reports, so tests can assert what the simulator saw."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SimStats:
    requests: int = 0
    streams_active: int = 0
    streams_max: int = 0
    by_outcome: Counter[str] = field(default_factory=Counter)
    canceled_by_client: int = 0
    completion_tokens_sent: int = 0

    def stream_started(self) -> None:
        self.streams_active += 1
        self.streams_max = max(self.streams_max, self.streams_active)

    def stream_ended(self) -> None:
        self.streams_active -= 1

    def reset(self) -> None:
        # Streams still running will count themselves down, so their number must survive.
        self.requests = 0
        self.by_outcome.clear()
        self.canceled_by_client = 0
        self.completion_tokens_sent = 0
        self.streams_max = self.streams_active

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "streams_active": self.streams_active,
            "streams_max": self.streams_max,
            "by_outcome": dict(self.by_outcome),
            "canceled_by_client": self.canceled_by_client,
            "completion_tokens_sent": self.completion_tokens_sent,
        }
