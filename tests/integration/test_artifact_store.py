"""The artifact store's contract (app/storage/__init__.py), held by both stores: the filesystem
store on a temporary directory, and the S3 store through boto3 against moto's S3 server running
as a process of its own (tests/s3server.py), under a key prefix of each test's own."""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from app.config import Settings
from app.config import testing_settings as settings_for_tests
from app.storage import CHUNK_BYTES, ArtifactStore, BlobMissing, StoreError, build_store
from app.storage.filesystem import FilesystemStore
from app.storage.s3 import S3Store
from tests import s3server
from tests.s3server import MotoS3Server

SIZE = 3 * CHUNK_BYTES + 123  # several chunks and a partial one


def s3_settings(server: MotoS3Server, bucket: str | None, prefix: str = "") -> Settings:
    return settings_for_tests(
        artifact_store="s3",
        s3_bucket=bucket,
        s3_prefix=prefix,
        s3_endpoint_url=server.endpoint_url,
        s3_region=s3server.REGION,
        s3_access_key_id=s3server.ACCESS_KEY_ID,
        s3_secret_access_key=s3server.SECRET_ACCESS_KEY,
    )


@pytest.fixture(params=["filesystem", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "filesystem":
        made = build_store(settings_for_tests(artifact_dir=tmp_path / "artifacts"))
        assert isinstance(made, FilesystemStore)
        return made
    server: MotoS3Server = request.getfixturevalue("s3_server")
    bucket: str = request.getfixturevalue("s3_bucket")
    made = build_store(s3_settings(server, bucket, prefix=f"test-{uuid.uuid4().hex[:8]}/"))
    assert isinstance(made, S3Store)
    return made


def a_key() -> str:
    return f"jobs/{uuid.uuid4()}/1/{uuid.uuid4()}.png"


def read_all(store: ArtifactStore, key: str, start: int = 0, length: int | None = None) -> bytes:
    return b"".join(store.read(key, start, length))


def test_put_then_read_whole(store: ArtifactStore) -> None:
    key, data = a_key(), os.urandom(SIZE)
    store.put(key, data, "image/png")
    assert read_all(store, key) == data


def test_an_empty_blob_reads_as_nothing(store: ArtifactStore) -> None:
    key = a_key()
    store.put(key, b"", "application/octet-stream")
    assert read_all(store, key) == b""
    assert read_all(store, key, 0, 10) == b""


@pytest.mark.parametrize(
    ("start", "length"),
    [
        (0, None),
        (0, 1),
        (10, None),  # to the end
        (10, 100),
        (CHUNK_BYTES - 5, 10),  # across a chunk boundary
        (5, 2 * CHUNK_BYTES),
        (SIZE - 10, 100),  # a length past the end: what there is
        (SIZE - 1, None),
        (SIZE, None),  # at the end: nothing
        (SIZE + 100, 10),  # beyond the end: nothing
        (5, 0),  # nothing asked: nothing, not the whole blob
    ],
)
def test_range_reads(store: ArtifactStore, start: int, length: int | None) -> None:
    key, data = a_key(), os.urandom(SIZE)
    store.put(key, data, "image/png")
    end = None if length is None else start + length
    assert read_all(store, key, start, length) == data[start:end]


@pytest.mark.parametrize(("start", "length"), [(0, None), (10, 5), (0, 0)])
def test_a_missing_key_raises_blob_missing_before_any_byte(
    store: ArtifactStore, start: int, length: int | None
) -> None:
    # read() itself raises, not the first next(): the API must know before it sends headers.
    with pytest.raises(BlobMissing):
        store.read(a_key(), start, length)
    assert issubclass(BlobMissing, StoreError)


def test_delete_of_present_and_missing_keys(store: ArtifactStore) -> None:
    kept, gone, never = a_key(), a_key(), a_key()
    store.put(kept, b"kept", "text/plain")
    store.put(gone, b"gone", "text/plain")
    store.delete([gone, never])
    store.delete([gone])  # again: still not an error
    store.delete([])
    with pytest.raises(BlobMissing):
        store.read(gone)
    assert read_all(store, kept) == b"kept"


def test_delete_many_keys_at_once(store: ArtifactStore) -> None:
    keys = [a_key() for _ in range(25)]
    for key in keys:
        store.put(key, key.encode(), "text/plain")
    store.delete(keys)
    for key in keys:
        with pytest.raises(BlobMissing):
            store.read(key)


def test_put_overwrites_and_a_reader_sees_one_whole_version(store: ArtifactStore) -> None:
    key = a_key()
    versions = [bytes([n]) * (4 * CHUNK_BYTES) for n in (1, 2)]
    store.put(key, versions[0], "image/png")
    seen: list[bytes] = []
    failures: list[BaseException] = []
    writing = threading.Event()
    writing.set()

    def reader() -> None:
        try:
            while writing.is_set():
                seen.append(read_all(store, key))
        except BaseException as exc:
            failures.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for thread in readers:
        thread.start()
    try:
        deadline = time.monotonic() + 30
        for n in range(30):
            store.put(key, versions[n % 2], "image/png")
            assert time.monotonic() < deadline
    finally:
        writing.clear()
        for thread in readers:
            thread.join(timeout=30)
    assert not failures, failures
    assert seen and all(blob in versions for blob in seen), {len(blob) for blob in seen}
    assert read_all(store, key) == versions[29 % 2]


def test_a_large_blob_round_trips_in_chunks(store: ArtifactStore) -> None:
    key, data = a_key(), os.urandom(5 * 1024 * 1024)
    store.put(key, data, "image/png")
    digest, chunks = hashlib.sha256(), 0
    for chunk in store.read(key):
        assert 0 < len(chunk) <= CHUNK_BYTES
        digest.update(chunk)
        chunks += 1
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert chunks >= len(data) // CHUNK_BYTES  # streamed, never held whole


def test_check_passes_on_a_working_store(store: ArtifactStore) -> None:
    store.check()


# The S3 store -----------------------------------------------------------------------------------


def test_s3_keys_live_under_the_prefix(s3_server: MotoS3Server, s3_bucket: str) -> None:
    prefix = f"conveyor-{uuid.uuid4().hex[:8]}/"
    store = S3Store.from_settings(s3_settings(s3_server, s3_bucket, prefix))
    keys = [a_key(), a_key()]
    for key in keys:
        store.put(key, b"x", "image/png")
    client = s3_server.client()
    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix=prefix)["Contents"]
    assert sorted(item["Key"] for item in listed) == sorted(prefix + key for key in keys)
    # Under the prefix only: no object of this test's keys outside it.
    everything = client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
    names = [item["Key"] for page in everything for item in page.get("Contents", [])]
    assert sorted(name for name in names if name.endswith(tuple(keys))) == sorted(
        prefix + key for key in keys
    )
    head = client.head_object(Bucket=s3_bucket, Key=prefix + keys[0])
    assert head["ContentType"] == "image/png"
    store.delete(keys)
    assert client.list_objects_v2(Bucket=s3_bucket, Prefix=prefix)["KeyCount"] == 0


def test_s3_check_fails_for_a_missing_bucket(s3_server: MotoS3Server) -> None:
    store = S3Store.from_settings(s3_settings(s3_server, f"missing-{uuid.uuid4().hex[:8]}"))
    with pytest.raises(StoreError, match=r"bucket missing-.* does not exist"):
        store.check()


def test_s3_store_needs_a_bucket(s3_server: MotoS3Server) -> None:
    with pytest.raises(ValueError, match="CONVEYOR_S3_BUCKET"):
        S3Store.from_settings(s3_settings(s3_server, None))
    with pytest.raises(ValueError, match="CONVEYOR_S3_BUCKET"):
        build_store(s3_settings(s3_server, None))


# The filesystem store ---------------------------------------------------------------------------


def test_filesystem_check_fails_when_the_directory_cannot_be_made(tmp_path: Path) -> None:
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a directory")
    with pytest.raises(StoreError, match="artifact directory"):
        FilesystemStore(in_the_way / "artifacts").check()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to a read-only directory anyway")
def test_filesystem_check_fails_on_a_read_only_directory(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    root.mkdir(mode=0o500)
    with pytest.raises(StoreError, match="not writable"):
        FilesystemStore(root).check()


@pytest.mark.parametrize("key", ["../escape.png", "jobs/../../escape.png", "/etc/escape.png"])
def test_filesystem_refuses_keys_that_leave_its_root(tmp_path: Path, key: str) -> None:
    store = FilesystemStore(tmp_path / "root" / "artifacts")
    with pytest.raises(StoreError, match="bad artifact key"):
        store.put(key, b"x", "image/png")
    with pytest.raises(StoreError, match="bad artifact key"):
        store.read(key)
    with pytest.raises(StoreError, match="bad artifact key"):
        store.delete([key])
    assert [path for path in tmp_path.rglob("*") if path.is_file()] == []


def test_filesystem_leaves_no_partial_files(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "artifacts")
    key = a_key()
    store.put(key, b"one", "image/png")
    store.put(key, b"two", "image/png")
    assert [path.name for path in (tmp_path / "artifacts").rglob("*") if path.is_file()] == [
        Path(key).name
    ]


def test_filesystem_delete_removes_emptied_directories_but_never_its_root(
    tmp_path: Path,
) -> None:
    root = tmp_path / "outer" / "artifacts"
    store = FilesystemStore(root)
    nested, top_level = a_key(), "lonely.png"
    store.put(nested, b"x", "image/png")
    store.put(top_level, b"x", "image/png")
    store.delete([nested, top_level])
    assert root.is_dir()
    assert list(root.iterdir()) == []
    assert (tmp_path / "outer").is_dir()
