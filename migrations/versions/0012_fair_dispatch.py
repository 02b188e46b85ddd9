"""Fair dispatch: a tenant's weight and concurrency cap, and the two partial indexes that count
its outstanding jobs and find its held ones

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03

The columns are nullable without a default, so adding them rewrites nothing. The indexes are
built CONCURRENTLY: the jobs table takes writes while they build, and a plain CREATE INDEX
would block every insert and transition until it finished (it cannot run in a transaction).
Until they exist the fair-dispatch queries still answer, by scanning `jobs_owner_created`.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy import text

revision = "0012"
# Renumbered at merge: 0011 is written in parallel on another branch.
down_revision = "0011"
branch_labels = None
depends_on = None

OUTSTANDING = "status = 'running' OR (status = 'queued' AND dispatched_at IS NOT NULL)"
HELD = "status = 'queued' AND dispatched_at IS NULL"


def upgrade() -> None:
    op.add_column("tenants", sa.Column("weight", sa.Numeric(6, 2)))
    op.add_column("tenants", sa.Column("max_concurrency", sa.Integer))
    op.create_check_constraint("tenants_weight", "tenants", "weight IS NULL OR weight > 0")
    op.create_check_constraint(
        "tenants_max_concurrency", "tenants", "max_concurrency IS NULL OR max_concurrency >= 1"
    )
    with op.get_context().autocommit_block():
        op.create_index(
            "jobs_owner_outstanding",
            "jobs",
            ["owner"],
            postgresql_where=text(OUTSTANDING),
            postgresql_concurrently=True,
            if_not_exists=True,
        )
        op.create_index(
            "jobs_owner_held",
            "jobs",
            ["owner", text("priority DESC"), "created_at"],
            postgresql_where=text(HELD),
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name in ("jobs_owner_held", "jobs_owner_outstanding"):
            op.drop_index(name, table_name="jobs", postgresql_concurrently=True, if_exists=True)
    op.drop_constraint("tenants_max_concurrency", "tenants")
    op.drop_constraint("tenants_weight", "tenants")
    op.drop_column("tenants", "max_concurrency")
    op.drop_column("tenants", "weight")
