"""/stats figures are computed at most once per max age per web process and owner, shared by
concurrent readers, and say when they were read."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Any

import pytest

from app.api import stats_cache as module
from app.api.stats_cache import StatsCache
from app.runtime import runtime
from tests.conftest import Tenant, undispatched_job, wait_until


@pytest.fixture
def computations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The owners job_stats is computed for, in order; each computation takes 0.3 s."""
    seen: list[str] = []
    real = module.transitions.job_stats
    gate = threading.Event()

    def counted(session: Any, owner: str) -> dict[str, Any]:
        seen.append(owner)
        gate.wait(0.3)
        return real(session, owner)

    monkeypatch.setattr(module.transitions, "job_stats", counted)
    return seen


def test_readers_of_one_owner_share_one_computation_within_the_max_age(
    tenant: Tenant, computations: list[str]
) -> None:
    cache = StatsCache(runtime().db, max_age=60)
    undispatched_job(tenant.owner)
    answers: list[dict[str, Any]] = []
    readers = [
        threading.Thread(target=lambda: answers.append(cache.of(tenant.owner))) for _ in range(8)
    ]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(30)
    assert len(answers) == 8 and computations == [tenant.owner]
    assert all(answer == answers[0] for answer in answers)
    assert answers[0]["by_status"]["queued"] == 1
    # Within the max age a new job is not seen yet, and `as_of` says how old the figures are.
    undispatched_job(tenant.owner)
    again = cache.of(tenant.owner)
    assert again["by_status"]["queued"] == 1 and again["as_of"] == answers[0]["as_of"]
    assert computations == [tenant.owner]


def test_each_owner_has_its_own_figures_and_a_zero_max_age_computes_every_time(
    new_tenant: Any, computations: list[str]
) -> None:
    one, two = new_tenant(), new_tenant()
    undispatched_job(one.owner)
    cache = StatsCache(runtime().db, max_age=60)
    assert cache.of(one.owner)["by_status"]["queued"] == 1
    assert cache.of(two.owner)["by_status"]["queued"] == 0
    fresh = StatsCache(runtime().db, max_age=0)
    first, second = fresh.of(one.owner), fresh.of(one.owner)
    assert second["as_of"] > first["as_of"]
    assert computations == [one.owner, two.owner, one.owner, one.owner]


def test_past_the_max_age_readers_get_the_last_figures_while_new_ones_are_computed(
    tenant: Tenant, computations: list[str]
) -> None:
    cache = StatsCache(runtime().db, max_age=0.05)
    first = cache.of(tenant.owner)
    time.sleep(0.1)
    # The figures are past their max age: this reader starts their renewal (0.3 s here) and,
    # like every reader until it ends, gets the last figures at once.
    assert cache.of(tenant.owner) is first
    assert cache.of(tenant.owner) is first
    assert computations == [tenant.owner, tenant.owner]
    renewed = wait_until(lambda: (a := cache.of(tenant.owner)) is not first and a, timeout=10)
    assert renewed["as_of"] > first["as_of"]


def test_the_endpoint_says_when_its_figures_were_read(tenant: Tenant) -> None:
    body = tenant.get("/api/v1/stats").get_json()
    assert datetime.fromisoformat(body["as_of"]).tzinfo is not None
