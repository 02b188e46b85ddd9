"""retention: an index of finished jobs by owner and finish time, for the retention purge, and
the range of `tenants.retention_days`

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03

The purge (app/jobs/retention.py) deletes an owner's oldest finished jobs a batch at a time:
`WHERE owner = ? AND status IN (finished) AND finished_at < cutoff ORDER BY finished_at LIMIT n`
is a range scan of this index that stops after n rows, whatever the table's size. The same
index gives the distinct owners of finished jobs by a skip scan, which is how a run finds the
owners that the deployment's default retention applies to. It is partial: unfinished jobs,
which retention never deletes, are not in it.
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

FINISHED = "status IN ('succeeded', 'failed', 'canceled')"


def upgrade() -> None:
    # The range the API accepts (app/config.py MAX_RETENTION_DAYS); 0 is "forever". The table
    # holds one row per configured tenant, so the check is validated at once.
    op.create_check_constraint(
        "tenants_retention_days",
        "tenants",
        "retention_days IS NULL OR retention_days BETWEEN 0 AND 36500",
    )
    # CONCURRENTLY, as in 0002: the jobs table takes writes while the index is built.
    with op.get_context().autocommit_block():
        op.create_index(
            "jobs_owner_finished",
            "jobs",
            ["owner", "finished_at"],
            postgresql_where=sa.text(FINISHED),
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "jobs_owner_finished", table_name="jobs", postgresql_concurrently=True, if_exists=True
        )
    op.drop_constraint("tenants_retention_days", "tenants", type_="check")
