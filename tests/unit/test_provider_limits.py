"""The provider limits' Redis logic (app/llm/limits.py) on fakeredis, Lua scripts included, and
the validation of CONVEYOR_PROVIDER_LIMITS. The same scripts run against the real Redis, with
real workers and the simulator, in tests/integration/test_provider_limits.py."""

from __future__ import annotations

import time
from collections.abc import Iterator

import fakeredis
import pytest
from pydantic import ValidationError

from app.config import Settings
from app.config import testing_settings as settings_for_tests
from app.llm.errors import ModelError
from app.llm.limits import (
    CapacityWait,
    ProviderLimits,
    Ticket,
    Wait,
    WaitReason,
    estimate_tokens,
)


@pytest.fixture
def redis_client() -> Iterator[fakeredis.FakeRedis]:
    client = fakeredis.FakeRedis()
    yield client
    client.flushall()


def limits_of(redis_client: fakeredis.FakeRedis, **endpoints: dict[str, float]) -> ProviderLimits:
    settings = settings_for_tests(provider_limits=endpoints, provider_short_wait=0.0)
    limits = ProviderLimits.of(settings, redis_client, "sim")
    assert limits is not None
    return limits


def test_no_limits_configured_means_no_limiter() -> None:
    assert ProviderLimits.of(settings_for_tests(), fakeredis.FakeRedis(), "sim") is None


def test_the_request_limit_admits_rpm_calls_per_period_and_says_when_the_next_fits(
    redis_client: fakeredis.FakeRedis,
) -> None:
    limits = limits_of(redis_client, m={"rpm": 3, "period": 10})
    started = time.time()
    admitted = [limits.admit("m", 1) for _ in range(3)]
    assert all(isinstance(ticket, Ticket) for ticket in admitted)
    refused = limits.admit("m", 1)
    assert isinstance(refused, Wait)
    assert refused.reason is WaitReason.RATE_LIMIT
    # The oldest call leaves the window one period after it was admitted.
    assert started + 10 - 0.5 < refused.until < time.time() + 10 + 0.5


def test_a_released_admission_gives_its_place_back(redis_client: fakeredis.FakeRedis) -> None:
    limits = limits_of(redis_client, m={"rpm": 1, "period": 10})
    ticket = limits.admit("m", 1)
    assert isinstance(ticket, Ticket)
    limits.release(ticket)
    assert isinstance(limits.admit("m", 1), Ticket)


def test_the_token_limit_counts_estimates_and_reconciles_with_the_usage(
    redis_client: fakeredis.FakeRedis,
) -> None:
    limits = limits_of(redis_client, m={"tpm": 1000, "period": 10})
    first = limits.admit("m", 600)
    assert isinstance(first, Ticket)
    # 600 + 500 > 1000: the second call waits ...
    assert isinstance(limits.admit("m", 500), Wait)
    # ... until the first reports that it used 100 tokens, not 600.
    assert limits.settle(first, 100, None) is None
    second = limits.admit("m", 500)
    assert isinstance(second, Ticket)
    # A call that used more than estimated counts what it used: 100 + 900 leaves no room.
    limits.settle(second, 900, None)
    assert isinstance(limits.admit("m", 1), Wait)


def test_a_call_larger_than_the_token_limit_goes_alone(redis_client: fakeredis.FakeRedis) -> None:
    limits = limits_of(redis_client, m={"tpm": 100, "period": 10})
    assert isinstance(limits.admit("m", 5000), Ticket)
    assert isinstance(limits.admit("m", 1), Wait)


def test_turns_are_spaced_by_a_calls_share_of_the_period(
    redis_client: fakeredis.FakeRedis,
) -> None:
    limits = limits_of(redis_client, m={"rpm": 4, "period": 8})
    floor = time.time() + 5
    wait = Wait(WaitReason.RATE_LIMIT, floor, "m")
    turns = [limits.reserve_turn(wait, 1) for _ in range(3)]
    assert turns[0] == pytest.approx(floor, abs=0.01)
    assert turns[1] - turns[0] == pytest.approx(2.0)
    assert turns[2] - turns[1] == pytest.approx(2.0)
    # While the line is long, a newcomer is sent to its end, and a job in its turn is not.
    line = limits.admit("m", 1)
    assert isinstance(line, Wait)
    assert line.until == pytest.approx(turns[2] + 2.0)
    assert isinstance(limits.admit("m", 1, in_turn=True), Ticket)


def test_a_429_pauses_the_endpoint_and_a_pause_is_only_ever_extended(
    redis_client: fakeredis.FakeRedis,
) -> None:
    limits = limits_of(redis_client, m={"rpm": 100})
    ticket = limits.admit("m", 1)
    assert isinstance(ticket, Ticket)
    error = ModelError("model_rate_limited", "429", retryable=True, retry_after=30)
    pause = limits.settle(ticket, None, error)
    assert pause is not None
    assert pause.reason is WaitReason.PAUSED
    waiting = limits.admit("m", 1)
    assert isinstance(waiting, Wait)
    assert waiting.reason is WaitReason.PAUSED
    assert waiting.until == pytest.approx(pause.until)
    shorter = limits.pause("m", 5)
    assert shorter.until == pytest.approx(pause.until)
    assert limits.pause("m", 60).until > pause.until
    assert limits.stats("m") == {"pauses": 1}


def test_the_breaker_opens_after_consecutive_failures_probes_once_and_closes(
    redis_client: fakeredis.FakeRedis,
) -> None:
    limits = limits_of(redis_client, m={"failures": 2, "cooldown": 0.3})
    down = ModelError("model_unavailable", "HTTP 500", retryable=True)
    for _ in range(2):
        ticket = limits.admit("m", 1)
        assert isinstance(ticket, Ticket)
        limits.settle(ticket, None, down)
    opened = limits.admit("m", 1)
    assert isinstance(opened, Wait)
    assert opened.reason is WaitReason.CIRCUIT_OPEN
    time.sleep(0.35)
    probe = limits.admit("m", 1)
    assert isinstance(probe, Ticket)
    assert probe.probe
    # Exactly one probe: the others wait for its answer.
    other = limits.admit("m", 1)
    assert isinstance(other, Wait)
    assert other.reason is WaitReason.CIRCUIT_OPEN
    # The probe fails: open again for a cooldown.
    limits.settle(probe, None, ModelError("model_timeout", "slow", retryable=True))
    assert isinstance(limits.admit("m", 1), Wait)
    time.sleep(0.35)
    probe = limits.admit("m", 1)
    assert isinstance(probe, Ticket)
    assert probe.probe
    limits.settle(probe, 10, None)
    closed = limits.admit("m", 1)
    assert isinstance(closed, Ticket)
    assert not closed.probe
    assert limits.stats("m") == {"opened": 2}


def test_a_success_between_failures_resets_the_count(redis_client: fakeredis.FakeRedis) -> None:
    limits = limits_of(redis_client, m={"failures": 2, "cooldown": 30})
    down = ModelError("model_unavailable", "HTTP 503", retryable=True)
    for error in (down, None, down):
        ticket = limits.admit("m", 1)
        assert isinstance(ticket, Ticket)
        limits.settle(ticket, 1, error)
    assert isinstance(limits.admit("m", 1), Ticket)


def test_refusals_on_the_merits_do_not_count_toward_the_breaker(
    redis_client: fakeredis.FakeRedis,
) -> None:
    limits = limits_of(redis_client, m={"failures": 1, "cooldown": 30})
    ticket = limits.admit("m", 1)
    assert isinstance(ticket, Ticket)
    limits.settle(ticket, None, ModelError("model_bad_request", "400", retryable=False))
    assert isinstance(limits.admit("m", 1), Ticket)


def test_acquire_waits_short_waits_in_the_slot_and_raises_for_long_ones(
    redis_client: fakeredis.FakeRedis,
) -> None:
    settings = settings_for_tests(
        provider_limits={"m": {"rpm": 1, "period": 0.5}, "slow": {"rpm": 1, "period": 60}},
        provider_short_wait=1.0,
    )
    limits = ProviderLimits(settings, redis_client, "sim")
    limits.acquire("m", 1)
    started = time.monotonic()
    limits.acquire("m", 1)
    assert 0.3 < time.monotonic() - started < 2.0
    limits.acquire("slow", 1)
    with pytest.raises(CapacityWait) as raised:
        limits.acquire("slow", 1)
    assert raised.value.wait.reason is WaitReason.RATE_LIMIT


def test_the_wildcard_entry_governs_every_other_model(redis_client: fakeredis.FakeRedis) -> None:
    limits = limits_of(redis_client, m={"rpm": 1}, **{"*": {"rpm": 2}})
    assert limits.governs("m") is not None and limits.governs("m").rpm == 1
    assert limits.governs("other") is not None and limits.governs("other").rpm == 2


def test_the_estimate_is_the_prompt_at_4_characters_a_token_plus_the_answer() -> None:
    messages = [{"role": "user", "content": "x" * 400}]
    assert estimate_tokens(messages, 50, 1024) == 151
    assert estimate_tokens(messages, None, 1024) == 1125


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"rpm": 0}, "rpm"),
        ({"tpm": -5}, "tpm"),
        ({"period": 0}, "period"),
        ({"failures": 0}, "failures"),
        ({"cooldown": -1}, "cooldown"),
        ({"rmp": 60}, "rmp"),
    ],
)
def test_bad_provider_limits_fail_at_startup_naming_the_field(
    monkeypatch: pytest.MonkeyPatch, entry: dict[str, float], field: str
) -> None:
    import json

    monkeypatch.setenv("CONVEYOR_PROVIDER_LIMITS", json.dumps({"gpt-4o": entry}))
    with pytest.raises(ValidationError) as raised:
        Settings()
    assert f"provider_limits.gpt-4o.{field}" in str(raised.value)


def test_provider_limits_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "CONVEYOR_PROVIDER_LIMITS", '{"gpt-4o": {"rpm": 500, "tpm": 30000}, "*": {"rpm": 60}}'
    )
    settings = Settings()
    assert settings.provider_limits["gpt-4o"].tpm == 30000
    assert settings.provider_limits["gpt-4o"].period == 60
    assert settings.provider_limits["*"].rpm == 60


def test_an_early_admission_is_stamped_with_the_time_its_call_is_sent(
    redis_client: fakeredis.FakeRedis,
) -> None:
    limits = limits_of(redis_client, m={"rpm": 5, "period": 10})
    ticket = limits.admit("m", 1)
    assert isinstance(ticket, Ticket)
    time.sleep(0.1)
    stamped = limits.stamp(ticket)
    assert stamped.at > ticket.at
    (score,) = [s for _, s in redis_client.zrange(limits.key("m", "log"), 0, -1, withscores=True)]
    assert score == pytest.approx(stamped.at)
