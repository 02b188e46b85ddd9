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
    # TCP connections chat requests came on: a client that reuses its connections opens far
    # fewer than it makes requests.
    connections: int = 0
    _peers: set[Any] = field(default_factory=set, repr=False)

    def request_from(self, peer: Any) -> None:
        """A request from `peer` (the client's address and port, one per connection)."""
        if peer not in self._peers:
            self._peers.add(peer)
            self.connections += 1

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
        self.connections = 0
        self._peers.clear()
        self.streams_max = self.streams_active

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "streams_active": self.streams_active,
            "streams_max": self.streams_max,
            "by_outcome": dict(self.by_outcome),
            "canceled_by_client": self.canceled_by_client,
            "completion_tokens_sent": self.completion_tokens_sent,
            "connections": self.connections,
        }
