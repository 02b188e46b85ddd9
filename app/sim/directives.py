"""Per-request knobs: `[[sim key=value ...]]` in the last user message (or in an image
prompt), or X-Sim-* headers.

Tests and benchmarks steer single calls through the real client this way, without any
side channel: the directive travels inside the prompt the code under test sends anyway.

A block may name a step (`[[sim step=lorebook fault=http_500]]`): it then applies only to
requests whose `STEP_HEADER` names that step, as a multi-step job's calls do, so one prompt can
steer each step of a pipeline on its own.
"""

from __future__ import annotations

import re
import zlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from app.sim.faults import FAULT_KINDS
from app.sim.text import message_text

_DIRECTIVE = re.compile(r"\[\[\s*sim\b(?P<body>[^\]]*)\]\]", re.IGNORECASE)
_PAIR = re.compile(r"(?P<key>[A-Za-z_]+)\s*=\s*(?P<value>[^\s\]]+)")

HEADER_PREFIX = "X-Sim-"
STEP_HEADER = "X-Conveyor-Step"
NO_FAULT = "none"
NO_COST = -1.0  # `cost=none`
_TAG = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class DirectiveError(ValueError):
    """A directive a test author wrote wrong; answered with a 400 so the typo is noticed."""


@dataclass(frozen=True)
class Directives:
    """Knobs for one request; None means "not given here, fall back"."""

    fault: str | None = None
    times: int | None = None
    retry_after: float | None = None
    ttft: float | None = None
    tps: float | None = None
    tokens: int | None = None
    duration: float | None = None
    # Seconds per sampling step of a ComfyUI prompt.
    step_time: float | None = None
    # The usage's reported cost: a number of USD, or NO_COST to leave it out.
    cost: float | None = None
    # A label the request log (GET /_sim/requests) keeps, so a test can find its requests.
    tag: str | None = None
    # Steers a whole Batch API batch when any of its requests carries it: "expire" or "fail"
    # (app/sim/batches.py).
    batch: str | None = None

    def over(self, fallback: Directives) -> Directives:
        """These directives, with fields they leave unset taken from `fallback`."""
        given = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(fallback, **{k: v for k, v in given.items() if v is not None})


def _parse_fault(value: str) -> str:
    kind = value.strip().lower()
    # "none" asks for a normal answer even when the run injects random faults.
    if kind not in FAULT_KINDS and kind != NO_FAULT:
        raise DirectiveError(
            f"unknown sim fault {value!r}; kinds: {', '.join(sorted(FAULT_KINDS))}"
        )
    return kind


def _parse_count(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("negative")
    return number


def _parse_seconds(value: str) -> float:
    number = float(value)
    if not number >= 0:  # also rejects NaN
        raise ValueError("negative")
    return number


def _parse_cost(value: str) -> float:
    if value.strip().lower() == "none":
        return NO_COST
    return _parse_seconds(value)  # any number >= 0


def _parse_batch(value: str) -> str:
    mode = value.strip().lower()
    if mode not in ("expire", "fail"):
        raise ValueError("a batch directive is expire or fail")
    return mode


def _parse_tag(value: str) -> str:
    if not _TAG.match(value):
        raise ValueError("a tag is 1 to 64 letters, digits or _.:-")
    return value


_PARSERS: dict[str, Any] = {
    "fault": _parse_fault,
    "times": _parse_count,
    "retry_after": _parse_seconds,
    "ttft": _parse_seconds,
    "tps": _parse_seconds,
    "tokens": _parse_count,
    "duration": _parse_seconds,
    "step_time": _parse_seconds,
    "cost": _parse_cost,
    "tag": _parse_tag,
    "batch": _parse_batch,
}


def parse_pairs(pairs: Mapping[str, str]) -> Directives:
    values: dict[str, Any] = {}
    for raw_key, raw_value in pairs.items():
        key = raw_key.strip().lower().replace("-", "_")
        parser = _PARSERS.get(key)
        if parser is None:
            raise DirectiveError(f"unknown sim knob {raw_key!r}; knobs: {', '.join(_PARSERS)}")
        try:
            values[key] = parser(raw_value)
        except DirectiveError:
            raise
        except ValueError as error:
            raise DirectiveError(f"bad value for sim knob {raw_key}: {raw_value!r}") from error
    return Directives(**values)


def parse_directive_text(text: str, step: str | None = None) -> tuple[Directives, str]:
    """Directives found in `text` (a later block wins) and the text without them. A block that
    names a step counts only for a request of that `step`."""
    pairs: dict[str, str] = {}
    for block in _DIRECTIVE.finditer(text):
        found = {m.group("key").lower(): m.group("value") for m in _PAIR.finditer(block["body"])}
        scope = found.pop("step", None)
        if scope is None or scope == step:
            pairs.update(found)
    cleaned = _DIRECTIVE.sub("", text).strip()
    return parse_pairs(pairs), cleaned


def parse_headers(headers: Mapping[str, str]) -> Directives:
    """Directives from X-Sim-* headers (X-Sim-Fault, X-Sim-Retry-After, ...); these are not
    scoped to a step."""
    pairs = {
        name[len(HEADER_PREFIX) :]: value
        for name, value in headers.items()
        if name.lower().startswith(HEADER_PREFIX.lower())
    }
    return parse_pairs(pairs)


def directive_message(messages: Sequence[Any]) -> str:
    """The text of the last user message that carries a directive, else of the last user
    message. Looking past the last message lets a follow-up turn (a repair request, say)
    keep the conversation's knobs."""
    last_user = ""
    for message in reversed(messages):
        if isinstance(message, Mapping) and message.get("role") == "user":
            text = message_text(message)
            if _DIRECTIVE.search(text):
                return text
            last_user = last_user or text
    return last_user


def request_directives(messages: Sequence[Any], headers: Mapping[str, str]) -> Directives:
    """The knobs of one request: the message directive wins over headers."""
    knobs, _ = text_directives(directive_message(messages), headers)
    return knobs


def text_directives(text: str, headers: Mapping[str, str]) -> tuple[Directives, str]:
    """The knobs of a request whose directives travel in `text` (a chat message, an image
    prompt), over those of its headers; and `text` without its directives."""
    from_text, cleaned = parse_directive_text(text, headers.get(STEP_HEADER))
    return from_text.over(parse_headers(headers)), cleaned


def fault_key(messages: Sequence[Any]) -> int:
    """What `times=N` counts: requests carrying the same directive message, so every turn of
    one conversation draws on the same budget."""
    return text_fault_key(directive_message(messages))


def text_fault_key(text: str) -> int:
    """What `times=N` counts for a request steered by one text (an image prompt): requests
    carrying the same text."""
    return zlib.crc32(text.encode())


class FaultCounter:
    """Counts requests per messages hash so `times=N` faults only the first N of them."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self._counts: OrderedDict[int, int] = OrderedDict()
        self._max_keys = max_keys

    def should_fault(self, key: int, times: int | None) -> bool:
        if times is None:
            return True
        count = self._counts.pop(key, 0) + 1
        self._counts[key] = count
        # Forget the oldest hashes so a long benchmark cannot grow this without bound.
        while len(self._counts) > self._max_keys:
            self._counts.popitem(last=False)
        return count <= times

    def reset(self) -> None:
        self._counts.clear()
