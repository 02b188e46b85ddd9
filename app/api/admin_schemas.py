"""The shapes of the admin's routes: API keys (`/keys`) and the views across owners
(`/admin/...`). Kept apart from schemas.py, whose models are the tenants'."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.api.schemas import Instant, JobFilters, JobOut
from app.jobs.bulk import MAX_BULK
from app.jobs.listing import JobFilter
from app.keys.api_keys import DEFAULT_SCOPES, key_state, ordered_scopes
from app.models import ApiKey, Job

Scope = Literal["jobs:read", "jobs:write", "admin"]
KeyState = Literal["active", "expired", "revoked"]
# Printable text: no control characters (a NUL cannot even be stored).
PRINTABLE = r"^[^\x00-\x1f\x7f]+$"
MAX_FAILURE_WINDOW = 30 * 24 * 3600  # seconds


# Keys -------------------------------------------------------------------------------------------


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    owner: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        pattern=PRINTABLE,
        description="The tenant whose jobs the key reaches; default: the caller's",
    )
    name: str = Field("default", min_length=1, max_length=200, pattern=PRINTABLE)
    scopes: list[Scope] = Field(
        list(DEFAULT_SCOPES),
        min_length=1,
        max_length=3,
        description="`jobs:read`, `jobs:write`, `admin`; each at most once",
    )
    expires_at: Instant | None = Field(
        None, description="When the key stops working (ISO 8601, no offset means UTC); null: never"
    )

    @field_validator("scopes")
    @classmethod
    def _each_once(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("names a scope twice")
        return ordered_scopes(value)

    @field_validator("expires_at")
    @classmethod
    def _in_the_future(cls, value: datetime | None) -> datetime | None:
        if value is not None and value <= datetime.now(UTC):
            raise ValueError("must be in the future")
        return value


class KeyLinks(BaseModel):
    self: str


class KeyOut(BaseModel):
    """A key as the admin sees it: never its secret, nor its hash."""

    id: uuid.UUID
    name: str
    owner: str
    prefix: str = Field(description="The key's first 12 characters, to recognise it by")
    scopes: list[Scope]
    state: KeyState = Field(description="`active`, `expired` (past `expires_at`) or `revoked`")
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None = Field(
        description="When the key last authenticated a request, to within a minute or so"
    )
    revoked_at: datetime | None
    created_by: uuid.UUID | None = Field(description="The admin key that created it, if any")
    links: KeyLinks

    @classmethod
    def fields_of(cls, row: ApiKey, prefix: str) -> dict[str, Any]:
        return {
            "id": row.id,
            "name": row.name,
            "owner": row.owner,
            "prefix": row.prefix,
            "scopes": list(row.scopes),
            "state": key_state(row),
            "created_at": row.created_at,
            "expires_at": row.expires_at,
            "last_used_at": row.last_used_at,
            "revoked_at": row.revoked_at,
            "created_by": row.created_by,
            "links": KeyLinks(self=f"{prefix}/keys/{row.id}"),
        }

    @classmethod
    def of(cls, row: ApiKey, prefix: str) -> KeyOut:
        return cls(**cls.fields_of(row, prefix))


class KeyCreated(KeyOut):
    key: str = Field(description="The secret: shown this once, never again")


class KeyListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    owner: str | None = Field(None, min_length=1, max_length=200)
    state: KeyState | None = None
    limit: int = Field(20, ge=1, le=100)
    cursor: str | None = Field(None, max_length=200)


class KeyPage(BaseModel):
    items: list[KeyOut]
    next_cursor: str | None = Field(description="Pass as `cursor` to get the next page")


# Jobs across owners ---------------------------------------------------------------------------


class AdminJobFilters(JobFilters):
    """The job list's filters, and the owner (every owner's jobs without it)."""

    owner: str | None = Field(None, min_length=1, max_length=200)

    def to_filter(self) -> JobFilter:
        return JobFilter(
            owner=self.owner,
            status=self.status,
            kind=self.kind,
            created_after=self.created_after,
            created_before=self.created_before,
        )


class AdminJobListQuery(AdminJobFilters):
    limit: int = Field(20, ge=1, le=100)
    cursor: str | None = Field(None, max_length=200)


class AdminJobOut(JobOut):
    owner: str

    @classmethod
    def of_job(cls, job: Job, prefix: str) -> AdminJobOut:
        return cls(owner=job.owner, **dict(JobOut.of(job, prefix)))


class AdminJobPage(BaseModel):
    items: list[AdminJobOut]
    next_cursor: str | None = Field(description="Pass as `cursor` to get the next page")


CRITERIA = ("owner", "status", "kind", "created_after", "created_before")


class BulkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filter: AdminJobFilters = Field(
        description="Which jobs: at least one of owner, status, kind, created_after, created_before"
    )
    limit: int = Field(
        1000, ge=1, le=MAX_BULK, description="At most this many jobs, newest first, per call"
    )

    @field_validator("filter")
    @classmethod
    def _a_filter_that_chooses(cls, value: AdminJobFilters) -> AdminJobFilters:
        if all(getattr(value, name) is None for name in CRITERIA):
            raise ValueError(f"name at least one of {', '.join(CRITERIA)}")
        return value


class BulkCancelOut(BaseModel):
    canceled: int = Field(description="Queued jobs, canceled at once")
    stopping: int = Field(description="Running jobs whose workers were told to stop")
    more: bool = Field(description="More jobs match: call again")


class BulkRetryOut(BaseModel):
    retried: int
    jobs: list[uuid.UUID] = Field(description="The new jobs, one per job retried")
    more: bool = Field(description="More jobs match: call again")


class FailuresQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    window: int = Field(
        3600, ge=1, le=MAX_FAILURE_WINDOW, description="Seconds back from now (at most 30 days)"
    )
    owner: str | None = Field(None, min_length=1, max_length=200)
    kind: str | None = Field(None, max_length=64)


class FailureCount(BaseModel):
    code: str
    count: int


class FailuresOut(BaseModel):
    window: int
    since: datetime
    total: int
    by_code: list[FailureCount] = Field(description="Most frequent first")
