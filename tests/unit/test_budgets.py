"""The budget arithmetic: estimates, the tightest limit, and which limit refuses a job."""

from __future__ import annotations

from decimal import Decimal

from app.jobs.budgets import Budget, estimate_job, refusal
from app.llm.pricing import PriceTable


def budget(daily: str | None, monthly: str | None, today: str, month: str) -> Budget:
    def amount(value: str | None) -> Decimal | None:
        return None if value is None else Decimal(value)

    return Budget("acme", amount(daily), amount(monthly), Decimal(today), Decimal(month))


def test_the_estimate_prices_input_and_max_tokens_per_call_at_the_dearest_model() -> None:
    prices = PriceTable.load(None)
    job_input = {"prompt": "x" * 396, "max_tokens": 1000}  # 427 characters of JSON
    one = estimate_job(prices, job_input, ["gpt-4o-mini"], calls=1, default_output_tokens=9)
    assert (one.tokens_in, one.tokens_out) == (107, 1000)
    assert one.cost_usd == (Decimal("0.15") * 107 + Decimal("0.60") * 1000) / 1_000_000
    three = estimate_job(prices, job_input, ["gpt-4o-mini", "gpt-4o"], 3, 9)
    assert three.cost_usd == (Decimal("2.50") * 321 + Decimal("10") * 3000) / 1_000_000
    unpriced = estimate_job(prices, {"prompt": "a"}, ["no-such-model"], 1, 9)
    assert unpriced.cost_usd == 0 and unpriced.tokens_out == 9


def test_the_tightest_limit_is_the_one_with_least_left() -> None:
    assert budget(None, None, "5", "5").tightest() is None
    assert budget("1", "10", "0.4", "9.8").tightest() == ("monthly", Decimal("0.2"))
    assert budget("1", None, "3", "3").tightest() == ("daily", Decimal(0))


def test_the_job_s_own_limit_refuses_first_then_the_owner_s() -> None:
    owner = budget("1", None, "0.5", "0.5")
    assert refusal(Decimal("0.4"), None, owner) is None
    assert refusal(Decimal("0.6"), None, owner).limit == "daily"  # type: ignore[union-attr]
    own = refusal(Decimal("0.6"), Decimal("0.1"), owner)
    assert own is not None and own.limit == "max_cost_usd" and own.field == "max_cost_usd"
    # A budget used up refuses even a job estimated at nothing.
    spent = budget("1", None, "1", "1")
    assert refusal(Decimal(0), None, spent).limit == "daily"  # type: ignore[union-attr]
