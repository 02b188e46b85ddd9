"""Webhook deliveries: the outbox, its sender and its log; tenants' endpoints and signing secret.

A delivery row is made by a trigger on `job_events`, in the transaction that records the event
(migrations/versions/0008_webhooks.py), so every state change that a webhook asked for has its
delivery, whichever process made the change and whenever it crashed after. From there:

1. `dispatch_due` (a beat task on the `webhooks` queue, every CONVEYOR_WEBHOOK_DISPATCH_INTERVAL)
   claims the deliveries that are due, pushing their `next_attempt_at` past the longest an
   attempt may take, and publishes one send task per delivery with its attempt count. A lost
   message or a dead worker only delays the delivery until that claim runs out.
2. `deliver` (the send task) starts the attempt by compare-and-set on the attempt count, so a
   duplicate message sends nothing; checks the URL again (what the name resolves to now) and
   POSTs to the checked address; then logs the attempt and either ends the delivery or
   schedules the next attempt with exponential backoff, until the retry window (a day) is over.

Delivery is at least once: a receiver deduplicates by `webhook-id`, which every attempt and
every redelivery of a delivery repeat.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.db import newest_page
from app.jobs.transitions import retry_delay
from app.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookSecret
from app.queue import WEBHOOK_SEND_TASK
from app.webhooks import guard, sender
from app.webhooks.signing import new_secret, signed_headers

if TYPE_CHECKING:
    from celery import Celery

    from app.config import Settings
    from app.db import Database

logger = logging.getLogger(__name__)

DISPATCH_BATCH = 500
# Beyond the attempt's own time limit, before a claimed delivery is due again.
CLAIM_MARGIN_SECONDS = 60.0


class EndpointLimitReached(Exception):
    pass


class DeliveryPending(Exception):
    """A redelivery of a delivery that is still being tried."""


@dataclass(frozen=True)
class Policy:
    """How deliveries are made, from the settings."""

    allow: guard.AllowList
    limits: sender.Limits
    base_delay: float
    max_delay: float
    window: float

    @classmethod
    def of(cls, settings: Settings) -> Policy:
        return cls(
            allow=guard.AllowList.of(settings.webhook_allowed_networks),
            limits=sender.Limits(
                connect_timeout=settings.webhook_connect_timeout,
                timeout=settings.webhook_timeout,
                response_max_bytes=settings.webhook_response_max_bytes,
            ),
            base_delay=settings.webhook_retry_base_delay,
            max_delay=settings.webhook_retry_max_delay,
            window=settings.webhook_retry_window,
        )

    @property
    def claim_seconds(self) -> float:
        return self.limits.timeout + self.limits.connect_timeout + CLAIM_MARGIN_SECONDS


def message_id(delivery_id: uuid.UUID) -> str:
    """The delivery's `webhook-id`: the same for every attempt and redelivery."""
    return f"msg_{delivery_id.hex}"


# Sending ------------------------------------------------------------------------------------------

CLAIM_DUE = text("""
UPDATE webhook_deliveries SET next_attempt_at = now() + make_interval(secs => :claim)
WHERE id IN (
    SELECT id FROM webhook_deliveries
    WHERE status = 'pending' AND next_attempt_at <= now()
    ORDER BY next_attempt_at LIMIT :limit FOR UPDATE SKIP LOCKED
)
RETURNING id, attempts
""")

START_ATTEMPT = text("""
UPDATE webhook_deliveries d
SET attempts = attempts + 1, next_attempt_at = now() + make_interval(secs => :claim)
WHERE id = :id AND status = 'pending' AND attempts = :attempt
RETURNING d.id, d.owner, d.url, d.payload, d.attempts,
          coalesce(d.redelivered_at, d.created_at) AS window_start,
          (SELECT e.secret FROM webhook_endpoints e WHERE e.id = d.endpoint_id) AS endpoint_secret,
          d.endpoint_id
""")

FINISH_ATTEMPT = text("""
WITH logged AS (
    INSERT INTO webhook_attempts (delivery_id, attempt, address, status_code, error,
                                  response_body, duration_ms, at)
    VALUES (:id, :attempt, :address, :status_code, :error, :response_body, :duration_ms, :at)
)
UPDATE webhook_deliveries
SET status = :status, next_attempt_at = :next_attempt_at, last_status_code = :status_code,
    last_error = :error, finished_at = :finished_at
WHERE id = :id AND attempts = :attempt AND status = 'pending'
""")


def dispatch_due(db: Database, celery: Celery, policy: Policy) -> int:
    """Claims the due deliveries and publishes a send task for each; returns how many."""
    params = {"claim": policy.claim_seconds, "limit": DISPATCH_BATCH}
    with db.engine.begin() as connection:
        due = connection.execute(CLAIM_DUE, params).all()
    for row in due:
        try:
            celery.send_task(WEBHOOK_SEND_TASK, args=[str(row.id), row.attempts])
        except Exception as exc:  # kombu raises several unrelated types for a broker outage
            # The claim runs out and the next dispatch publishes it again.
            logger.warning("webhook delivery %s not published: %s", row.id, exc)
    return len(due)


def deliver(db: Database, policy: Policy, delivery_id: uuid.UUID, attempt: int) -> str:
    """Makes attempt `attempt + 1` of the delivery, unless another did (then "skipped"), and
    returns its outcome: "succeeded", "pending" (another attempt is scheduled) or "failed"."""
    params = {"id": delivery_id, "attempt": attempt, "claim": policy.claim_seconds}
    with db.engine.begin() as connection:
        row = connection.execute(START_ATTEMPT, params).one_or_none()
    if row is None:
        return "skipped"
    secret = row.endpoint_secret
    if row.endpoint_id is None:
        with db.transaction() as session:
            secret = tenant_secret(session, row.owner)
    at = datetime.now(UTC)
    payload = row.payload
    body = json.dumps(
        {"type": payload["type"], "timestamp": payload["timestamp"], "data": payload["data"]},
        separators=(",", ":"),
        ensure_ascii=False,
    )
    address, permanent = None, False
    try:
        destination = guard.check(row.url, policy.allow)
    except guard.DestinationRefused as exc:
        answer, permanent = sender.Answer(None, "", f"refused: {exc}", 0.0), True
    else:
        address = str(destination.address)
        headers = signed_headers(secret, message_id(row.id), at, body)
        answer = sender.post(destination, body, headers, policy.limits)
    status, next_at = _outcome(policy, answer, permanent, row.attempts, row.window_start, at)
    with db.engine.begin() as connection:
        connection.execute(
            FINISH_ATTEMPT,
            {
                "id": row.id,
                "attempt": row.attempts,
                "address": address,
                "status_code": answer.status_code,
                "error": answer.error,
                "response_body": answer.body.replace("\x00", "\ufffd"),
                "duration_ms": answer.duration_ms,
                "at": at,
                "status": status,
                "next_attempt_at": next_at,
                "finished_at": None if status == "pending" else at,
            },
        )
    logger.info(
        "webhook delivery %s attempt %d: %s (%s)",
        row.id,
        row.attempts,
        status,
        answer.error or answer.status_code,
    )
    return status


def _outcome(
    policy: Policy,
    answer: sender.Answer,
    permanent: bool,
    attempts: int,
    window_start: datetime,
    at: datetime,
) -> tuple[str, datetime | None]:
    """The delivery's status after an attempt, and when the next one is due."""
    if answer.delivered:
        return "succeeded", None
    if permanent:
        return "failed", None
    next_at = at + timedelta(seconds=retry_delay(attempts, policy.base_delay, policy.max_delay))
    if next_at > window_start + timedelta(seconds=policy.window):
        return "failed", None
    return "pending", next_at


def redeliver(session: Session, owner: str, delivery_id: uuid.UUID) -> WebhookDelivery | None:
    """Sends a finished delivery again, as it was (same `webhook-id` and body), with a new
    retry window; None when the owner has no such delivery."""
    delivery = session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.owner == owner)
        .with_for_update()
    ).one_or_none()
    if delivery is None:
        return None
    if delivery.status == "pending":
        raise DeliveryPending("the delivery is still being tried")
    at = datetime.now(UTC)
    delivery.status = "pending"
    delivery.next_attempt_at = at
    delivery.redelivered_at = at
    delivery.finished_at = None
    return delivery


# Reading the log ----------------------------------------------------------------------------------


def deliveries_of_job(session: Session, owner: str, job_id: uuid.UUID) -> list[WebhookDelivery]:
    return list(
        session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.job_id == job_id, WebhookDelivery.owner == owner)
            .order_by(WebhookDelivery.created_at, WebhookDelivery.event_seq, WebhookDelivery.id)
        )
    )


def deliveries_of_endpoint(
    session: Session,
    endpoint_id: uuid.UUID,
    limit: int,
    before: tuple[datetime, uuid.UUID] | None,
) -> list[WebhookDelivery]:
    """Newest first, keyset-paged on (created_at, id)."""
    statement = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
    return newest_page(session, statement, WebhookDelivery, limit, before)


def get_delivery(session: Session, owner: str, delivery_id: uuid.UUID) -> WebhookDelivery | None:
    return session.scalars(
        select(WebhookDelivery).where(
            WebhookDelivery.id == delivery_id, WebhookDelivery.owner == owner
        )
    ).one_or_none()


def attempts_of(
    session: Session, delivery_ids: list[uuid.UUID]
) -> dict[uuid.UUID, list[WebhookAttempt]]:
    found: dict[uuid.UUID, list[WebhookAttempt]] = {id_: [] for id_ in delivery_ids}
    if delivery_ids:
        for attempt in session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.delivery_id.in_(delivery_ids))
            .order_by(WebhookAttempt.delivery_id, WebhookAttempt.attempt)
        ):
            found[attempt.delivery_id].append(attempt)
    return found


# Endpoints and secrets ----------------------------------------------------------------------------


def create_endpoint(
    session: Session,
    owner: str,
    url: str,
    events: list[str],
    description: str | None,
    limit: int,
) -> WebhookEndpoint:
    """A new endpoint with a new secret; EndpointLimitReached when the owner has `limit`."""
    # One creation at a time per owner, so two concurrent ones cannot both pass the count.
    session.execute(select(func.pg_advisory_xact_lock(func.hashtext(f"webhooks:{owner}"))))
    count = session.scalar(
        select(func.count()).select_from(WebhookEndpoint).where(WebhookEndpoint.owner == owner)
    )
    if (count or 0) >= limit:
        raise EndpointLimitReached(f"a tenant may have at most {limit} webhook endpoints")
    endpoint = WebhookEndpoint(
        id=uuid.uuid4(),
        owner=owner,
        url=url,
        events=events,
        description=description,
        enabled=True,
        secret=new_secret(),
    )
    session.add(endpoint)
    session.flush()
    session.refresh(endpoint)
    return endpoint


def list_endpoints(session: Session, owner: str) -> list[WebhookEndpoint]:
    return list(
        session.scalars(
            select(WebhookEndpoint)
            .where(WebhookEndpoint.owner == owner)
            .order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
        )
    )


def get_endpoint(session: Session, owner: str, endpoint_id: uuid.UUID) -> WebhookEndpoint | None:
    return session.scalars(
        select(WebhookEndpoint).where(
            WebhookEndpoint.id == endpoint_id, WebhookEndpoint.owner == owner
        )
    ).one_or_none()


def update_endpoint(endpoint: WebhookEndpoint, changes: dict[str, Any]) -> WebhookEndpoint:
    """Sets `url`, `events`, `description` or `enabled`. Deliveries made before keep their URL."""
    for name, value in changes.items():
        setattr(endpoint, name, value)
    endpoint.updated_at = datetime.now(UTC)
    return endpoint


def tenant_secret(session: Session, owner: str) -> str:
    """The owner's secret for their jobs' own webhooks, made on first use."""
    session.execute(
        insert(WebhookSecret)
        .values(owner=owner, secret=new_secret())
        .on_conflict_do_nothing(index_elements=["owner"])
    )
    return session.scalars(select(WebhookSecret.secret).where(WebhookSecret.owner == owner)).one()


def rotate_tenant_secret(session: Session, owner: str) -> str:
    secret = new_secret()
    session.execute(
        insert(WebhookSecret)
        .values(owner=owner, secret=secret)
        .on_conflict_do_update(
            index_elements=["owner"], set_={"secret": secret, "created_at": func.now()}
        )
    )
    return secret
