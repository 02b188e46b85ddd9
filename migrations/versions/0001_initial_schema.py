"""initial schema: jobs, job_events, api_keys, model_calls

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UUID = postgresql.UUID(as_uuid=True)
JSONB = postgresql.JSONB()
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", UUID, primary_key=True),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("progress", sa.Float, nullable=False, server_default="0"),
        sa.Column("input", JSONB, nullable=False),
        sa.Column("output", JSONB),
        sa.Column("error_code", sa.String(64)),
        sa.Column("error_message", sa.Text),
        sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("priority", sa.SmallInteger, nullable=False, server_default="0"),
        sa.Column("idempotency_key", sa.String(255)),
        sa.Column("request_hash", sa.String(64)),
        sa.Column("model", sa.String(200)),
        sa.Column("worker", sa.String(255)),
        sa.Column("lease_expires_at", TS),
        sa.Column("retry_at", TS),
        sa.Column("cancel_requested_at", TS),
        sa.Column("dispatched_at", TS),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("started_at", TS),
        sa.Column("finished_at", TS),
        sa.Column("retry_of", UUID, sa.ForeignKey("jobs.id", ondelete="SET NULL")),
        sa.Column("last_seq", sa.Integer, nullable=False, server_default="0"),
        sa.Column("tokens_in", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("tokens_out", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("cost_usd", sa.Numeric(16, 8), nullable=False, server_default="0"),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'canceled')",
            name="jobs_status_valid",
        ),
        sa.CheckConstraint("progress >= 0 AND progress <= 100", name="jobs_progress_range"),
        sa.CheckConstraint("attempt >= 0 AND attempt <= max_attempts", name="jobs_attempt_range"),
        sa.UniqueConstraint("owner", "idempotency_key", name="jobs_owner_idempotency_key"),
    )
    op.create_index(
        "jobs_owner_created", "jobs", ["owner", sa.text("created_at DESC"), sa.text("id DESC")]
    )
    op.create_index(
        "jobs_queued_dispatch",
        "jobs",
        ["dispatched_at"],
        postgresql_where=sa.text("status = 'queued'"),
    )
    op.create_index(
        "jobs_running_lease",
        "jobs",
        ["lease_expires_at"],
        postgresql_where=sa.text("status = 'running'"),
    )
    op.create_index(
        "jobs_retry_of", "jobs", ["retry_of"], postgresql_where=sa.text("retry_of IS NOT NULL")
    )

    op.create_table(
        "job_events",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("job_id", UUID, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("data", JSONB, nullable=False),
        sa.UniqueConstraint("job_id", "seq", name="job_events_job_seq"),
    )

    op.create_table(
        "api_keys",
        sa.Column("id", UUID, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("last_used_at", TS),
        sa.Column("revoked_at", TS),
    )
    op.create_index("ix_api_keys_owner", "api_keys", ["owner"])

    op.create_table(
        "model_calls",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("job_id", UUID, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("provider", sa.String(200), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("tokens_in", sa.Integer, nullable=False),
        sa.Column("tokens_out", sa.Integer, nullable=False),
        sa.Column("cost_usd", sa.Numeric(16, 8), nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("ttft_ms", sa.Float),
        sa.Column("outcome", sa.String(64), nullable=False),
        sa.Column("error_message", sa.Text),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=False, server_default=sa.func.now()),
    )
    op.create_index("ix_model_calls_job_id", "model_calls", ["job_id"])


def downgrade() -> None:
    op.drop_table("model_calls")
    op.drop_table("api_keys")
    op.drop_table("job_events")
    op.drop_table("jobs")
