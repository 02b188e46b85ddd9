"""Budgets: tenants with daily and monthly spend limits, spend rolled up per tenant and day,
and a job's own max_cost_usd

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03

`tenant_spend` is a counter that the statement recording model calls increments (app/jobs/sql.py),
so the spend of today and of this month is a read of at most 31 rows rather than a sum over
every call. It starts empty: calls made before this revision do not count against a budget.
`tenants.retention_days` is not used yet; it is here so that the retention feature needs no
migration of its own.
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
USD = sa.Numeric(16, 8)


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("owner", sa.String(200), primary_key=True),
        sa.Column("daily_budget_usd", USD),
        sa.Column("monthly_budget_usd", USD),
        sa.Column("retention_days", sa.Integer),
        sa.Column("created_at", TS, server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", TS, server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint(
            "daily_budget_usd IS NULL OR daily_budget_usd >= 0", name="tenants_daily_budget"
        ),
        sa.CheckConstraint(
            "monthly_budget_usd IS NULL OR monthly_budget_usd >= 0",
            name="tenants_monthly_budget",
        ),
    )
    op.create_table(
        "tenant_spend",
        sa.Column("owner", sa.String(200), primary_key=True),
        sa.Column("day", sa.Date, primary_key=True),
        sa.Column("cost_usd", USD, server_default="0", nullable=False),
    )
    # Nullable and without a default: adding it rewrites nothing.
    op.add_column("jobs", sa.Column("max_cost_usd", USD))


def downgrade() -> None:
    op.drop_column("jobs", "max_cost_usd")
    op.drop_table("tenant_spend")
    op.drop_table("tenants")
