"""response cache: `jobs.cached`, whether a succeeded job's answer came from the cache

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03

Adding a column with a constant default is a catalog change in PostgreSQL 11 and later: no
table rewrite, so it is safe on a populated `jobs` table.
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "jobs", sa.Column("cached", sa.Boolean(), server_default=sa.false(), nullable=False)
    )


def downgrade() -> None:
    op.drop_column("jobs", "cached")
