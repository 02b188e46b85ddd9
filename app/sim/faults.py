"""Fault kinds, run-wide fault rates, and the OpenAI-shaped error bodies of HTTP faults."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

# Faults answered with an HTTP error status instead of a completion.
HTTP_FAULTS: dict[str, tuple[int, str, str | None, str]] = {
    # kind: (status, error type, error code, message)
    "429": (
        429,
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for requests (simulated). Please try again later.",
    ),
    "500": (
        500,
        "server_error",
        None,
        "The server had an error while processing your request (simulated).",
    ),
    "400": (400, "invalid_request_error", "invalid_request", "Invalid request (simulated)."),
    "401": (
        401,
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect API key provided (simulated).",
    ),
}
# Faults that damage or stall a response that otherwise starts normally.
TRANSPORT_FAULTS = frozenset({"hang", "drop", "malformed"})
# Faults that change the content of structured (JSON) answers.
CONTENT_FAULTS = frozenset({"invalid_json", "schema_mismatch"})
# Faults of a ComfyUI prompt that was accepted: its execution fails midway.
EXECUTION_FAULTS = frozenset({"execution_error"})

FAULT_KINDS = frozenset(HTTP_FAULTS) | TRANSPORT_FAULTS | CONTENT_FAULTS | EXECUTION_FAULTS


class FaultSpecError(ValueError):
    """A fault rate list or directive names an unknown fault or an impossible rate."""


def error_body(
    message: str, error_type: str, code: str | None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


@dataclass(frozen=True)
class FaultRates:
    """Per-run probabilities of each fault, e.g. parsed from "429=0.05,500=0.02"."""

    rates: tuple[tuple[str, float], ...] = ()

    @classmethod
    def parse(cls, spec: str | None) -> FaultRates:
        if not spec or not spec.strip():
            return cls()
        rates: list[tuple[str, float]] = []
        for item in spec.split(","):
            if not item.strip():
                continue
            kind, sep, value = item.partition("=")
            kind = kind.strip()
            if not sep or kind not in FAULT_KINDS:
                raise FaultSpecError(f"bad fault rate {item.strip()!r}; kinds: {_kinds()}")
            try:
                rate = float(value)
            except ValueError as error:
                raise FaultSpecError(f"bad fault rate {item.strip()!r}") from error
            if not 0.0 <= rate <= 1.0:
                raise FaultSpecError(f"fault rate {item.strip()!r} is not within [0, 1]")
            rates.append((kind, rate))
        if sum(rate for _, rate in rates) > 1.0 + 1e-9:
            raise FaultSpecError(f"fault rates {spec!r} add up to more than 1")
        return cls(tuple(rates))

    def pick(self, rng: random.Random) -> str | None:
        """One random draw: a fault kind, or None for a normal answer."""
        if not self.rates:
            return None
        draw = rng.random()
        for kind, rate in self.rates:
            if draw < rate:
                return kind
            draw -= rate
        return None

    def __str__(self) -> str:
        return ",".join(f"{kind}={rate:g}" for kind, rate in self.rates)


def _kinds() -> str:
    return ", ".join(sorted(FAULT_KINDS))
