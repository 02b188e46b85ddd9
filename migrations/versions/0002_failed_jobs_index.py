"""index failed jobs by finish time, for GET /health's failures of the last hour

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from alembic import op
from sqlalchemy import text

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # CONCURRENTLY: the jobs table takes writes while this runs; a plain CREATE INDEX would
    # block every insert and transition until it finished. It cannot run in a transaction.
    with op.get_context().autocommit_block():
        op.create_index(
            "jobs_failed_finished",
            "jobs",
            ["finished_at"],
            postgresql_where=text("status = 'failed'"),
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "jobs_failed_finished", table_name="jobs", postgresql_concurrently=True, if_exists=True
        )
