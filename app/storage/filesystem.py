"""Artifacts as files under one directory: the default, and what `make dev` uses.

Several hosts can share it only through a volume they all mount (docker-compose's shared
volume); otherwise use the S3 store."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from app.storage import CHUNK_BYTES, BlobMissing, StoreError


class FilesystemStore:
    name = "filesystem"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        # Keys are built by Conveyor from ids (app/jobs/artifacts.py), never from user input;
        # refusing anything that could leave the root keeps that true if it ever changes.
        if key.startswith("/") or ".." in key.split("/"):
            raise StoreError(f"bad artifact key {key!r}")
        return self.root / key

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        try:
            # Written beside the target and renamed over it: a reader (or a crash) never sees a
            # half-written file, and fsync makes the rename survive a power cut.
            fd, tmp = self._partial_file(path.parent)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            raise StoreError(f"cannot write artifact {key}: {exc}") from exc

    def _partial_file(self, directory: Path) -> tuple[int, str]:
        tries = 3
        while True:
            tries -= 1
            try:
                directory.mkdir(parents=True, exist_ok=True)
                return tempfile.mkstemp(dir=directory, prefix=".partial-")
            except FileNotFoundError:
                # A delete removed a directory it had emptied (a job's, or `jobs/`) between
                # our mkdir and mkstemp: make it again.
                if not tries:
                    raise

    def read(self, key: str, start: int = 0, length: int | None = None) -> Iterator[bytes]:
        try:
            handle = self._path(key).open("rb")
        except FileNotFoundError:
            raise BlobMissing(key) from None
        except OSError as exc:
            raise StoreError(f"cannot read artifact {key}: {exc}") from exc
        return _chunks(key, handle, start, length)

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            path = self._path(key)
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot delete artifact {key}: {exc}") from exc
            # Emptied directories (a job's, an attempt's) go with their last file, up to the
            # root but never the root itself.
            with contextlib.suppress(OSError):
                for directory in path.relative_to(self.root).parents[:-1]:
                    (self.root / directory).rmdir()

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"artifact directory {self.root}: {exc}") from exc
        if not os.access(self.root, os.W_OK):
            raise StoreError(f"artifact directory {self.root} is not writable")


def _chunks(key: str, handle: BinaryIO, start: int, length: int | None) -> Iterator[bytes]:
    with handle:
        handle.seek(start)
        left = length
        while left is None or left > 0:
            size = CHUNK_BYTES if left is None else min(CHUNK_BYTES, left)
            try:
                chunk = handle.read(size)
            except OSError as exc:
                raise StoreError(f"cannot read artifact {key}: {exc}") from exc
            if not chunk:
                return
            if left is not None:
                left -= len(chunk)
            yield chunk
