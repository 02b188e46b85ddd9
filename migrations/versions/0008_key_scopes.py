"""API key scopes, expiry and creator; an index for listing every owner's jobs

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05

The before step of replacing `api_keys.role` by `scopes`: existing keys get the scopes their
role meant (`user`: jobs:read and jobs:write; `admin`: those and admin), and `role` stays, with
a default, for the processes of the previous release that still read and write it while a
deployment rolls. No code reads it any more. The after step, dropping `role`, belongs to a
later release, once no process of this one's predecessor can run.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

UUID = postgresql.UUID(as_uuid=True)
TS = sa.DateTime(timezone=True)
SCOPES = "ARRAY['jobs:read', 'jobs:write', 'admin']::text[]"


def upgrade() -> None:
    # A key that a previous-release process creates during the rollout gets the scopes of its
    # default role.
    op.add_column(
        "api_keys",
        sa.Column(
            "scopes",
            postgresql.ARRAY(sa.Text),
            nullable=False,
            server_default=sa.text("ARRAY['jobs:read', 'jobs:write']::text[]"),
        ),
    )
    op.execute(
        "UPDATE api_keys SET scopes = ARRAY['admin', 'jobs:read', 'jobs:write']::text[] "
        "WHERE role = 'admin'"
    )
    op.create_check_constraint(
        "api_keys_scopes_known", "api_keys", f"cardinality(scopes) > 0 AND scopes <@ {SCOPES}"
    )
    op.add_column("api_keys", sa.Column("expires_at", TS))
    op.add_column(
        "api_keys",
        sa.Column("created_by", UUID, sa.ForeignKey("api_keys.id", ondelete="SET NULL")),
    )
    op.alter_column("api_keys", "role", server_default="user")
    # The admin's job list across owners reads newest first without an owner; without this it
    # sorted the whole table. CONCURRENTLY: jobs takes writes meanwhile (see 0002).
    with op.get_context().autocommit_block():
        op.create_index(
            "jobs_created",
            "jobs",
            [sa.text("created_at DESC"), sa.text("id DESC")],
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "jobs_created", table_name="jobs", postgresql_concurrently=True, if_exists=True
        )
    op.execute("UPDATE api_keys SET role = 'admin' WHERE 'admin' = ANY(scopes)")
    op.alter_column("api_keys", "role", server_default=None)
    op.drop_column("api_keys", "created_by")
    op.drop_column("api_keys", "expires_at")
    op.drop_constraint("api_keys_scopes_known", "api_keys")
    op.drop_column("api_keys", "scopes")
