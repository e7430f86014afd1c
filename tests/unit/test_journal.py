"""The state journal: framing, fsynced appends, recovery from torn and corrupt tails."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pollen.state.document import StateDocument
from pollen.state.journal import (
    CHANGES_MAGIC,
    FILENAME,
    HEADER,
    MAX_FRAME_BYTES,
    Journal,
    JournalError,
    encode_frame,
    recover,
)


def build_journal(directory: Path, writes: int = 3) -> tuple[list[bytes], bytes, list[int]]:
    """A journal with a snapshot and one frame per write of a real document.

    Returns the change payloads, the snapshot, and the file offset where each change frame
    starts (plus the final size).
    """
    doc = StateDocument.new()
    doc.write("Workload", "base", {"spec": {"replicas": 0}})
    snapshot = doc.save()
    changes: list[bytes] = []
    offsets: list[int] = []
    with Journal.open(directory) as journal:
        journal.compact(snapshot)
        for i in range(writes):
            heads = doc.heads()
            doc.write("Workload", f"w-{i}", {"spec": {"replicas": i}})
            payload = doc.changes_since(heads)
            offsets.append(journal.size)
            journal.append(payload)
            changes.append(payload)
        offsets.append(journal.size)
    return changes, snapshot, offsets


def test_missing_file_is_an_empty_journal(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "state") as journal:
        assert journal.recovered.snapshot is None
        assert journal.recovered.data == b""
        with pytest.raises(JournalError):
            journal.append(b"x")  # no snapshot to append to yet


def test_reopen_returns_everything_appended(tmp_path: Path) -> None:
    changes, snapshot, offsets = build_journal(tmp_path)
    with Journal.open(tmp_path) as journal:
        assert journal.recovered.snapshot == snapshot
        assert journal.recovered.changes == changes
        assert journal.recovered.discarded_bytes == 0
        assert journal.size == offsets[-1]
    doc = StateDocument.load(recover(tmp_path / FILENAME).data)
    assert doc.names("Workload") == ["base", "w-0", "w-1", "w-2"]


def test_file_layout(tmp_path: Path) -> None:
    _, snapshot, offsets = build_journal(tmp_path, writes=1)
    data = (tmp_path / FILENAME).read_bytes()
    assert data.startswith(HEADER)
    assert data[len(HEADER) : len(HEADER) + 4] == b"SNAP"
    (length,) = struct.unpack(">I", data[len(HEADER) + 4 : len(HEADER) + 8])
    assert length == len(snapshot)
    assert data[offsets[0] : offsets[0] + 4] == CHANGES_MAGIC


def test_empty_append_writes_nothing(tmp_path: Path) -> None:
    with Journal.open(tmp_path) as journal:
        journal.compact(b"snapshot")
        size = journal.size
        journal.append(b"")
        assert journal.size == size


def test_cut_at_every_byte_of_the_last_frame(tmp_path: Path) -> None:
    source = tmp_path / "source"
    changes, snapshot, offsets = build_journal(source)
    whole = (source / FILENAME).read_bytes()
    last_start, end = offsets[-2], offsets[-1]
    for cut in range(last_start, end + 1):
        directory = tmp_path / f"cut-{cut}"
        directory.mkdir()
        (directory / FILENAME).write_bytes(whole[:cut])
        with Journal.open(directory) as journal:
            recovered = journal.recovered
            expected = changes if cut == end else changes[:-1]
            assert recovered.snapshot == snapshot
            assert recovered.changes == expected, cut
            assert recovered.discarded_bytes == (0 if cut == end else cut - last_start)
            # The torn tail is gone from the file, and appends go after the valid part.
            assert (directory / FILENAME).stat().st_size == (end if cut == end else last_start)
            journal.append(changes[-1])
        assert recover(directory / FILENAME).changes == [*expected, changes[-1]]
        doc = StateDocument.load(recovered.data)
        assert len(doc.names("Workload")) == 1 + len(expected)


def test_recovery_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, _, offsets = build_journal(tmp_path)
    path = tmp_path / FILENAME
    path.write_bytes(path.read_bytes()[: offsets[-1] - 3])
    with caplog.at_level(logging.WARNING, logger="pollen.state.journal"):
        recover(path)
    assert "discarded" in caplog.text
    assert "short frame payload" in caplog.text


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_random_corruption_of_change_frames_keeps_a_valid_prefix(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    directory = tmp_path_factory.mktemp("journal")
    changes, snapshot, offsets = build_journal(directory, writes=4)
    path = directory / FILENAME
    original = path.read_bytes()
    corrupted = bytearray(original)
    first_change = offsets[0]
    positions = data.draw(
        st.lists(st.integers(first_change, len(original) - 1), min_size=1, max_size=4, unique=True)
    )
    for position in positions:
        corrupted[position] ^= data.draw(st.integers(1, 255))
    path.write_bytes(bytes(corrupted))
    recovered = recover(path)
    assert recovered.snapshot == snapshot
    first_bad = min(next(i for i, o in enumerate(offsets) if o > p) - 1 for p in positions)
    # Everything before the first damaged frame survives; nothing damaged is returned.
    assert recovered.changes == changes[:first_bad]
    assert path.stat().st_size == offsets[first_bad]
    StateDocument.load(recovered.data)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(garbage=st.binary(min_size=1, max_size=64))
def test_garbage_after_the_last_frame_is_cut(
    tmp_path_factory: pytest.TempPathFactory, garbage: bytes
) -> None:
    directory = tmp_path_factory.mktemp("journal")
    changes, _, offsets = build_journal(directory, writes=2)
    path = directory / FILENAME
    path.write_bytes(path.read_bytes() + garbage)
    recovered = recover(path)
    assert recovered.changes == changes
    assert path.stat().st_size == offsets[-1]


def test_an_oversized_length_is_corrupt(tmp_path: Path) -> None:
    changes, _, offsets = build_journal(tmp_path, writes=2)
    path = tmp_path / FILENAME
    data = bytearray(path.read_bytes())
    struct.pack_into(">I", data, offsets[1] + 4, MAX_FRAME_BYTES + 1)
    path.write_bytes(bytes(data))
    recovered = recover(path)
    assert recovered.changes == changes[:1]
    assert recovered.discard_reason is not None
    assert "over the limit" in recovered.discard_reason


def test_a_second_snapshot_frame_ends_recovery(tmp_path: Path) -> None:
    changes, _, _ = build_journal(tmp_path, writes=1)
    path = tmp_path / FILENAME
    path.write_bytes(path.read_bytes() + encode_frame(b"SNAP", b"x"))
    assert recover(path).changes == changes


def test_a_damaged_snapshot_refuses_to_open(tmp_path: Path) -> None:
    build_journal(tmp_path, writes=1)
    path = tmp_path / FILENAME
    data = bytearray(path.read_bytes())
    data[len(HEADER) + 20] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(JournalError, match="snapshot frame is unreadable"):
        Journal.open(tmp_path)
    # Left as it was, for someone to look at.
    assert path.read_bytes() == bytes(data)


@pytest.mark.parametrize("content", [b"", b"PLNS", b"NOTAJOURNAL-AT-ALL", HEADER[:-1] + b"\x09"])
def test_not_a_journal_refuses_to_open(tmp_path: Path, content: bytes) -> None:
    (tmp_path / FILENAME).write_bytes(content)
    with pytest.raises(JournalError):
        Journal.open(tmp_path)


def test_compact_replaces_the_file(tmp_path: Path) -> None:
    build_journal(tmp_path, writes=3)
    with Journal.open(tmp_path) as journal:
        doc = StateDocument.load(journal.recovered.data)
        journal.compact(doc.save())
        assert journal.appended_bytes == 0
        journal.append(b"more")
        assert journal.appended_bytes > 0
    recovered = recover(tmp_path / FILENAME)
    assert recovered.changes == [b"more"]
    assert StateDocument.load(recovered.snapshot or b"").names("Workload") == [
        "base",
        "w-0",
        "w-1",
        "w-2",
    ]
    assert not (tmp_path / (FILENAME + ".tmp")).exists()


def test_a_stale_compaction_file_is_removed(tmp_path: Path) -> None:
    changes, _, _ = build_journal(tmp_path, writes=1)
    (tmp_path / (FILENAME + ".tmp")).write_bytes(b"half a compaction")
    with Journal.open(tmp_path) as journal:
        assert journal.recovered.changes == changes
    assert not (tmp_path / (FILENAME + ".tmp")).exists()


def test_one_process_at_a_time(tmp_path: Path) -> None:
    first = Journal.open(tmp_path)
    with pytest.raises(JournalError, match="in use by another process"):
        Journal.open(tmp_path)
    first.close()
    first.close()  # idempotent
    Journal.open(tmp_path).close()


def test_frames_over_the_limit_are_refused() -> None:
    with pytest.raises(JournalError):
        encode_frame(CHANGES_MAGIC, bytes(MAX_FRAME_BYTES + 1))
