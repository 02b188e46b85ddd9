"""What the simulator's Batch API keeps: uploaded files and batches (app/sim/batches.py)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

BATCH_EXPIRE = "expire"
BATCH_FAIL = "fail"


@dataclass
class SimFile:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def as_object(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


@dataclass
class Line:
    """One request of a batch and, once answered, its result line."""

    custom_id: str
    body: dict[str, Any]
    model: str
    outcome: dict[str, Any] | None = None  # {"ok": bool, "line": {...}}


@dataclass
class SimBatch:
    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    lines: list[Line]
    mode: str | None  # BATCH_EXPIRE, BATCH_FAIL or None
    created: float  # time.time()
    validating: float
    in_progress: float
    finalizing: float
    canceled_at: float | None = None
    answered_at_cancel: int = 0
    status: str = "validating"
    output_file_id: str | None = None
    error_file_id: str | None = None
    ended_at: float | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def model(self) -> str:
        return self.lines[0].model if self.lines else ""

    def answered_by(self, now: float) -> int:
        """How many of its requests are answered by `now` (in their order)."""
        if self.canceled_at is not None:
            return self.answered_at_cancel
        started = self.created + self.validating
        if now <= started:
            return 0
        share = 1.0 if self.in_progress <= 0 else min(1.0, (now - started) / self.in_progress)
        answered = int(len(self.lines) * share)
        if self.mode == BATCH_EXPIRE:
            answered = min(answered, len(self.lines) // 2)
        return answered


class Batches:
    """The simulator's files and batches, kept in memory for the life of the process."""

    def __init__(self) -> None:
        self.files: dict[str, SimFile] = {}
        self.batches: dict[str, SimBatch] = {}
        self.created = 0
        self.canceled = 0
        self.files_uploaded = 0

    def add_file(self, filename: str, purpose: str, data: bytes) -> SimFile:
        made = SimFile(f"file-{uuid.uuid4().hex[:24]}", filename, purpose, data, int(time.time()))
        self.files[made.id] = made
        return made

    def reset(self) -> None:
        self.created = self.canceled = self.files_uploaded = 0

    def stats(self) -> dict[str, int]:
        return {
            "batches_created": self.created,
            "batches_canceled": self.canceled,
            "files_uploaded": self.files_uploaded,
        }
