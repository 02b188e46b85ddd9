"""Per-key request rate limits in the real Redis: tiers, headers, the 429 problem, and a Redis
that cannot be reached letting requests through."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from flask import Flask
from limits import parse
from limits.strategies import SlidingWindowCounterRateLimiter
from pydantic import ValidationError

from app import config
from app.api.ratelimits import EXTENSION_KEY, RateLimits, SlidingWindowStorage, tier_of
from app.runtime import runtime
from tests.conftest import Tenant

CHAT = {"kind": "chat", "input": {"prompt": "hello"}}


@pytest.fixture
def low_limits(app: Flask) -> Iterator[RateLimits]:
    limits = app.extensions[EXTENSION_KEY]
    saved = dict(limits.tiers)
    limits.tiers.update(create=parse("3/minute"), read=parse("5/minute"), stream=parse("4/minute"))
    yield limits
    limits.tiers.clear()
    limits.tiers.update(saved)


def test_creation_past_its_limit_is_a_429_with_retry_after(
    low_limits: RateLimits, tenant: Tenant, new_tenant: Callable[[], Tenant]
) -> None:
    remaining = []
    for _ in range(3):
        response = tenant.post("/api/v1/jobs", json=CHAT)
        assert response.status_code == 202
        assert response.headers["RateLimit-Limit"] == "3"
        assert response.headers["RateLimit-Policy"] == "3;w=60"
        remaining.append(int(response.headers["RateLimit-Remaining"]))
        assert 0 < int(response.headers["RateLimit-Reset"]) <= 60
    assert remaining == [2, 1, 0]

    refused = tenant.post("/api/v1/jobs", json=CHAT)
    assert refused.status_code == 429
    assert refused.headers["Content-Type"] == "application/problem+json"
    problem = refused.get_json()
    assert problem["type"] == "/problems/rate-limited"
    assert "3 create requests per 60 s" in problem["detail"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["RateLimit-Remaining"] == "0"

    # Reads are their own tier, and another key its own count.
    assert tenant.get("/api/v1/jobs").status_code == 200
    assert new_tenant().post("/api/v1/jobs", json=CHAT).status_code == 202


def test_reads_and_streams_have_their_own_tiers(low_limits: RateLimits, tenant: Tenant) -> None:
    job_id = tenant.submit("chat", {"prompt": "hi"})["id"]
    events = f"/api/v1/jobs/{job_id}/events"
    assert [tenant.get(events).status_code for _ in range(5)] == [200] * 4 + [429]
    reads = [tenant.get(f"/api/v1/jobs/{job_id}").status_code for _ in range(6)]
    assert reads == [200] * 5 + [429]
    assert tenant.get(events).headers["RateLimit-Limit"] == "4"


def test_an_unauthenticated_request_is_not_counted_against_any_key(
    low_limits: RateLimits, app: Flask
) -> None:
    client = app.test_client()
    for _ in range(10):
        response = client.get("/api/v1/jobs")
        assert response.status_code == 401
        assert "RateLimit-Limit" not in response.headers


def test_an_unreachable_redis_lets_requests_through(
    app: Flask, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    nowhere = runtime().settings.model_copy(update={"redis_url": "redis://127.0.0.1:9/0"})
    monkeypatch.setitem(app.extensions, EXTENSION_KEY, RateLimits(nowhere))
    response = tenant.post("/api/v1/jobs", json=CHAT)
    assert response.status_code == 202
    assert "RateLimit-Limit" not in response.headers


def test_tiers_by_endpoint_and_settings_are_checked() -> None:
    assert tier_of("jobs.create_job") == "create"
    assert tier_of("batches.create_batch") == "create"
    assert tier_of("jobs.list_events") == "stream"
    assert tier_of("jobs.get_job") == "read"
    with pytest.raises(ValidationError, match="rate_limit_create"):
        config.testing_settings(rate_limit_create="lots")


def test_the_one_round_trip_hit_agrees_with_the_library_strategy() -> None:
    """The pipelined acquire-and-read decides and counts as `limits`' own strategy does, on
    the same keys: the two share one counter here, and each answer matches the library's."""
    storage = SlidingWindowStorage(runtime().settings.redis_url, key_prefix="conveyor:rl-test")
    library = SlidingWindowCounterRateLimiter(storage)
    limit = parse("4/minute")
    identity = ("create", str(uuid.uuid4()))
    answers = []
    for turn in range(6):
        if turn % 2:
            allowed = library.hit(limit, *identity)
            reset_at, remaining = library.get_window_stats(limit, *identity)
        else:
            allowed, window = storage.hit(limit, *identity)
            verdict = window.verdict(limit)
            remaining, reset_at = verdict.remaining, time.time() + verdict.reset_in
            assert 1 <= verdict.reset_in <= 60
        answers.append((allowed, remaining))
        assert reset_at - time.time() <= 61
    assert answers == [(True, 3), (True, 2), (True, 1), (True, 0), (False, 0), (False, 0)]


def test_a_redis_that_lost_its_scripts_is_given_them_again() -> None:
    """The one-round-trip hit runs the scripts by their digest; after a Redis restart (or a
    SCRIPT FLUSH) they are loaded again and the request is still counted."""
    storage = SlidingWindowStorage(runtime().settings.redis_url, key_prefix="conveyor:rl-test")
    limit = parse("2/minute")
    identity = ("read", str(uuid.uuid4()))
    assert storage.hit(limit, *identity)[0]
    runtime().redis.script_flush()
    allowed, window = storage.hit(limit, *identity)
    assert allowed and window.verdict(limit).remaining == 0
    assert storage.hit(limit, *identity)[0] is False
