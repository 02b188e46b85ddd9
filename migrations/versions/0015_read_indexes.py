"""read indexes: the job listing filtered by status or by kind, and /stats, at a million jobs

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-03

`GET /jobs?status=` and `?kind=` read `jobs_owner_created` and drop the rows of other statuses
or kinds: a rare kind's first page read 2,000 rows of a typical tenant and 18,000 of a big one
(docs/performance.md, "Reads at a million jobs"). Keyed by (owner, status | kind, created_at,
id), each filtered page, cursor pages included, is a range scan that stops after the page.

`/stats` (app/jobs/transitions.py `job_stats`) aggregated every one of an owner's jobs from
the table, 0.2 to 0.7 s for an owner of 100,000 jobs. `jobs_owner_status_created` carries the
columns it aggregates, so its counts, totals and duration percentiles are index-only scans; the
count of cache requests, which depends on `input`, reads `jobs_owner_cache_requests`, which
holds only the succeeded jobs that asked for the cache.

CONCURRENTLY, as in 0002 and 0013: the jobs table takes writes while the indexes are built.
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

# As app/models.py CACHE_REQUESTED: `input.cache` is a strict boolean, so this equals the cast
# /stats used; unlike the cast, it cannot raise on an odd input and fail an INSERT.
CACHE_REQUESTED = "status = 'succeeded' AND (input -> 'cache') = 'true'::jsonb"


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "jobs_owner_status_created",
            "jobs",
            ["owner", "status", sa.text("created_at DESC"), sa.text("id DESC")],
            postgresql_include=[
                "kind",
                "tokens_in",
                "tokens_out",
                "cost_usd",
                "cached",
                "started_at",
                "finished_at",
            ],
            postgresql_concurrently=True,
        )
        op.create_index(
            "jobs_owner_kind_created",
            "jobs",
            ["owner", "kind", sa.text("created_at DESC"), sa.text("id DESC")],
            postgresql_concurrently=True,
        )
        op.create_index(
            "jobs_owner_cache_requests",
            "jobs",
            ["owner"],
            postgresql_where=sa.text(CACHE_REQUESTED),
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name in (
            "jobs_owner_cache_requests",
            "jobs_owner_kind_created",
            "jobs_owner_status_created",
        ):
            op.drop_index(name, table_name="jobs", postgresql_concurrently=True, if_exists=True)
