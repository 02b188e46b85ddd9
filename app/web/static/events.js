// Generated from app/jobs/payloads.py by devtools/event_docs.py: do not edit. The
// payload of each type is in docs/events.md and in the API's OpenAPI document
// (EventEnvelope).

/** Every job event type, as the server spells it. */
export const EventType = Object.freeze({
  QUEUED: "job.queued",
  STARTED: "job.started",
  PROGRESS: "job.progress",
  OUTPUT_DELTA: "job.output.delta",
  LOG: "job.log",
  STEP: "job.step",
  PROVIDER_BATCH: "job.provider_batch",
  RETRYING: "job.retrying",
  SUCCEEDED: "job.succeeded",
  FAILED: "job.failed",
  CANCELED: "job.canceled",
});

/** Nothing follows these in a job's feed. */
export const TERMINAL_EVENTS = new Set([EventType.SUCCEEDED, EventType.FAILED, EventType.CANCELED]);

/** Token deltas: never stored in PostgreSQL, never sent to the owner's room. */
export const EPHEMERAL_EVENTS = new Set([EventType.OUTPUT_DELTA]);
