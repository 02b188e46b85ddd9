"""The one status enum and the event types: identical in the database, API, events and UI."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})


class EventType(StrEnum):
    QUEUED = "job.queued"
    STARTED = "job.started"
    PROGRESS = "job.progress"
    OUTPUT_DELTA = "job.output.delta"
    LOG = "job.log"
    STEP = "job.step"
    PROVIDER_BATCH = "job.provider_batch"
    RETRYING = "job.retrying"
    SUCCEEDED = "job.succeeded"
    FAILED = "job.failed"
    CANCELED = "job.canceled"


# Token deltas are the only events not written to PostgreSQL: they are coalesced, replayable
# from the Redis Stream, and the full text is stored with the result.
EPHEMERAL_EVENTS = frozenset({EventType.OUTPUT_DELTA})

TERMINAL_EVENTS = {
    JobStatus.SUCCEEDED: EventType.SUCCEEDED,
    JobStatus.FAILED: EventType.FAILED,
    JobStatus.CANCELED: EventType.CANCELED,
}
TERMINAL_STATUSES = {event_type: status for status, event_type in TERMINAL_EVENTS.items()}

# The events a webhook may ask for (its `events`), in their order in a job's life; the ones
# a webhook gets when it names none are the terminal ones. The outbox trigger of
# migrations/versions/0008_webhooks.py fires for exactly these.
WEBHOOK_EVENTS = (
    EventType.STARTED,
    EventType.RETRYING,
    EventType.SUCCEEDED,
    EventType.FAILED,
    EventType.CANCELED,
)
DEFAULT_WEBHOOK_EVENTS = (EventType.SUCCEEDED, EventType.FAILED, EventType.CANCELED)
