"""webhooks: tenants' endpoints, a job's own webhook, and the outbox of deliveries filled by a
trigger on job_events

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-10

The trigger makes a delivery in the transaction that records the event, whoever records it (a
worker's fenced write, the sweeper, a cancel from the API): a crash right after a state change
cannot lose its webhook, and no code path can forget one. It fires only for the event types a
webhook may ask for (WEBHOOK_EVENTS in app/jobs/states.py; a test holds the two together), so
the other events, token deltas and progress above all, pay nothing.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

UUID = postgresql.UUID(as_uuid=True)
JSONB = postgresql.JSONB
TS = sa.DateTime(timezone=True)
WEBHOOK_EVENTS = ("job.started", "job.retrying", "job.succeeded", "job.failed", "job.canceled")

# The body of every delivery: {type, timestamp, data: {job: {id, kind, status}, event}}, the
# event being the job's event envelope as the API serves it.
OUTBOX_FUNCTION = """
CREATE FUNCTION webhook_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    job record;
    at text := to_char(NEW.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"');
    body jsonb;
BEGIN
    SELECT id, owner, kind, webhook INTO job FROM jobs WHERE id = NEW.job_id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    body := jsonb_build_object(
        'type', NEW.type,
        'timestamp', at,
        'data', jsonb_build_object(
            'job', jsonb_build_object(
                'id', job.id,
                'kind', job.kind,
                'status', CASE NEW.type
                    WHEN 'job.started' THEN 'running'
                    WHEN 'job.retrying' THEN 'queued'
                    ELSE substr(NEW.type, 5) END),
            'event', jsonb_build_object(
                'job_id', NEW.job_id, 'seq', NEW.seq, 'type', NEW.type, 'at', at,
                'data', NEW.data)));
    IF job.webhook IS NOT NULL AND job.webhook -> 'events' ? NEW.type THEN
        INSERT INTO webhook_deliveries (owner, job_id, url, event_type, event_seq, payload)
        VALUES (job.owner, job.id, job.webhook ->> 'url', NEW.type, NEW.seq, body);
    END IF;
    INSERT INTO webhook_deliveries (owner, job_id, endpoint_id, url, event_type, event_seq,
                                    payload)
    SELECT job.owner, job.id, e.id, e.url, NEW.type, NEW.seq, body
    FROM webhook_endpoints e
    WHERE e.owner = job.owner AND e.enabled AND e.events ? NEW.type;
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    op.add_column("jobs", sa.Column("webhook", JSONB))
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", UUID, primary_key=True),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("description", sa.String(200)),
        sa.Column("events", JSONB, nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.text("true")),
        sa.Column("secret", sa.String(100), nullable=False),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
    )
    op.create_index("webhook_endpoints_owner", "webhook_endpoints", ["owner", "created_at"])
    op.create_table(
        "webhook_secrets",
        sa.Column("owner", sa.String(200), primary_key=True),
        sa.Column("secret", sa.String(100), nullable=False),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", UUID, primary_key=True, server_default=sa.text("gen_random_uuid()")),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("job_id", UUID, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("endpoint_id", UUID, sa.ForeignKey("webhook_endpoints.id", ondelete="CASCADE")),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("event_seq", sa.Integer, nullable=False),
        sa.Column("payload", JSONB, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", TS, server_default=sa.func.now()),
        sa.Column("last_status_code", sa.Integer),
        sa.Column("last_error", sa.Text),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("redelivered_at", TS),
        sa.Column("finished_at", TS),
        sa.CheckConstraint(
            "status IN ('pending', 'succeeded', 'failed')", name="webhook_deliveries_status_valid"
        ),
    )
    op.create_index(
        "webhook_deliveries_due",
        "webhook_deliveries",
        ["next_attempt_at"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index("webhook_deliveries_job", "webhook_deliveries", ["job_id", "created_at"])
    op.create_index(
        "webhook_deliveries_endpoint",
        "webhook_deliveries",
        ["endpoint_id", sa.text("created_at DESC"), sa.text("id DESC")],
        postgresql_where=sa.text("endpoint_id IS NOT NULL"),
    )
    op.create_table(
        "webhook_attempts",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column(
            "delivery_id",
            UUID,
            sa.ForeignKey("webhook_deliveries.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("address", sa.String(64)),
        sa.Column("status_code", sa.Integer),
        sa.Column("error", sa.Text),
        sa.Column("response_body", sa.Text, nullable=False, server_default=""),
        sa.Column("duration_ms", sa.Float, nullable=False),
        sa.Column("at", TS, nullable=False, server_default=sa.func.now()),
    )
    op.create_index("webhook_attempts_delivery", "webhook_attempts", ["delivery_id", "attempt"])
    op.execute(OUTBOX_FUNCTION)
    types = ", ".join(f"'{event_type}'" for event_type in WEBHOOK_EVENTS)
    op.execute(
        "CREATE TRIGGER job_events_webhook_outbox AFTER INSERT ON job_events FOR EACH ROW "
        f"WHEN (NEW.type IN ({types})) EXECUTE FUNCTION webhook_outbox()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER job_events_webhook_outbox ON job_events")
    op.execute("DROP FUNCTION webhook_outbox()")
    op.drop_table("webhook_attempts")
    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_secrets")
    op.drop_table("webhook_endpoints")
    op.drop_column("jobs", "webhook")
