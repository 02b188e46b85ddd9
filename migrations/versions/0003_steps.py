"""steps: checkpoints of finished steps (job_steps), models pinned per role (jobs.models), and
each model call's step, role and provider-reported cost

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UUID = postgresql.UUID(as_uuid=True)
JSONB = postgresql.JSONB()
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    # One row per finished step, written by the lease holder's fenced update (never by a
    # worker that lost its lease) and read back by every later claim of the job. A table, not
    # a jsonb column on jobs: each checkpoint is written once and never rewritten, while a
    # column would be rewritten whole at every step, on the row every transition updates.
    op.create_table(
        "job_steps",
        sa.Column("job_id", UUID, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("output", JSONB, nullable=False),
        sa.Column("tokens_in", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("tokens_out", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("cost_usd", sa.Numeric(16, 8), nullable=False, server_default="0"),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("job_id", "name", name="job_steps_pkey"),
    )
    # Nullable, no default: adding them rewrites nothing and takes the lock for a moment only.
    op.add_column("jobs", sa.Column("models", JSONB))
    op.add_column("model_calls", sa.Column("step", sa.String(64)))
    op.add_column("model_calls", sa.Column("role", sa.String(64)))
    op.add_column("model_calls", sa.Column("reported_cost_usd", sa.Numeric(16, 8)))


def downgrade() -> None:
    op.drop_column("model_calls", "reported_cost_usd")
    op.drop_column("model_calls", "role")
    op.drop_column("model_calls", "step")
    op.drop_column("jobs", "models")
    op.drop_table("job_steps")
