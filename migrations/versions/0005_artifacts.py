"""artifacts: binary outputs of jobs (images), their bytes in the artifact store

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

UUID = postgresql.UUID(as_uuid=True)
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "artifacts",
        sa.Column("id", UUID, primary_key=True),
        sa.Column("job_id", UUID, sa.ForeignKey("jobs.id", ondelete="SET NULL")),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("content_type", sa.String(255), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("width", sa.Integer),
        sa.Column("height", sa.Integer),
        sa.Column("storage_key", sa.String(1024), nullable=False),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("published_at", TS),
        sa.CheckConstraint("size >= 0", name="artifacts_size_nonnegative"),
    )
    op.create_index("artifacts_job", "artifacts", ["job_id", "position"])
    op.create_index(
        "artifacts_unpublished",
        "artifacts",
        ["created_at"],
        postgresql_where=sa.text("published_at IS NULL OR job_id IS NULL"),
    )


def downgrade() -> None:
    op.drop_table("artifacts")
