"""Artifacts in an S3-compatible bucket, through boto3: AWS S3, and any store that speaks its API
(MinIO, Cloudflare R2, Ceph RGW, moto's server in the tests). For deployments with several
hosts, where web and worker processes share no filesystem."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from app.storage import CHUNK_BYTES, BlobMissing, StoreError

if TYPE_CHECKING:
    from app.config import Settings

# DeleteObjects takes at most 1000 keys a request.
DELETE_BATCH = 1000
MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


class S3Store:
    name = "s3"

    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        self._client = client
        self.bucket = bucket
        self.prefix = prefix

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Store:
        if not settings.s3_bucket:
            raise ValueError("CONVEYOR_ARTIFACT_STORE=s3 needs CONVEYOR_S3_BUCKET")
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key_id,
            aws_secret_access_key=settings.s3_secret_access_key,
            # Bounded waits, so a stalled store fails a request instead of hanging a worker
            # slot; botocore's own retries cover throttling and dropped connections.
            config=Config(
                connect_timeout=5,
                read_timeout=30,
                retries={"max_attempts": 4, "mode": "standard"},
                max_pool_connections=max(10, settings.worker_concurrency),
            ),
        )
        return cls(client, settings.s3_bucket, settings.s3_prefix)

    def _key(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def put(self, key: str, data: bytes, content_type: str) -> None:
        # One PutObject: S3 makes an object visible whole or not at all.
        try:
            self._client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type
            )
        except (BotoCoreError, ClientError) as exc:
            raise StoreError(f"cannot write artifact {key}: {exc}") from exc

    def read(self, key: str, start: int = 0, length: int | None = None) -> Iterator[bytes]:
        options: dict[str, Any] = {}
        if length == 0:
            # `bytes=5-4` is no range to S3, which then sends the whole object: ask only
            # whether the blob exists.
            self._ask(self._client.head_object, key)
            return iter(())
        if start or length is not None:
            end = "" if length is None else str(start + length - 1)
            options["Range"] = f"bytes={start}-{end}"
        try:
            body = self._ask(self._client.get_object, key, **options)["Body"]
        except _NothingInRange:
            # A start at or past the end (any range of an empty blob) is a 416 to S3; the
            # contract, like a file, reads nothing there.
            return iter(())
        return _chunks(key, body)

    def _ask(self, method: Any, key: str, **options: Any) -> Any:
        """A read request about one object, its errors in the store's terms."""
        try:
            return method(Bucket=self.bucket, Key=self._key(key), **options)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in MISSING_CODES:
                raise BlobMissing(key) from None
            if code == "InvalidRange":
                raise _NothingInRange from None
            raise StoreError(f"cannot read artifact {key}: {exc}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"cannot read artifact {key}: {exc}") from exc

    def delete(self, keys: Iterable[str]) -> None:
        names = [self._key(key) for key in keys]
        for i in range(0, len(names), DELETE_BATCH):
            objects = [{"Key": name} for name in names[i : i + DELETE_BATCH]]
            try:
                answer = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True}
                )
            except (BotoCoreError, ClientError) as exc:
                raise StoreError(f"cannot delete artifacts: {exc}") from exc
            errors = [e for e in answer.get("Errors", ()) if e.get("Code") not in MISSING_CODES]
            if errors:
                raise StoreError(f"cannot delete {len(errors)} artifacts: {errors[0]}")

    def check(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchBucket"}:
                raise StoreError(f"bucket {self.bucket} does not exist (create it)") from exc
            raise StoreError(f"bucket {self.bucket}: {exc}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"bucket {self.bucket}: {exc}") from exc


class _NothingInRange(Exception):
    pass


def _chunks(key: str, body: Any) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(CHUNK_BYTES)
    except BotoCoreError as exc:
        # A connection dropped or timed out mid-body: the store's error, like any other.
        raise StoreError(f"cannot read artifact {key}: {exc}") from exc
    finally:
        body.close()
