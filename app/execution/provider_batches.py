"""What the beat task does with jobs of `service_tier: "batch"`, every
`CONVEYOR_PROVIDER_BATCH_INTERVAL` seconds: collect the handed-over jobs into provider batches,
submit them, poll them, and end each job with its line of the results.

Submitting exactly once. A batch's row, with our id, is committed (state `creating`) before
anything is sent, and our id travels in the provider batch's metadata (and the input file's
name). The row is locked (FOR UPDATE SKIP LOCKED) for the whole submission, so no two
processes submit it at once; a process killed mid-submission drops its lock with its
connection, and the next run first looks among the provider's batches for one that carries our
id: it adopts that one, and submits only if there is none. So the provider never runs a batch
twice, whatever dies when.

Ending each job once. A batch's results end its jobs one by one, each through the same fenced
finish as a worker's (events, webhooks, metrics, cost), conditioned on the job still running
the attempt that handed it over: a job canceled meanwhile, or ended by an earlier run that died
halfway through the batch, is skipped.

Holding a database transaction across provider calls (the submission, the poll) is deliberate:
the row lock is what keeps a second beat run off the batch. Those calls are short (an upload,
a create, a status read, a file download), unlike a model call.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import IntegrityError

from app import metrics
from app.jobs import provider_batches as store
from app.jobs.payloads import (
    CanceledPayload,
    EventError,
    FailedPayload,
    ProviderBatchPayload,
    SucceededPayload,
)
from app.jobs.transitions import Jobs, LeaseLost
from app.kinds import KindError, get_kind
from app.llm.batch_api import BatchAPI, LineResult, RemoteBatch, batch_price, read_line
from app.llm.client import ModelClient
from app.llm.errors import ModelError

logger = logging.getLogger(__name__)

# The provider's statuses as the jobs' phases (`cancelling` shows none: the jobs are ending).
PHASES = {"validating": "submitted", "in_progress": "in_progress", "finalizing": "finalizing"}
# A batch's jobs hear of its counts at most this many times (each tenth done).
PROGRESS_STEPS = 10
# Why the jobs a batch never answered fail, by the batch's final status.
UNANSWERED = {
    "expired": ("batch_expired", "the provider's batch expired (24 h) before it ran the request"),
    "cancelled": ("batch_canceled", "the provider's batch was canceled before it ran the request"),
    "completed": ("batch_result_missing", "the provider's batch ended without this request"),
}


@dataclass
class BatchReport:
    collected: int = 0  # new provider batches
    submitted: int = 0  # sent (or adopted after a crash)
    adopted: int = 0  # of which found at the provider already
    polled: int = 0
    ended: int = 0  # batches whose results were recorded
    jobs_ended: int = 0
    canceled: int = 0  # provider batches canceled because all their jobs were
    forgotten: int = 0  # rows of ended batches whose jobs are all deleted


class ProviderBatches:
    def __init__(self, jobs: Jobs, models: ModelClient) -> None:
        self.jobs = jobs
        self.models = models
        self.api = BatchAPI(models)
        self.settings = jobs.settings

    def run(self) -> BatchReport:
        report = BatchReport()
        self.cancel_requested(report)
        report.collected = len(
            store.collect(
                self.jobs.db,
                self.settings.provider_batch_window,
                self.settings.provider_batch_max_size,
            )
        )
        for batch_id in store.open_batches(self.jobs.db, store.CREATING):
            self.submit(batch_id, report)
        for batch_id in store.open_batches(self.jobs.db, store.SUBMITTED):
            self.poll(batch_id, report)
        report.forgotten = store.forget_ended(self.jobs.db)
        if any(vars(report).values()):
            logger.info("provider batches: %s", report)
        return report

    # Submitting ---------------------------------------------------------------------------

    def submit(self, batch_id: uuid.UUID, report: BatchReport) -> None:
        """Sends a `creating` batch, or adopts the provider batch an earlier run sent before
        it died; the row stays `creating` (for the next run) if the provider cannot be
        reached."""
        # Not `connection.begin()`: each path below commits (or leaves the row for the next run)
        # itself, and the lock lasts until then.
        with self.jobs.db.engine.connect() as connection:
            row = store.lock_batch(connection, batch_id, store.CREATING)
            if row is None:
                return  # another process is on it, or it moved on
            items = store.open_items(connection, batch_id)
            try:
                remote = self.api.find(str(batch_id), since=row.created_at)
                file_id = None
                if remote is None and not items:
                    store.record_end(connection, batch_id, "every job ended before it was sent")
                    connection.commit()
                    return
                if remote is None:
                    requests = [_request_line(item) for item in items]
                    file_id = self.api.upload(f"conveyor-{batch_id}.jsonl", requests)
                    remote = self.api.create(file_id, str(batch_id))
                else:
                    report.adopted += 1
                    logger.warning(
                        "adopted provider batch %s of an interrupted submission of %s",
                        remote.id,
                        batch_id,
                    )
            except ModelError as error:
                if error.retryable:
                    logger.warning("provider batch %s not sent yet: %s", batch_id, error.message)
                    return
                store.record_end(connection, batch_id, f"{error.code}: {error.message}")
                connection.commit()
                self._fail_all(
                    items, error.code, f"the provider refused the batch: {error.message}"
                )
                return
            store.record_submission(connection, batch_id, remote.id, file_id, remote.status)
            connection.commit()
        report.submitted += 1
        self._publish_phase(items, remote, "submitted")

    # Polling ------------------------------------------------------------------------------

    def poll(self, batch_id: uuid.UUID, report: BatchReport) -> None:
        with self.jobs.db.engine.connect() as connection:
            row = store.lock_batch(connection, batch_id, store.SUBMITTED)
            if row is None or row.provider_batch_id is None:
                return
            items = store.open_items(connection, batch_id)
            try:
                remote = self.api.retrieve(row.provider_batch_id)
                if not items and not remote.ended and row.cancel_requested_at is None:
                    # Every job of the batch was canceled: so is the provider batch.
                    remote = self.api.cancel(row.provider_batch_id)
                    store.record_cancel(connection, batch_id)
                    report.canceled += 1
            except ModelError as error:
                if error.code == "model_not_found":
                    store.record_end(connection, batch_id, "the provider no longer knows the batch")
                    connection.commit()
                    self._fail_all(items, "batch_lost", "the provider no longer knows the batch")
                    return
                logger.warning("provider batch %s not polled: %s", batch_id, error.message)
                return
            report.polled += 1
            changed = worth_an_event(row, remote)
            store.record_poll(
                connection, batch_id, remote.status, remote.completed, remote.failed, remote.errors
            )
            if not remote.ended:
                connection.commit()
                if changed and remote.status in PHASES:
                    self._publish_phase(items, remote, PHASES[remote.status])
                return
            try:
                ended = self._record_results(row, remote, items)
            except ModelError as error:
                logger.warning("results of provider batch %s not read: %s", batch_id, error.message)
                return
            report.jobs_ended += ended
            store.record_end(connection, batch_id, remote.errors)
            connection.commit()
            report.ended += 1

    def _record_results(self, row: store.BatchRow, remote: RemoteBatch, items: list[Any]) -> int:
        """Ends each open job of the ended batch with its line; returns how many it ended."""
        lines = self.api.lines(remote.output_file_id)
        lines.update(self.api.lines(remote.error_file_id))
        started = row.submitted_at or row.created_at
        latency_ms = (datetime.now(UTC) - started).total_seconds() * 1000
        ended = 0
        for item in items:
            line = lines.get(item.custom_id)
            if line is None:
                code, message = UNANSWERED.get(remote.status, UNANSWERED["completed"])
                if remote.status == "failed":
                    code = "batch_failed"
                    message = f"the provider's batch failed: {remote.errors or 'no reason given'}"
                ended += self._fail(item, code, message)
                continue
            result = read_line(line, row.model, self.models.provider, started, latency_ms)
            ended += self._finish(item, result)
        return ended

    # Ending jobs --------------------------------------------------------------------------

    def _finish(self, item: store.OpenItem, result: LineResult) -> int:
        calls = []
        if result.record is not None:
            batch_price(
                result.record, self.models, Decimal(str(self.settings.provider_batch_price_factor))
            )
            row = result.record.as_row(self.models.prices)
            metrics.model_call(row, item.claim.owner)
            calls.append(row)
        if item.cancel_requested:
            return self._end(
                item, CanceledPayload(reason="requested", attempt=item.claim.attempt), calls
            )
        if result.error is not None:
            return self._fail(item, result.error.code, result.error.message, calls)
        try:
            output = self._output(item, result)
        except ModelError as error:
            return self._fail(item, error.code, error.message, calls)
        except (ValidationError, KindError) as error:
            return self._fail(item, "invalid_input", str(error), calls)
        return self._end(
            item,
            SucceededPayload(attempt=item.claim.attempt),
            calls,
            output=output.model_dump(mode="json"),
            progress=100.0,
            error_code=None,
            error_message=None,
        )

    @staticmethod
    def _output(item: store.OpenItem, result: LineResult) -> BaseModel:
        kind = get_kind(item.claim.kind)
        if kind.batch_result is None:
            raise KindError(f"kind {kind.name!r} has no batch tier")
        job_input = kind.Input.model_validate(item.claim.input)
        return kind.batch_result(job_input, result.text or "", result.finish_reason)

    def _fail(
        self,
        item: store.OpenItem,
        code: str,
        message: str,
        calls: list[dict[str, Any]] | None = None,
    ) -> int:
        if item.cancel_requested:
            canceled = CanceledPayload(reason="requested", attempt=item.claim.attempt)
            return self._end(item, canceled, calls or [])
        failed = FailedPayload(
            attempt=item.claim.attempt, error=EventError(code=code, message=message)
        )
        values = {"error_code": code, "error_message": message[:4000]}
        return self._end(item, failed, calls or [], **values)

    def _end(
        self,
        item: store.OpenItem,
        payload: SucceededPayload | FailedPayload | CanceledPayload,
        calls: list[dict[str, Any]],
        **values: Any,
    ) -> int:
        claim = item.claim
        seq = store.current_seq(self.jobs.db, claim.job_id) + 1
        try:
            self.jobs.finish_job(
                claim,
                seq,
                payload,
                calls=calls,
                effects=(store.end_item(claim.attempt),),
                **values,
            )
        except LeaseLost:
            # Ended meanwhile (canceled): the finish wrote nothing but the call's cost.
            return 0
        except IntegrityError:
            # Another run wrote this seq first (a cancel pass racing a poll): nothing was
            # written, and the next run ends the job from a fresh seq.
            logger.info(
                "job moved on meanwhile; ending it next run", extra={"job_id": claim.job_id}
            )
            return 0
        return 1

    def _fail_all(self, items: list[store.OpenItem], code: str, message: str) -> None:
        for item in items:
            self._fail(item, code, message)

    def cancel_requested(self, report: BatchReport) -> None:
        """Handed-over jobs whose cancel did not end them (a batch of jobs canceled, or a
        cancel that raced the hand-over) end canceled now."""
        for item in store.cancel_requested_items(self.jobs.db):
            canceled = CanceledPayload(reason="requested", attempt=item.claim.attempt)
            report.jobs_ended += self._end(item, canceled, [])

    # Progress -----------------------------------------------------------------------------

    def _publish_phase(self, items: list[store.OpenItem], remote: RemoteBatch, phase: str) -> None:
        done = remote.completed + remote.failed
        progress = min(99.0, 100.0 * done / remote.total) if remote.total else 0.0
        payload = ProviderBatchPayload(
            phase=phase,  # type: ignore[arg-type]
            progress=round(progress, 2),
            provider_batch_id=remote.id,
            total=remote.total,
            completed=remote.completed,
            failed=remote.failed,
        )
        for item in items:
            seq = store.current_seq(self.jobs.db, item.claim.job_id) + 1
            try:
                self.jobs.fenced_update(item.claim, seq, payload, progress=payload.progress)
            except (LeaseLost, IntegrityError):
                continue  # ended meanwhile (canceled), or another run wrote this seq first


def worth_an_event(row: store.BatchRow, remote: RemoteBatch) -> bool:
    """Whether a poll's news is worth an event on each of the batch's jobs: a new phase, or
    another tenth of the batch done. A batch of thousands of jobs is polled for hours, and a
    count that moves at every poll would otherwise write as many events each time."""
    if remote.status != row.provider_status:
        return True
    if not remote.total:
        return False
    before = (row.completed + row.failed) * PROGRESS_STEPS // remote.total
    return (remote.completed + remote.failed) * PROGRESS_STEPS // remote.total != before


def _request_line(item: store.OpenItem) -> dict[str, Any]:
    return {
        "custom_id": item.custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": item.body,
    }
