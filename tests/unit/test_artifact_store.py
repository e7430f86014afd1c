"""The content-addressed artifact store: atomic writes, verification, hostile digests."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pollen.resources.models import ArtifactReference, artifact_reference, is_local_path
from pollen.runtime.artifacts import (
    ArtifactNotFound,
    ArtifactStore,
    ArtifactTooLarge,
    CorruptArtifact,
    DigestMismatch,
    InvalidDigest,
    digest_hex,
    sha256_digest,
)

HELLO = b"\0asm\x01\0\0\0hello"
HELLO_DIGEST = "sha256:" + hashlib.sha256(HELLO).hexdigest()


def flip_a_byte(path: Path, offset: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    # Written in place, as bit rot or a careless edit would: same inode, same name.
    with open(path, "r+b") as file:
        file.write(data)


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


def test_put_then_read_everything_back(store: ArtifactStore) -> None:
    digest = store.put(HELLO)
    assert digest == HELLO_DIGEST == sha256_digest(HELLO)
    assert store.has(digest)
    assert store.read(digest) == HELLO
    assert store.size(digest) == len(HELLO)
    assert store.digests() == [digest]
    assert store.path(digest) == store.root / "sha256" / digest_hex(digest)
    assert store.path(digest).read_bytes() == HELLO
    assert store.verify(digest)


def test_a_missing_digest(store: ArtifactStore) -> None:
    assert not store.has(HELLO_DIGEST)
    assert not store.verify(HELLO_DIGEST)
    with pytest.raises(ArtifactNotFound, match="does not hold"):
        store.read(HELLO_DIGEST)
    with pytest.raises(ArtifactNotFound):
        store.size(HELLO_DIGEST)
    assert not store.remove(HELLO_DIGEST)


def test_remove(store: ArtifactStore) -> None:
    digest = store.put(HELLO)
    assert store.remove(digest)
    assert not store.has(digest)
    assert store.digests() == [] == store.recent()


def test_put_with_the_wrong_expected_digest_leaves_nothing(store: ArtifactStore) -> None:
    wrong = "sha256:" + "0" * 64
    with pytest.raises(DigestMismatch, match="hash to"):
        store.put(HELLO, expected=wrong)
    assert not store.has(wrong) and not store.has(HELLO_DIGEST)
    assert list(store.directory.iterdir()) == []


def test_streaming_writer_checks_size_and_digest(store: ArtifactStore) -> None:
    with store.writer(HELLO_DIGEST, size=len(HELLO)) as writer:
        for index in range(0, len(HELLO), 3):
            writer.write(HELLO[index : index + 3])
        assert writer.commit() == HELLO_DIGEST
    assert store.read(HELLO_DIGEST) == HELLO
    with pytest.raises(ArtifactTooLarge, match="announced size"), store.writer(size=2) as writer:
        writer.write(b"abc")
    with pytest.raises(DigestMismatch, match="announced"), store.writer(size=5) as writer:
        writer.write(b"abc")
        writer.commit()
    assert store.digests() == [HELLO_DIGEST]
    assert [p.name for p in store.directory.iterdir()] == [digest_hex(HELLO_DIGEST)]


def test_a_write_abandoned_midway_leaves_nothing(store: ArtifactStore) -> None:
    with pytest.raises(RuntimeError), store.writer(HELLO_DIGEST) as writer:
        writer.write(HELLO[:4])
        raise RuntimeError("the fetch was cut off")
    assert list(store.directory.iterdir()) == []


def test_the_size_limit(tmp_path: Path) -> None:
    small = ArtifactStore(tmp_path / "a", max_size=8)
    assert small.put(b"12345678")
    with pytest.raises(ArtifactTooLarge):
        small.put(b"123456789")
    with pytest.raises(ArtifactTooLarge):
        small.writer(size=9)
    assert len(small.digests()) == 1


def test_leftover_temporary_files_are_deleted_on_open(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    digest = store.put(HELLO)
    writer = store.writer()
    writer.write(b"half of something")
    leftover = list(store.directory.glob(".incoming-*"))
    assert len(leftover) == 1
    reopened = ArtifactStore(tmp_path / "artifacts")
    assert not leftover[0].exists()
    assert reopened.digests() == [digest]
    assert reopened.recent() == [digest]


def test_a_corrupt_file_is_never_served_and_is_deleted(store: ArtifactStore) -> None:
    digest = store.put(HELLO)
    flip_a_byte(store.path(digest), offset=5)
    with pytest.raises(CorruptArtifact, match="corrupt"):
        store.read(digest)
    assert not store.has(digest)
    assert store.recent() == []


def test_a_corrupt_file_fails_verification(store: ArtifactStore) -> None:
    digest = store.put(HELLO)
    assert store.verify(digest)
    flip_a_byte(store.path(digest))
    os.utime(store.path(digest), ns=(1, 1))  # the edit is seen even if mtime did not move
    assert not store.verify(digest)
    assert not store.has(digest)


def test_a_truncated_file_is_corrupt(store: ArtifactStore) -> None:
    digest = store.put(HELLO)
    os.truncate(store.path(digest), 3)
    with pytest.raises(CorruptArtifact):
        store.read(digest)


def test_the_reader_keeps_the_last_chunk_back_until_verified(store: ArtifactStore) -> None:
    data = bytes(range(256)) * 40  # ten chunks of 1 KiB
    digest = store.put(data)
    flip_a_byte(store.path(digest), offset=len(data) - 1)
    received = b""
    with store.open(digest, chunk_size=1024) as reader:
        assert reader.size == len(data)
        with pytest.raises(CorruptArtifact):
            while (chunk := reader.next_chunk()) is not None:
                received += chunk
    assert received == data[: len(data) - 1024]  # never the whole, never the bad byte


def test_an_empty_artifact(store: ArtifactStore) -> None:
    digest = store.put(b"")
    assert digest == sha256_digest(b"")
    with store.open(digest) as reader:
        assert reader.size == 0
        assert reader.next_chunk() is None
    assert store.read(digest) == b""


def test_put_file(store: ArtifactStore, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    digest = store.put_file(source)
    assert store.read(digest) == source.read_bytes()


def test_recent_ranks_by_last_use(tmp_path: Path) -> None:
    now = [100.0]
    store = ArtifactStore(tmp_path / "a", clock=lambda: now[0])
    first = store.put(b"one")
    now[0] += 1
    second = store.put(b"two")
    assert store.recent() == [second, first]
    now[0] += 1
    store.read(first)
    assert store.recent() == [first, second]
    assert store.recent(1) == [first]


def test_concurrent_writes_of_one_digest(store: ArtifactStore) -> None:
    data = os.urandom(2 * 1024 * 1024)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(store.put(data))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(results) == {sha256_digest(data)}
    assert store.read(results[0]) == data
    assert [p.name for p in store.directory.iterdir()] == [digest_hex(results[0])]


def test_the_change_callback(tmp_path: Path) -> None:
    calls: list[str] = []
    store = ArtifactStore(tmp_path / "a", on_change=lambda: calls.append("changed"))
    digest = store.put(HELLO)
    store.put(HELLO)  # already held: nothing new to announce
    store.remove(digest)
    assert calls == ["changed", "changed"]


HOSTILE = [
    "",
    "sha256:",
    "sha256:" + "a" * 63,
    "sha256:" + "a" * 65,
    "sha256:" + "A" * 64,
    "SHA256:" + "a" * 64,
    "sha512:" + "a" * 128,
    "a" * 64,
    "sha256:../../../../etc/passwd",
    "sha256:" + "a" * 62 + "/.",
    "sha256:" + "a" * 63 + "\n",
    "sha256:" + "a" * 63 + "g",
    "../sha256:" + "a" * 64,
]


@pytest.mark.parametrize("digest", HOSTILE)
def test_hostile_digests_are_refused(store: ArtifactStore, digest: str) -> None:
    for use in (store.path, store.has, store.read, store.size, store.verify, store.remove):
        with pytest.raises(InvalidDigest, match="not an artifact digest"):
            use(digest)
    with pytest.raises(InvalidDigest):
        store.writer(digest)
    with pytest.raises(InvalidDigest):
        store.put(HELLO, expected=digest)
    assert list(store.directory.iterdir()) == []


@given(st.text(max_size=80) | st.binary(max_size=80).map(lambda b: b.hex()))
def test_only_well_formed_digests_pass(value: str) -> None:
    well_formed = value.startswith("sha256:") and len(value) == 71
    well_formed = well_formed and all(c in "0123456789abcdef" for c in value[7:])
    try:
        digest_hex(value)
    except InvalidDigest:
        assert not well_formed
    else:
        assert well_formed


@given(contents=st.lists(st.binary(max_size=5000), max_size=6))
@settings(
    deadline=None, max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_contents_round_trip(tmp_path: Path, contents: list[bytes]) -> None:
    store = ArtifactStore(tmp_path / os.urandom(6).hex())
    digests = [store.put(data) for data in contents]
    for data, digest in zip(contents, digests, strict=True):
        assert digest == sha256_digest(data)
        assert store.read(digest) == data
        with store.open(digest, chunk_size=7) as reader:
            assert b"".join(reader) == data
    assert store.digests() == sorted(set(digests))


# --- what spec.artifact refers to: the one rule ------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("sha256:" + "a" * 64, ArtifactReference.DIGEST),
        ("hello", ArtifactReference.NAME),
        ("hello.v2", ArtifactReference.NAME),
        ("./hello.wasm", ArtifactReference.PATH),
        ("../build/examples/hello.wasm", ArtifactReference.PATH),
        ("/abs/module", ArtifactReference.PATH),
        ("hello.wasm", ArtifactReference.PATH),
        ("./Weird Name", ArtifactReference.PATH),
    ],
)
def test_artifact_references(value: str, kind: ArtifactReference) -> None:
    assert artifact_reference(value) == kind
    assert is_local_path(value) == (kind == ArtifactReference.PATH)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("sha256:" + "A" * 64, "64 lowercase hex digits"),
        ("sha256:abc", "64 lowercase hex digits"),
        ("Hello", "the name of an Artifact"),
        ("hello world", "the name of an Artifact"),
        ("a" * 254, "the name of an Artifact"),
    ],
)
def test_artifact_references_that_are_nothing(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        artifact_reference(value)
