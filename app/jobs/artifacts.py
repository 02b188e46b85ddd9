"""Artifacts: a job's binary outputs (images), fenced by the attempt that made them.

The order of writes is what keeps them honest:
1. `save` inserts the row, fenced (only while the attempt still holds the job: LeaseLost
   otherwise), then writes the blob. A blob therefore never exists without a row naming it.
2. The attempt's successful finish publishes its rows in the finishing statement itself
   (`publish_effect`, an sql.Effect): an artifact of a stale, failed or canceled attempt is
   never published, and users only ever see published rows of existing jobs.
3. `sweep_orphans` deletes the blob and then the row of every artifact that can no longer be
   published (its attempt is over without publishing it) and of every artifact whose job was
   deleted (the row's `job_id` went NULL with it). Blob first: a sweep that dies midway leaves
   a row the next sweep finds again.
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from app.jobs import sql
from app.models import Artifact
from app.storage import ArtifactStore, StoreError

if TYPE_CHECKING:
    from app.config import Settings
    from app.db import Database

logger = logging.getLogger(__name__)


class ArtifactNotFound(LookupError):
    pass


@dataclass(frozen=True)
class SavedArtifact:
    """What a kind gets back from `ctx.save_artifact`, and puts in its output."""

    id: uuid.UUID
    name: str
    content_type: str
    size: int
    sha256: str
    width: int | None
    height: int | None

    def reference(self) -> dict[str, Any]:
        return {
            "artifact_id": str(self.id),
            "name": self.name,
            "content_type": self.content_type,
            "size": self.size,
            "width": self.width,
            "height": self.height,
        }


_INSERT_FENCED = text("""
INSERT INTO artifacts (id, job_id, owner, attempt, position, name, content_type, size, sha256,
                       width, height, storage_key)
SELECT :id, id, owner, attempt,
       (SELECT count(*) FROM artifacts WHERE job_id = :job_id AND attempt = :attempt),
       :name, :content_type, :size, :sha256, :width, :height, :storage_key
FROM jobs WHERE id = :job_id AND attempt = :attempt AND status = 'running'
RETURNING id
""")

# The effect of a successful finish: the attempt's artifacts become visible with its output.
PUBLISH_CTE = """published AS (
    UPDATE artifacts SET published_at = now()
    WHERE job_id = (SELECT id FROM changed) AND attempt = :attempt AND published_at IS NULL
)"""

# What can never be published (its attempt is over) or whose job is gone; the newest rows wait
# `grace` so an attempt's insert and its finish are never raced.
_ORPHANS = text("""
SELECT a.id, a.storage_key FROM artifacts a
WHERE (a.job_id IS NULL
       OR (a.published_at IS NULL AND a.created_at < now() - make_interval(secs => :grace)
           AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = a.job_id
                           AND j.attempt = a.attempt AND j.status = 'running')))
ORDER BY a.created_at
LIMIT :limit
FOR UPDATE OF a SKIP LOCKED
""")


def publish_effect() -> sql.Effect:
    return sql.Effect(PUBLISH_CTE)


def storage_key(job_id: uuid.UUID, attempt: int, artifact_id: uuid.UUID, content_type: str) -> str:
    suffix = mimetypes.guess_extension(content_type) or ""
    return f"jobs/{job_id}/{attempt}/{artifact_id}{suffix}"


class Artifacts:
    """The artifact rows in PostgreSQL and their blobs in the store (`runtime().artifacts`)."""

    def __init__(self, settings: Settings, db: Database, store: ArtifactStore) -> None:
        self.settings = settings
        self.db = db
        self.store = store

    def save(
        self,
        job_id: uuid.UUID,
        attempt: int,
        name: str,
        data: bytes,
        content_type: str,
        *,
        width: int | None = None,
        height: int | None = None,
    ) -> SavedArtifact | None:
        """The row (fenced by `attempt`), then the blob. None: the attempt no longer holds the
        job, and nothing was written."""
        artifact_id = uuid.uuid4()
        saved = SavedArtifact(
            artifact_id,
            name,
            content_type,
            len(data),
            hashlib.sha256(data).hexdigest(),
            width,
            height,
        )
        key = storage_key(job_id, attempt, artifact_id, content_type)
        params = {
            "id": artifact_id,
            "job_id": job_id,
            "attempt": attempt,
            "name": name,
            "content_type": content_type,
            "size": saved.size,
            "sha256": saved.sha256,
            "width": width,
            "height": height,
            "storage_key": key,
        }
        with self.db.engine.begin() as connection:
            if connection.execute(_INSERT_FENCED, params).one_or_none() is None:
                return None
        self.store.put(key, data, content_type)
        return saved

    def read(self, row: Artifact, start: int = 0, length: int | None = None) -> Iterator[bytes]:
        return self.store.read(row.storage_key, start, length)

    def sweep_orphans(self, limit: int = 200) -> int:
        """Deletes up to `limit` orphaned artifacts (see the module's docstring); how many."""
        with self.db.transaction() as session:
            rows = session.execute(
                _ORPHANS, {"grace": self.settings.artifact_orphan_grace, "limit": limit}
            ).all()
            if not rows:
                return 0
            try:
                self.store.delete([row.storage_key for row in rows])
            except StoreError as exc:
                # Rows stay, so the next sweep tries again.
                logger.warning("artifact sweep: %s", exc)
                return 0
            session.execute(
                Artifact.__table__.delete().where(Artifact.id.in_([row.id for row in rows]))
            )
        return len(rows)


# Reading, in the caller's session (the API's) ------------------------------------------------


def job_artifacts(session: Session, owner: str, job_id: uuid.UUID) -> list[Artifact]:
    query = select(Artifact).where(
        Artifact.owner == owner,
        Artifact.job_id == job_id,
        Artifact.published_at.is_not(None),
    )
    return list(session.scalars(query.order_by(Artifact.position)))


def get_artifact(session: Session, owner: str | None, artifact_id: uuid.UUID) -> Artifact:
    """A published artifact of an existing job; `owner` None: whoever owns it (a signed URL
    was checked instead)."""
    query = select(Artifact).where(
        Artifact.id == artifact_id,
        Artifact.job_id.is_not(None),
        Artifact.published_at.is_not(None),
    )
    if owner is not None:
        query = query.where(Artifact.owner == owner)
    row = session.scalars(query).one_or_none()
    if row is None:
        raise ArtifactNotFound(f"no artifact {artifact_id}")
    return row
