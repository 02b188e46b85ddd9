"""When each token of an answer is due, relative to the moment the request arrived."""

from __future__ import annotations

from dataclasses import dataclass

# Tokens due within this window of each other go out in one socket write. Each SSE event is
# still its own token; only the syscalls and wake-ups are shared, which is what costs CPU.
MIN_WRITE_WINDOW = 0.01
# Per concurrent stream, widen the window so that total writes per second stay bounded
# (at most ~10,000 per second whatever the number of streams: 1,000 streams -> 100 ms), so
# the simulator never becomes a benchmark's bottleneck.
WINDOW_PER_ACTIVE_STREAM = 0.0001


@dataclass(frozen=True)
class Schedule:
    token_offsets: tuple[float, ...]  # seconds after arrival at which each token is due
    end: float  # seconds after arrival at which the answer is complete

    @property
    def first(self) -> float:
        return self.token_offsets[0] if self.token_offsets else self.end


def schedule(count: int, ttft: float, tps: float, duration: float | None) -> Schedule:
    """Token i is due at ttft + i/tps; with `duration`, tokens spread to end at exactly it.

    tps == 0 means no delay between tokens (all due at ttft).
    """
    if duration is not None:
        first = min(ttft, duration)
        if count <= 1:
            return Schedule((first,) * count, duration)
        step = (duration - first) / (count - 1)
        return Schedule(tuple(first + step * i for i in range(count)), duration)
    if count == 0:
        return Schedule((), ttft)
    step = 1.0 / tps if tps > 0 else 0.0
    offsets = tuple(ttft + step * i for i in range(count))
    return Schedule(offsets, offsets[-1])


def write_window(active_streams: int) -> float:
    return max(MIN_WRITE_WINDOW, active_streams * WINDOW_PER_ACTIVE_STREAM)


def group_end(offsets: tuple[float, ...], start: int, window: float) -> int:
    """Index after the last token due within `window` of token `start`."""
    limit = offsets[start] + window
    end = start + 1
    while end < len(offsets) and offsets[end] < limit:
        end += 1
    return end
