"""Where artifacts' bytes live: a filesystem directory (one host, or a volume every web and
worker process mounts) or an S3-compatible bucket (several hosts).

A store only holds bytes under keys. Which keys exist for users, whose they are and whether
they are published is PostgreSQL's business (app/jobs/artifacts.py): the store is written
before the row that makes a blob visible, and blobs without a visible row are swept.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from app.config import Settings

CHUNK_BYTES = 64 * 1024


class StoreError(Exception):
    """The store could not do what was asked (unreachable, refused, out of space)."""


class BlobMissing(StoreError):
    """No blob under the key."""


class ArtifactStore(Protocol):
    name: str

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Stores `data` under `key` whole or not at all (a reader never sees half a blob)."""

    def read(self, key: str, start: int = 0, length: int | None = None) -> Iterator[bytes]:
        """The bytes from `start`, `length` of them (to the end when None), in chunks.
        BlobMissing when there is no such blob."""

    def delete(self, keys: Iterable[str]) -> None:
        """Removes the blobs; a key with no blob is not an error."""

    def check(self) -> None:
        """Raises StoreError when the store cannot be reached (readiness)."""


def build_store(settings: Settings) -> ArtifactStore:
    if settings.artifact_store == "s3":
        from app.storage.s3 import S3Store

        return S3Store.from_settings(settings)
    from app.storage.filesystem import FilesystemStore

    return FilesystemStore(settings.artifact_dir)


__all__ = ["CHUNK_BYTES", "ArtifactStore", "BlobMissing", "StoreError", "build_store"]
