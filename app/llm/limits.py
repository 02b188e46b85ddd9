"""Pool-wide provider limits: per model endpoint, requests and tokens per period, a pause set by
the provider's own 429, and a circuit breaker, all in Redis so that every worker process on
every host sees the same state (docs/reliability.md#provider-limits).

An endpoint is a model name as the job names it (`CONVEYOR_PROVIDER_LIMITS` is keyed by it,
`*` for every other model); its Redis keys also carry the provider's host (the client's
`provider`), so two deployments that share a Redis but not a provider do not share limits.

Why a Lua script of our own rather than the `limits` library's moving window (which the request
rate limiter uses): its moving window stores one list entry per unit of cost, so a token limit
would push thousands of entries per call and keep up to `tpm` of them, and a request limit and
a token limit would be two hits that are not atomic (a request counted for a call the token
limit then refuses). Here one script, one round trip, checks the pause, the breaker, the
request and the token limits and records the call; the sliding log holds one member per call
(`<id>:<tokens>`, scored by its time), so its size is bounded by the request rate.

A call that finds no capacity gets a `Wait`: the reason and the instant capacity is expected.
Callers that cannot wait that long take a turn (`reserve_turn`): a virtual time per endpoint,
advanced by one call's share of the period per reservation (GCRA's theoretical arrival time),
so waiting jobs come back one after the other in the order they arrived rather than all at
once, and a job that is not in the line waits behind it.

Clocks: the instants are the workers' own `time.time()`; hosts are expected to run NTP.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import redis

from app.llm.errors import ModelError

if TYPE_CHECKING:
    from app.config import EndpointLimits, Settings

logger = logging.getLogger(__name__)

PREFIX = "conveyor:provider"
WILDCARD = "*"
# An admission older than this when its call is sent is moved to the sending time (`stamp`).
STAMP_AFTER = 0.02
# Failures that count toward an endpoint's breaker: the provider is down or too slow, not a
# request it refused on its merits.
BREAKER_CODES = frozenset({"model_unavailable", "model_timeout", "model_connection_error"})


class WaitReason(StrEnum):
    RATE_LIMIT = "provider_rate_limit"
    PAUSED = "provider_paused"
    CIRCUIT_OPEN = "circuit_open"


@dataclass(frozen=True)
class Wait:
    """No capacity for the call now: why, and when there should be (epoch seconds)."""

    reason: WaitReason
    until: float
    endpoint: str


@dataclass(frozen=True)
class Ticket:
    """A call the limits admitted: its entry in the endpoint's sliding log."""

    endpoint: str
    member: str
    tokens: int
    at: float
    probe: bool  # the one call let through a half-open breaker
    breaker_armed: bool  # the breaker had failures counted when the call was admitted


class CapacityWait(Exception):
    """The job must wait for capacity longer than a slot may: it goes back to `queued`
    without consuming an attempt (app/execution/capacity.py)."""

    def __init__(self, wait: Wait, message: str | None = None) -> None:
        super().__init__(message or f"{wait.endpoint}: {wait.reason.value}")
        self.wait = wait
        self.message = str(self)


# KEYS: the sliding log (zset), the pause, the breaker (hash), the line's virtual time.
# ARGV: now, period, rpm (0: none), tpm (0: none), tokens, member, cooldown, in_turn.
# Returns {reason, until} or {"ok", probe, breaker_armed}.
ADMIT = """
local now = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local rpm = tonumber(ARGV[3])
local tpm = tonumber(ARGV[4])
local tokens = tonumber(ARGV[5])
local cooldown = tonumber(ARGV[7])
local paused = tonumber(redis.call('GET', KEYS[2]) or '0')
if paused > now then return {'provider_paused', tostring(paused)} end
local probe = 0
local open_until = tonumber(redis.call('HGET', KEYS[3], 'open_until') or '0')
if open_until > 0 then
  if now < open_until then return {'circuit_open', tostring(open_until)} end
  local probing = tonumber(redis.call('HGET', KEYS[3], 'probe_until') or '0')
  -- Another call is the probe: look again soon, its answer decides (not a whole cooldown).
  if probing > now then return {'circuit_open', tostring(math.min(probing, now + 1))} end
  probe = 1
end
if ARGV[8] == '0' then
  local line = tonumber(redis.call('GET', KEYS[4]) or '0')
  if line > now then return {'provider_rate_limit', tostring(line)} end
end
if rpm > 0 or tpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - period)
  local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
  local count = #entries / 2
  if rpm > 0 and count >= rpm then
    return {'provider_rate_limit', tostring(tonumber(entries[(count - rpm) * 2 + 2]) + period)}
  end
  if tpm > 0 and count > 0 then
    local used = 0
    for i = 1, #entries, 2 do
      used = used + tonumber(string.match(entries[i], ':(%d+)$'))
    end
    if used + tokens > tpm then
      local free_at = tonumber(entries[#entries]) + period
      for i = 1, #entries, 2 do
        used = used - tonumber(string.match(entries[i], ':(%d+)$'))
        if used + tokens <= tpm then
          free_at = tonumber(entries[i + 1]) + period
          break
        end
      end
      return {'provider_rate_limit', tostring(free_at)}
    end
  end
  redis.call('ZADD', KEYS[1], now, ARGV[6])
  redis.call('PEXPIRE', KEYS[1], math.ceil(period * 1000) + 1000)
end
if probe == 1 then
  redis.call('HSET', KEYS[3], 'probe_until', tostring(now + cooldown))
end
return {'ok', tostring(probe), tostring(redis.call('EXISTS', KEYS[3]))}
"""

# A call's entry rewritten with the tokens its usage reported, at its original time (the tokens
# were spent then, and leave the window when the call does). Nothing if it left already.
RECONCILE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], score, ARGV[2])
return 1
"""

# The next turn in the endpoint's line: not before `now` nor `floor` (when capacity is due),
# and `interval` after the previous turn. ARGV: now, floor, interval.
RESERVE = """
local now = tonumber(ARGV[1])
local turn = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now, tonumber(ARGV[2]))
local next = turn + tonumber(ARGV[3])
redis.call('SET', KEYS[1], tostring(next), 'PX', math.ceil((next - now) * 1000) + 60000)
return tostring(turn)
"""

# The endpoint paused until ARGV[1], only ever extended. KEYS: the pause, the statistics.
# Returns {1 if this began a new pause, the pause's end}.
PAUSE = """
local now = tonumber(ARGV[2])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current >= tonumber(ARGV[1]) then return {0, tostring(current)} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', math.ceil((tonumber(ARGV[1]) - now) * 1000) + 1000)
if current <= now then
  redis.call('HINCRBY', KEYS[2], 'pauses', 1)
  return {1, ARGV[1]}
end
return {0, ARGV[1]}
"""

# One more consecutive failure; the breaker opens (again) at the threshold or when the failing
# call was the half-open probe. KEYS: the breaker, the statistics.
# ARGV: now, threshold, cooldown, probe. Returns 1 when it opened.
FAIL = """
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
redis.call('EXPIRE', KEYS[1], 86400)
if ARGV[4] == '1' or failures >= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'open_until', tostring(tonumber(ARGV[1]) + tonumber(ARGV[3])))
  redis.call('HDEL', KEYS[1], 'probe_until')
  redis.call('HINCRBY', KEYS[2], 'opened', 1)
  return 1
end
return 0
"""


def window(period: float) -> float:
    """The window the limiter counts: the period and a guard of 1 % of it (at most half a
    second). A call is counted when it is sent and the provider counts it when it arrives; the
    arrivals of a burst spread over tens of milliseconds under load, and without the guard a
    call sent exactly one period after the burst could arrive inside the provider's window."""
    return period + min(0.5, period / 100)


def estimate_tokens(messages: Any, max_tokens: int | None, default_output: int) -> int:
    """A call's tokens before it is made: its prompt at about 4 characters a token, plus the
    most it may answer (its max_tokens, else the configured default)."""
    if isinstance(messages, list):
        chars = sum(len(str(m.get("content", ""))) for m in messages if isinstance(m, dict))
    else:
        chars = len(str(messages))
    return chars // 4 + 1 + (max_tokens or default_output)


class ProviderLimits:
    """The limits of the endpoints CONVEYOR_PROVIDER_LIMITS names. Built only when it names
    one: with none configured, model calls make no Redis call at all."""

    def __init__(self, settings: Settings, redis_client: redis.Redis, provider: str) -> None:
        self.endpoints = dict(settings.provider_limits)
        self.short_wait = settings.provider_short_wait
        self.default_output = settings.budget_default_output_tokens
        self._redis = redis_client
        self._provider = provider
        self._admit = redis_client.register_script(ADMIT)
        self._reconcile = redis_client.register_script(RECONCILE)
        self._reserve = redis_client.register_script(RESERVE)
        self._pause = redis_client.register_script(PAUSE)
        self._fail = redis_client.register_script(FAIL)

    @classmethod
    def of(
        cls, settings: Settings, redis_client: redis.Redis | None, provider: str
    ) -> ProviderLimits | None:
        if not settings.provider_limits or redis_client is None:
            return None
        return cls(settings, redis_client, provider)

    def governs(self, model: str | None) -> EndpointLimits | None:
        if model is None:
            return None
        return self.endpoints.get(model) or self.endpoints.get(WILDCARD)

    def key(self, model: str, part: str) -> str:
        return f"{PREFIX}:{self._provider}/{model}:{part}"

    def estimate(self, messages: Any, max_tokens: int | None) -> int:
        return estimate_tokens(messages, max_tokens, self.default_output)

    # Admission --------------------------------------------------------------------------------

    def admit(self, model: str, tokens: int, *, in_turn: bool = False) -> Ticket | Wait:
        """One attempt to admit a call now. `in_turn`: the caller waited for its turn in the
        line, so the line does not send it back."""
        limits = self._limits(model)
        now = time.time()
        member = f"{uuid.uuid4().hex}:{tokens if limits.tpm else 0}"
        answer = self._admit(
            keys=[
                self.key(model, "log"),
                self.key(model, "pause"),
                self.key(model, "breaker"),
                self.key(model, "line"),
            ],
            args=[
                repr(now),
                repr(window(limits.period)),
                limits.rpm or 0,
                limits.tpm or 0,
                tokens if limits.tpm else 0,
                member,
                repr(limits.cooldown),
                1 if in_turn else 0,
            ],
        )
        status = _text(answer[0])
        if status != "ok":
            return Wait(WaitReason(status), float(_text(answer[1])), model)
        return Ticket(
            model,
            member,
            tokens if limits.tpm else 0,
            now,
            probe=_text(answer[1]) == "1",
            breaker_armed=_text(answer[2]) == "1",
        )

    def reserve_turn(self, wait: Wait, tokens: int) -> float:
        """The instant of this caller's turn (epoch seconds): not before `wait.until`, one
        call's share of the period after the previous turn."""
        limits = self._limits(wait.endpoint)
        interval = 0.0
        if limits.rpm:
            interval = limits.period / limits.rpm
        if limits.tpm:
            interval = max(interval, limits.period * min(tokens, limits.tpm) / limits.tpm)
        turn = self._reserve(
            keys=[self.key(wait.endpoint, "line")],
            args=[repr(time.time()), repr(wait.until), repr(interval)],
        )
        return float(_text(turn))

    def acquire(
        self,
        model: str,
        tokens: int,
        interrupted: Callable[[], bool] = lambda: False,
        *,
        in_turn: bool = False,
    ) -> Ticket:
        """Admits a call, waiting in the slot for capacity due within `provider_short_wait`;
        CapacityWait when it is due later."""
        waited = in_turn
        while True:
            outcome = self.admit(model, tokens, in_turn=waited)
            if isinstance(outcome, Ticket):
                return outcome
            delay = outcome.until - time.time()
            if delay > self.short_wait or interrupted():
                raise CapacityWait(outcome)
            # Waiting in the slot keeps the job's place: it is the next to be admitted.
            waited = waited or outcome.reason is WaitReason.RATE_LIMIT
            time.sleep(max(0.01, delay))

    def stamp(self, ticket: Ticket) -> Ticket:
        """The call is being sent now: an admission taken earlier (before the job's claim)
        moves its entry to this instant, so that the window the limiter counts is the one the
        provider sees (admitted at t and sent at t + 0.5 s, the call would otherwise leave the
        limiter's window half a second before it leaves the provider's). Moving an entry later
        never lets more calls into any window."""
        now = time.time()
        if now - ticket.at < STAMP_AFTER:
            return ticket
        self._redis.zadd(self.key(ticket.endpoint, "log"), {ticket.member: now}, xx=True)
        return replace(ticket, at=now)

    def release(self, ticket: Ticket) -> None:
        """A call admitted but never made (the job could not be claimed)."""
        self._redis.zrem(self.key(ticket.endpoint, "log"), ticket.member)

    # After the call ---------------------------------------------------------------------------

    def settle(
        self, ticket: Ticket, tokens_used: int | None, error: BaseException | None
    ) -> Wait | None:
        """The call's outcome: its tokens reconciled with the usage, the breaker told, and a
        provider 429 turned into a pause of the endpoint. Returns the pause's Wait after a 429.

        Reconciling lowers as well as raises: the estimate counts the answer's whole
        max_tokens, which is a ceiling, and keeping it would leave the token limit well under
        what the provider allows. A provider that counts max_tokens itself (OpenAI does, for
        its own limit) is served by setting `tpm` a little under its figure."""
        limits = self._limits(ticket.endpoint)
        if limits.tpm and tokens_used is not None and tokens_used != ticket.tokens:
            endpoint, head = ticket.endpoint, ticket.member.rsplit(":", 1)[0]
            self._reconcile(
                keys=[self.key(endpoint, "log")], args=[ticket.member, f"{head}:{tokens_used}"]
            )
        if isinstance(error, ModelError) and error.code == "model_rate_limited":
            return self.pause(ticket.endpoint, error.retry_after)
        if isinstance(error, ModelError) and error.code in BREAKER_CODES:
            self._record_failure(ticket, limits)
        elif error is None and (ticket.breaker_armed or ticket.probe):
            self._redis.delete(self.key(ticket.endpoint, "breaker"))
        return None

    def pause(self, model: str, retry_after: float | None) -> Wait:
        """Every process stops calling the endpoint until the provider's Retry-After has
        passed (a second when it gave none); an existing longer pause is kept."""
        now = time.time()
        until = now + (retry_after if retry_after is not None else 1.0)
        began, current = self._pause(
            keys=[self.key(model, "pause"), self.key(model, "stats")],
            args=[repr(until), repr(now)],
        )
        if int(began):
            logger.warning("provider endpoint %s paused for %.1f s (429)", model, until - now)
        return Wait(WaitReason.PAUSED, float(_text(current)), model)

    def _record_failure(self, ticket: Ticket, limits: EndpointLimits) -> None:
        opened = self._fail(
            keys=[self.key(ticket.endpoint, "breaker"), self.key(ticket.endpoint, "stats")],
            args=[repr(time.time()), limits.failures, repr(limits.cooldown), int(ticket.probe)],
        )
        if int(opened):
            logger.warning(
                "circuit breaker of %s open for %.0f s", ticket.endpoint, limits.cooldown
            )

    def stats(self, model: str) -> dict[str, int]:
        """How often the endpoint was paused and its breaker opened (for operators, benches)."""
        raw = self._redis.hgetall(self.key(model, "stats"))
        return {_text(name): int(value) for name, value in raw.items()}

    def _limits(self, model: str) -> EndpointLimits:
        limits = self.governs(model)
        if limits is None:
            raise KeyError(f"no provider limits for {model!r}")
        return limits


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
