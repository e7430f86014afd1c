"""The artifact store's quota, least-recently-used collection and pinning; partial fetches
and manifests."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from pollen.runtime.artifacts import (
    MANIFEST_CHUNK_BYTES,
    ArtifactStore,
    ArtifactTooLarge,
    CorruptArtifact,
    DigestMismatch,
    QuotaExceeded,
    sha256_digest,
)


def blob(tag: int, size: int = 40) -> bytes:
    return bytes([tag]) * size


class Clock:
    """A clock that moves a second every reading: each use ranks after the one before."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


def quota_store(tmp_path: Path, quota: int, pinned: set[str] | None = None) -> ArtifactStore:
    return ArtifactStore(
        tmp_path / "artifacts", quota=quota, pinned=lambda: pinned or set(), clock=Clock()
    )


def test_the_least_recently_used_goes_first(tmp_path: Path) -> None:
    store = quota_store(tmp_path, 100)
    a, b = store.put(blob(1)), store.put(blob(2))
    store.read(a)  # a used after b was stored: b is the least recently used now
    c = store.put(blob(3))
    assert store.digests() == sorted([a, c]) and b not in store.digests()
    assert store.usage() == 80
    d = store.put(blob(4))  # then a, older than c
    assert store.digests() == sorted([c, d])


def test_a_pinned_artifact_is_never_collected(tmp_path: Path) -> None:
    pinned: set[str] = set()
    store = quota_store(tmp_path, 100, pinned)
    a = store.put(blob(1))
    b = store.put(blob(2))
    pinned.add(a)  # a replica on this node uses a, the least recently used
    c = store.put(blob(3))
    assert store.digests() == sorted([a, c])  # b went instead
    assert b not in store.digests()


def test_when_pinned_artifacts_fill_the_quota_a_new_one_is_refused(tmp_path: Path) -> None:
    pinned: set[str] = set()
    store = quota_store(tmp_path, 100, pinned)
    pinned |= {store.put(blob(1)), store.put(blob(2))}
    with pytest.raises(QuotaExceeded, match="artifacts this node's replicas use"):
        store.put(blob(3))
    assert store.digests() == sorted(pinned)
    assert not list(store.directory.glob(".incoming-*"))


def test_an_artifact_larger_than_the_quota_is_refused_and_nothing_is_collected(
    tmp_path: Path,
) -> None:
    store = quota_store(tmp_path, 100)
    kept = store.put(blob(1))
    with pytest.raises(ArtifactTooLarge, match="over this node's artifact quota of 100 bytes"):
        store.put(blob(2, 101))
    with pytest.raises(ArtifactTooLarge, match="quota"):
        store.writer(size=101)
    digest = sha256_digest(blob(2, 101))
    with pytest.raises(ArtifactTooLarge, match=f"{digest} is 101 bytes, over"):
        store.partial(digest, 101)
    assert store.digests() == [kept]
    assert not list(store.directory.glob(".incoming-*"))
    assert not list(store.directory.glob(".partial-*"))


def test_a_write_of_known_size_makes_room_before_it_starts(tmp_path: Path) -> None:
    store = quota_store(tmp_path, 100)
    old = store.put(blob(1, 60))
    with store.writer(size=60) as writer:
        assert store.digests() == []  # the room was made before a byte was written
        writer.write(blob(2, 60))
        writer.commit()
    assert old not in store.digests()


def test_partial_fetches_count_and_abandoned_ones_go_first(tmp_path: Path) -> None:
    store = quota_store(tmp_path, 100)
    kept = store.put(blob(1))
    data = blob(2)
    abandoned = store.partial(sha256_digest(data), len(data))
    abandoned.write_at(0, data[:10])
    abandoned.close()
    assert store.usage() == 80
    store.put(blob(3))  # the abandoned partial is deleted first, the artifact stays
    assert kept in store.digests()
    assert not abandoned.path.exists()


def test_a_fetch_in_progress_is_neither_collected_nor_started_twice(tmp_path: Path) -> None:
    store = quota_store(tmp_path, 100)
    data = blob(2)
    digest = sha256_digest(data)
    partial = store.partial(digest, len(data))
    with pytest.raises(Exception, match="being fetched already"):
        store.partial(digest, len(data))
    third = store.put(blob(3))
    fourth = store.put(blob(4))  # 40 + 40 + 40 > 100: the stored one goes, not the fetch
    assert store.digests() == [fourth] and third != fourth
    assert partial.path.exists()
    partial.write_at(0, data)
    assert partial.commit() == digest
    assert store.read(digest) == data


def test_a_partial_fetch_resumes_and_appears_only_whole(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    data = os.urandom(100_000)
    digest = sha256_digest(data)
    partial = store.partial(digest, len(data))
    assert not partial.resumed
    partial.write_at(0, data[:50_000])
    partial.close()
    assert not store.has(digest)
    reopened = ArtifactStore(tmp_path / "artifacts")  # a restart keeps it
    partial = reopened.partial(digest, len(data))
    assert partial.resumed
    assert partial.read_at(0, 50_000) == data[:50_000]
    partial.write_at(50_000, data[50_000:])
    assert partial.commit() == digest
    assert reopened.verify(digest) and reopened.read(digest) == data
    assert not partial.path.exists()


def test_a_partial_that_does_not_add_up_is_refused_and_kept_for_repair(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    data = os.urandom(1000)
    digest = sha256_digest(data)
    partial = store.partial(digest, len(data))
    partial.write_at(0, data[:999] + b"\0")
    with pytest.raises(DigestMismatch):
        partial.commit()
    assert not store.has(digest) and partial.path.exists()
    partial.write_at(999, data[999:])
    assert partial.commit() == digest


def test_an_old_abandoned_partial_is_deleted_at_open(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    partial = store.partial(sha256_digest(b"x"), 1)
    partial.close()
    day_ago = time.time() - 2 * 86400
    os.utime(partial.path, (day_ago, day_ago))
    ArtifactStore(tmp_path / "artifacts")
    assert not partial.path.exists()


def test_the_manifest_is_made_while_writing_and_checked_when_serving(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    data = os.urandom(2 * MANIFEST_CHUNK_BYTES + 5)
    digest = store.put(data)
    manifest = store.manifest(digest)
    assert manifest.size == len(data) and manifest.count == 3
    assert manifest.hashes[2] == hashlib.sha256(data[2 * MANIFEST_CHUNK_BYTES :]).digest()
    assert (
        bytes(store.read_chunk(digest, manifest, 1))
        == data[MANIFEST_CHUNK_BYTES:][:MANIFEST_CHUNK_BYTES]
    )
    # Altered on disk (a new modification time): the chunk is hashed again, found wrong,
    # and the copy dropped rather than served.
    path = store.path(digest)
    with open(path, "r+b") as file:
        file.seek(MANIFEST_CHUNK_BYTES + 3)
        file.write(b"\xff")
    os.utime(path, ns=(1, 1))
    with pytest.raises(CorruptArtifact):
        store.read_chunk(digest, manifest, 1)
    assert not store.has(digest)
