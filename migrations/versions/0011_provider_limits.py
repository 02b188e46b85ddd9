"""Provider limits: why a queued job waits (a provider's rate limit, its pause, an open circuit
breaker) and for which model endpoint

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03

Both nullable and without a default: adding them rewrites nothing. The wait's end is the job's
`run_at` (the scheduled-job machinery publishes it then), so it needs no column of its own.
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("wait_reason", sa.String(32)))
    op.add_column("jobs", sa.Column("wait_endpoint", sa.String(200)))


def downgrade() -> None:
    op.drop_column("jobs", "wait_endpoint")
    op.drop_column("jobs", "wait_reason")
