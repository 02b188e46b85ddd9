"""canvases: a tenant's drawing surfaces and their objects, written by the API and by canvas jobs

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

UUID = postgresql.UUID(as_uuid=True)
TS = sa.DateTime(timezone=True)
OBJECT_TYPES = "'rectangle', 'ellipse', 'line', 'arrow', 'text', 'sticky_note', 'image'"


def upgrade() -> None:
    op.create_table(
        "canvases",
        sa.Column("id", UUID, primary_key=True),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("object_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("top_z", sa.Integer, nullable=False, server_default="-1"),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("object_count >= 0", name="canvases_object_count_nonnegative"),
    )
    op.create_index(
        "canvases_owner_created",
        "canvases",
        ["owner", sa.text("created_at DESC"), sa.text("id DESC")],
    )
    op.create_table(
        "canvas_objects",
        sa.Column("id", UUID, primary_key=True),
        sa.Column(
            "canvas_id",
            UUID,
            sa.ForeignKey("canvases.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("job_id", UUID, sa.ForeignKey("jobs.id", ondelete="SET NULL")),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("x", sa.Float, nullable=False),
        sa.Column("y", sa.Float, nullable=False),
        sa.Column("width", sa.Float, nullable=False),
        sa.Column("height", sa.Float, nullable=False),
        sa.Column("rotation", sa.Float, nullable=False, server_default="0"),
        sa.Column("z", sa.Integer, nullable=False),
        sa.Column("fill", sa.String(9)),
        sa.Column("stroke", sa.String(9)),
        sa.Column("stroke_width", sa.Float, nullable=False, server_default="1"),
        sa.Column("text", sa.Text),
        sa.Column("artifact_id", UUID, sa.ForeignKey("artifacts.id", ondelete="SET NULL")),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint(f"type IN ({OBJECT_TYPES})", name="canvas_objects_type_valid"),
    )
    op.create_index("canvas_objects_canvas_z", "canvas_objects", ["canvas_id", "z", "id"])
    op.create_index(
        "canvas_objects_job",
        "canvas_objects",
        ["job_id"],
        postgresql_where=sa.text("job_id IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_table("canvas_objects")
    op.drop_table("canvases")
