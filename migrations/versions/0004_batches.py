"""batches: a table of batches and jobs.batch_id / jobs.batch_item, for POST /batches

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UUID = postgresql.UUID(as_uuid=True)
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", UUID, primary_key=True),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("item_count", sa.Integer, nullable=False),
        sa.Column("idempotency_key", sa.String(255)),
        sa.Column("request_hash", sa.String(64)),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("canceled_at", TS),
        sa.CheckConstraint("item_count > 0", name="batches_item_count_positive"),
        sa.UniqueConstraint("owner", "idempotency_key", name="batches_owner_idempotency_key"),
    )
    op.create_index(
        "batches_owner_created",
        "batches",
        ["owner", sa.text("created_at DESC"), sa.text("id DESC")],
    )
    # Nullable columns without a default: a change of the catalog only, no rewrite of jobs.
    op.add_column("jobs", sa.Column("batch_id", UUID))
    op.add_column("jobs", sa.Column("batch_item", sa.Integer))
    # NOT VALID, then VALIDATE: adding a checked foreign key would hold a lock that blocks
    # writes to jobs while it scans the table; validating apart takes one that does not.
    op.create_foreign_key(
        "jobs_batch_id_fkey",
        "jobs",
        "batches",
        ["batch_id"],
        ["id"],
        ondelete="SET NULL",
        postgresql_not_valid=True,
    )
    op.execute("ALTER TABLE jobs VALIDATE CONSTRAINT jobs_batch_id_fkey")
    # CONCURRENTLY, as in 0002: jobs takes writes while the index is built. It also serves the
    # results download, which reads a batch's jobs in item order.
    with op.get_context().autocommit_block():
        op.create_index(
            "jobs_batch_item",
            "jobs",
            ["batch_id", "batch_item"],
            unique=True,
            postgresql_where=sa.text("batch_id IS NOT NULL"),
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "jobs_batch_item", table_name="jobs", postgresql_concurrently=True, if_exists=True
        )
    op.drop_constraint("jobs_batch_id_fkey", "jobs", type_="foreignkey")
    op.drop_column("jobs", "batch_item")
    op.drop_column("jobs", "batch_id")
    op.drop_index("batches_owner_created", table_name="batches")
    op.drop_table("batches")
