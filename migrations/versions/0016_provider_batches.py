"""provider batches: jobs of `service_tier: "batch"` sent through the provider's Batch API

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-03

`provider_batch_items` holds a batch-tier job's request from the moment its worker hands it
over until the job ends; `provider_batches` is one Batch API batch, its row (and our id, which
travels in the batch's metadata) committed before anything is sent, so that a process killed
mid-submission never makes the provider run a batch twice (app/execution/provider_batches.py).

A job handed to a provider batch stays `running` with no lease: the sweeper leaves it alone and
it holds no place in its tenant's dispatch window, so `jobs_owner_outstanding` is rebuilt with
the predicate of app/models.py OUTSTANDING (a new index built CONCURRENTLY, the old one
dropped, the new one renamed: the jobs table takes writes meanwhile).
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

OUTSTANDING_BEFORE = "status = 'running' OR (status = 'queued' AND dispatched_at IS NOT NULL)"
OUTSTANDING_AFTER = (
    "(status = 'running' AND lease_expires_at IS NOT NULL)"
    " OR (status = 'queued' AND dispatched_at IS NOT NULL)"
)


def upgrade() -> None:
    op.create_table(
        "provider_batches",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("provider_batch_id", sa.String(255), unique=True),
        sa.Column("input_file_id", sa.String(255)),
        sa.Column("provider_status", sa.String(32)),
        sa.Column("request_count", sa.Integer(), nullable=False),
        sa.Column("completed", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("failed", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("error", sa.Text()),
        sa.Column("cancel_requested_at", sa.DateTime(timezone=True)),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("submitted_at", sa.DateTime(timezone=True)),
        sa.Column("polled_at", sa.DateTime(timezone=True)),
        sa.Column("ended_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint(
            "state IN ('creating', 'submitted', 'ended')", name="provider_batches_state_valid"
        ),
        sa.CheckConstraint("request_count > 0", name="provider_batches_request_count_positive"),
    )
    op.create_index(
        "provider_batches_open",
        "provider_batches",
        ["created_at"],
        postgresql_where=sa.text("state <> 'ended'"),
    )
    op.create_table(
        "provider_batch_items",
        sa.Column(
            "job_id",
            UUID(as_uuid=True),
            sa.ForeignKey("jobs.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("attempt", sa.Integer(), primary_key=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("body", JSONB(), nullable=False),
        sa.Column(
            "provider_batch",
            UUID(as_uuid=True),
            sa.ForeignKey("provider_batches.id", ondelete="SET NULL"),
        ),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("ended_at", sa.DateTime(timezone=True)),
    )
    op.create_index(
        "provider_batch_items_pending",
        "provider_batch_items",
        ["model", "created_at"],
        postgresql_where=sa.text("provider_batch IS NULL AND ended_at IS NULL"),
    )
    # The handed-over jobs not ended yet, which each run reads for pending cancels: the table
    # keeps a row per batch-tier job for as long as the job is kept.
    op.create_index(
        "provider_batch_items_open",
        "provider_batch_items",
        ["job_id"],
        postgresql_where=sa.text("ended_at IS NULL"),
    )
    op.create_index(
        "provider_batch_items_batch",
        "provider_batch_items",
        ["provider_batch"],
        postgresql_where=sa.text("provider_batch IS NOT NULL"),
    )
    _rebuild_outstanding(OUTSTANDING_AFTER)


def downgrade() -> None:
    _rebuild_outstanding(OUTSTANDING_BEFORE)
    op.drop_table("provider_batch_items")
    op.drop_table("provider_batches")


def _rebuild_outstanding(predicate: str) -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "jobs_owner_outstanding_new",
            "jobs",
            ["owner"],
            postgresql_where=sa.text(predicate),
            postgresql_concurrently=True,
        )
        op.drop_index("jobs_owner_outstanding", "jobs", postgresql_concurrently=True)
        op.execute("ALTER INDEX jobs_owner_outstanding_new RENAME TO jobs_owner_outstanding")
