"""job timing: `run_at` (scheduled jobs), `expires_at` (a deadline to start) and a per-job
`timeout_seconds`, with partial indexes for the sweeper's due and expired queued jobs

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-10
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
INDEXES = {
    # Scheduled jobs not yet published: the sweeper's "due" scan reads only these.
    "jobs_scheduled_due": ("run_at", "status = 'queued' AND dispatched_at IS NULL"),
    # Queued jobs that may expire: the sweeper's expiry scan reads only these.
    "jobs_queued_expiry": ("expires_at", "status = 'queued' AND expires_at IS NOT NULL"),
}


def upgrade() -> None:
    # Nullable columns without a default: PostgreSQL adds them to the catalog only, without
    # rewriting the table or holding its lock for longer than that.
    op.add_column("jobs", sa.Column("run_at", TS))
    op.add_column("jobs", sa.Column("expires_at", TS))
    op.add_column("jobs", sa.Column("timeout_seconds", sa.Integer))
    # CONCURRENTLY, as in 0002: the jobs table takes writes while the indexes are built. Both
    # start empty on an existing table (no row has the columns yet), so they build quickly.
    with op.get_context().autocommit_block():
        for name, (column, where) in INDEXES.items():
            op.create_index(
                name,
                "jobs",
                [column],
                postgresql_where=sa.text(where),
                postgresql_concurrently=True,
            )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name in INDEXES:
            op.drop_index(name, table_name="jobs", postgresql_concurrently=True, if_exists=True)
    op.drop_column("jobs", "timeout_seconds")
    op.drop_column("jobs", "expires_at")
    op.drop_column("jobs", "run_at")
