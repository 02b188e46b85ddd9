"""Budgets: an owner's spend limits per UTC day and month, a job's own `max_cost_usd`, and the
estimate a job is checked against when it is submitted.

Spend is read from `tenant_spend`, a counter per owner and UTC day that the statement recording
model calls increments from the same rows (app/jobs/sql.py), so it agrees with `model_calls`
after any crash and a check reads at most 31 rows. The submit-time check is an estimate, not a
reservation: jobs submitted together may all pass it, and the limits are held while the jobs
stream (app/kinds/context.py).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from cachetools import TTLCache
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from app.llm.pricing import PriceTable
from app.models import Tenant

# Spend and limits of some owners, in one statement. The UTC day and month are PostgreSQL's,
# the clock of the statement that writes the counter.
BUDGETS = text("""
SELECT o.owner, t.daily_budget_usd, t.monthly_budget_usd,
       coalesce(sum(s.cost_usd) FILTER (WHERE s.day = (now() AT TIME ZONE 'UTC')::date), 0)
           AS spent_today,
       coalesce(sum(s.cost_usd), 0) AS spent_month
FROM unnest(CAST(:owners AS text[])) AS o(owner)
LEFT JOIN tenants t ON t.owner = o.owner
LEFT JOIN tenant_spend s
       ON s.owner = o.owner
      AND s.day >= date_trunc('month', now() AT TIME ZONE 'UTC')::date
GROUP BY o.owner, t.daily_budget_usd, t.monthly_budget_usd
""")

# About four characters a token, as the worker estimates a call cut short (app/llm/client.py).
CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class Budget:
    """An owner's limits (None: none) and what it has spent today and this month (UTC)."""

    owner: str
    daily_limit: Decimal | None
    monthly_limit: Decimal | None
    spent_today: Decimal
    spent_month: Decimal

    @property
    def remaining_today(self) -> Decimal | None:
        return _left(self.daily_limit, self.spent_today)

    @property
    def remaining_month(self) -> Decimal | None:
        return _left(self.monthly_limit, self.spent_month)

    def tightest(self) -> tuple[str, Decimal] | None:
        """The limit with the least left, `("daily" | "monthly", remaining)`; None: no limit."""
        left = [
            (name, value)
            for name, value in (("daily", self.remaining_today), ("monthly", self.remaining_month))
            if value is not None
        ]
        return min(left, key=lambda pair: pair[1]) if left else None


def _left(limit: Decimal | None, spent: Decimal) -> Decimal | None:
    return None if limit is None else max(Decimal(0), limit - spent)


def budgets_of(connection: Connection | Session, owners: Iterable[str]) -> dict[str, Budget]:
    rows = connection.execute(BUDGETS, {"owners": sorted(set(owners))}).all()
    return {
        row.owner: Budget(
            row.owner,
            row.daily_budget_usd,
            row.monthly_budget_usd,
            Decimal(row.spent_today),
            Decimal(row.spent_month),
        )
        for row in rows
    }


def budget_of(connection: Connection | Session, owner: str) -> Budget:
    return budgets_of(connection, [owner])[owner]


# Tenants ------------------------------------------------------------------------------------


def get_tenant(session: Session, owner: str) -> Tenant | None:
    return session.get(Tenant, owner)


# Owners known to have a spend limit, per process, for LIMITS_CACHE_SECONDS: a submit by an
# owner without limits (and without max_cost_usd) then costs no query at all, as POST /jobs
# did before budgets existed. A limit set by an admin binds every process within that time.
LIMITS_CACHE_SECONDS = 5.0
_has_limits: TTLCache[str, bool] = TTLCache(maxsize=100_000, ttl=LIMITS_CACHE_SECONDS)
_has_limits_lock = threading.Lock()
HAS_LIMITS = text("""
SELECT EXISTS (
    SELECT 1 FROM tenants
    WHERE owner = :owner AND (daily_budget_usd IS NOT NULL OR monthly_budget_usd IS NOT NULL)
)
""")


def has_limits(session: Callable[[], Session | Connection], owner: str) -> bool:
    """`session()` is called only when the answer is not cached."""
    with _has_limits_lock:
        known = _has_limits.get(owner)
    if known is None:
        known = bool(session().execute(HAS_LIMITS, {"owner": owner}).scalar_one())
        with _has_limits_lock:
            _has_limits[owner] = known
    return known


def put_tenant(session: Session, owner: str, values: dict[str, Any]) -> Tenant:
    """Creates the owner's row or replaces its settings with `values`."""
    with _has_limits_lock:
        _has_limits.pop(owner, None)
    tenant = session.get(Tenant, owner, with_for_update=True)
    if tenant is None:
        tenant = Tenant(owner=owner)
        session.add(tenant)
    for name, value in values.items():
        setattr(tenant, name, value)
    if tenant.created_at is not None:
        tenant.updated_at = _now(session)
    session.flush()
    session.refresh(tenant)
    return tenant


def _now(session: Session) -> Any:
    return session.execute(text("SELECT now()")).scalar_one()


# Estimates ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    tokens_in: int
    tokens_out: int
    cost_usd: Decimal


def estimate_job(
    prices: PriceTable,
    job_input: dict[str, Any],
    models: Iterable[str],
    calls: int,
    default_output_tokens: int,
) -> Estimate:
    """What a job may cost at most, roughly: its input (as JSON, four characters a token) sent
    `calls` times, and each call's `max_tokens` (else `default_output_tokens`) answered, at the
    dearest of its models' prices. A model with no token price (an image model) counts 0."""
    tokens_in = len(json.dumps(job_input, separators=(",", ":"))) // CHARS_PER_TOKEN + 1
    max_tokens = job_input.get("max_tokens")
    per_call_out = max_tokens if isinstance(max_tokens, int) else default_output_tokens
    tokens_in, tokens_out = tokens_in * calls, per_call_out * calls
    priced = (prices.price_of(model) for model in models)
    costs = [price.cost(tokens_in, tokens_out) for price in priced if price is not None]
    return Estimate(tokens_in, tokens_out, max(costs, default=Decimal(0)))


@dataclass(frozen=True)
class Refusal:
    """Why a job is refused: the limit (`max_cost_usd`, `daily` or `monthly`), its amount left
    and the estimate it would pass."""

    limit: str
    remaining: Decimal
    estimate: Decimal

    @property
    def field(self) -> str | None:
        return "max_cost_usd" if self.limit == "max_cost_usd" else None


def refusal(
    estimate: Decimal, max_cost_usd: Decimal | None, budget: Budget | None
) -> Refusal | None:
    """The first limit the estimate passes: the job's own, then the owner's tightest."""
    if max_cost_usd is not None and estimate > max_cost_usd:
        return Refusal("max_cost_usd", max_cost_usd, estimate)
    tightest = budget.tightest() if budget is not None else None
    # A budget used up refuses even a job estimated at nothing (an unpriced model).
    if tightest is not None and (tightest[1] <= 0 or estimate > tightest[1]):
        return Refusal(tightest[0], tightest[1], estimate)
    return None
