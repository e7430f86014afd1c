"""Durable persistence of the state document: a snapshot followed by appended changes.

One file, ``state.journal``, in the node's ``DATA_DIR/state/``::

    header   8 bytes "PLNSTATE", u32 format version
    frame    4 bytes magic, u32 payload length, u32 CRC-32 of (length, payload), payload
    frame    ...

All integers are big-endian. The first frame (magic ``SNAP``) holds a full ``save()`` of the
document; every later frame (magic ``CHNG``) holds the changes of one write. :meth:`Journal.append`
fsyncs before it returns, so an acknowledged write survives ``kill -9`` and power loss.

A crash in the middle of an append leaves a torn frame at the end. Recovery keeps every frame up to
the first one that is short or fails its magic, length or checksum, and cuts the file there: a
torn last write never stops a node from starting. The CRC covers the length too, so a corrupted
length cannot make garbage look like a frame.

The snapshot frame is only ever written by :meth:`Journal.compact` (temporary file, fsync, atomic
rename, fsync of the directory), so it is never torn. If it is unreadable anyway, the disk is
damaged: opening fails rather than starting empty and later overwriting what is left.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

__all__ = [
    "FILENAME",
    "MAX_FRAME_BYTES",
    "Journal",
    "JournalError",
    "Recovered",
    "encode_frame",
    "recover",
]

log = logging.getLogger(__name__)

FILENAME: Final = "state.journal"
LOCK_FILENAME: Final = "lock"
HEADER_MAGIC: Final = b"PLNSTATE"
VERSION: Final = 1
HEADER: Final = HEADER_MAGIC + struct.pack(">I", VERSION)
SNAPSHOT_MAGIC: Final = b"SNAP"
CHANGES_MAGIC: Final = b"CHNG"
_FRAME_HEAD: Final = struct.Struct(">4sII")
#: A frame claiming more than this is corrupt; it also bounds what one read may allocate.
MAX_FRAME_BYTES: Final = 256 * 1024 * 1024


class JournalError(Exception):
    """The journal cannot be opened, read or written."""


@dataclass(frozen=True)
class Recovered:
    """What :func:`recover` found in a journal file."""

    snapshot: bytes | None
    changes: list[bytes] = field(default_factory=list)
    #: Bytes cut off the end of the file, and why.
    discarded_bytes: int = 0
    discard_reason: str | None = None

    @property
    def data(self) -> bytes:
        """Snapshot and changes concatenated, as ``Document.load`` takes them."""
        if self.snapshot is None:
            return b""
        return self.snapshot + b"".join(self.changes)


def encode_frame(magic: bytes, payload: bytes) -> bytes:
    """One frame: magic, length, CRC-32 of length and payload, payload."""
    if len(magic) != 4:
        raise ValueError("a frame magic is 4 bytes")
    if len(payload) > MAX_FRAME_BYTES:
        raise JournalError(
            f"a journal frame of {len(payload)} bytes exceeds the limit of {MAX_FRAME_BYTES}"
        )
    length = struct.pack(">I", len(payload))
    return magic + length + struct.pack(">I", zlib.crc32(payload, zlib.crc32(length))) + payload


def _decode_frame(data: bytes, pos: int) -> tuple[bytes, bytes, int] | str:
    """The frame at ``pos`` as (magic, payload, end), or why there is no valid frame there."""
    if len(data) - pos < _FRAME_HEAD.size:
        return "a short frame header"
    magic, length, crc = _FRAME_HEAD.unpack_from(data, pos)
    if magic not in (SNAPSHOT_MAGIC, CHANGES_MAGIC):
        return "a bad frame magic"
    if length > MAX_FRAME_BYTES:
        return f"a frame length of {length} bytes, over the limit"
    start = pos + _FRAME_HEAD.size
    end = start + length
    if end > len(data):
        return "a short frame payload"
    payload = data[start:end]
    if zlib.crc32(payload, zlib.crc32(struct.pack(">I", length))) != crc:
        return "a frame checksum mismatch"
    return magic, payload, end


def _parse(data: bytes, path: Path) -> tuple[Recovered, int]:
    """The frames of a whole journal file, and the offset where the valid part ends."""
    if len(data) < len(HEADER) or not data.startswith(HEADER_MAGIC):
        raise JournalError(f"{path} is not a state journal (bad header)")
    (version,) = struct.unpack_from(">I", data, len(HEADER_MAGIC))
    if version != VERSION:
        raise JournalError(
            f"{path} has journal format version {version}; this build reads {VERSION}"
        )
    pos = len(HEADER)
    first = _decode_frame(data, pos)
    if isinstance(first, str) or first[0] != SNAPSHOT_MAGIC:
        why = first if isinstance(first, str) else "a changes frame"
        raise JournalError(f"{path} is damaged: its snapshot frame is unreadable ({why})")
    snapshot, pos = first[1], first[2]
    changes: list[bytes] = []
    reason: str | None = None
    while pos < len(data):
        frame = _decode_frame(data, pos)
        if isinstance(frame, str):
            reason = frame
            break
        if frame[0] != CHANGES_MAGIC:
            reason = "a second snapshot frame"
            break
        changes.append(frame[1])
        pos = frame[2]
    discarded = len(data) - pos
    return Recovered(snapshot, changes, discarded, reason if discarded else None), pos


def recover(path: Path) -> Recovered:
    """Read the journal at ``path``, cutting off a torn or corrupt tail in place.

    A missing file is an empty journal. Raises :class:`JournalError` when the file is not a
    journal or its snapshot is unreadable.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Recovered(snapshot=None)
    recovered, valid_end = _parse(data, path)
    if recovered.discarded_bytes:
        log.warning(
            "state journal %s: discarded %d bytes at offset %d after %d valid change frames "
            "(%s); the last write before a crash was not complete",
            path,
            recovered.discarded_bytes,
            valid_end,
            len(recovered.changes),
            recovered.discard_reason,
        )
        # Cut the tail now: a frame appended after garbage would be unreachable at the next
        # recovery, and so would every write acknowledged after it.
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, valid_end)
            os.fsync(fd)
        finally:
            os.close(fd)
    return recovered


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class Journal:
    """The open journal of one state directory, held exclusively by this process."""

    def __init__(self, directory: Path, lock_fd: int, recovered: Recovered) -> None:
        """Use :meth:`open`."""
        self.directory = directory
        self.path = directory / FILENAME
        self.recovered = recovered
        self._lock_fd: int | None = lock_fd
        self._fd: int | None = None
        self._size = 0
        self._appended = 0
        # Set when a failed append could not be undone: appending after a partial frame would
        # hide every later frame from recovery, so no further write may be acknowledged.
        self._broken: str | None = None
        if recovered.snapshot is not None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            self._size = os.fstat(self._fd).st_size

    @classmethod
    def open(cls, directory: Path) -> Journal:
        """Lock ``directory`` (created if needed) and recover its journal.

        What was recovered is in :attr:`recovered`; call :meth:`compact` before :meth:`append`
        when there was no journal yet. Raises :class:`JournalError` if another process holds
        the directory or the journal is damaged beyond its tail.
        """
        directory.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(directory / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise JournalError(
                    f"state directory {directory} is in use by another process"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                # A compaction that crashed before its rename: the journal itself is intact.
                (directory / (FILENAME + ".tmp")).unlink()
            return cls(directory, lock_fd, recover(directory / FILENAME))
        except BaseException:
            os.close(lock_fd)
            raise

    @property
    def size(self) -> int:
        """The journal file's size in bytes."""
        return self._size

    @property
    def appended_bytes(self) -> int:
        """Bytes appended since the last compaction (or since opening)."""
        return self._appended

    def append(self, payload: bytes) -> None:
        """Append one changes frame and fsync it; once this returns, the write is durable."""
        if self._fd is None:
            raise JournalError("the journal has no snapshot yet (or is closed): compact first")
        if self._broken is not None:
            raise JournalError(
                f"the journal refuses writes after an earlier failure: {self._broken}"
            )
        if not payload:
            return
        frame = encode_frame(CHANGES_MAGIC, payload)
        try:
            _write_all(self._fd, frame)
            os.fdatasync(self._fd)
        except OSError as exc:
            self._undo_partial_append(exc)
            raise JournalError(f"cannot append to {self.path}: {exc}") from exc
        self._size += len(frame)
        self._appended += len(frame)

    def _undo_partial_append(self, cause: OSError) -> None:
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)
        except OSError as exc:
            self._broken = f"{cause}; then could not cut the partial frame: {exc}"
            log.error("state journal %s: %s", self.path, self._broken)

    def compact(self, snapshot: bytes) -> None:
        """Replace the journal with a single snapshot frame, atomically."""
        if self._lock_fd is None:
            raise JournalError("the journal is closed")
        tmp = self.directory / (FILENAME + ".tmp")
        data = HEADER + encode_frame(SNAPSHOT_MAGIC, snapshot)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        # The rename is durable only once the directory entry is.
        _fsync_dir(self.directory)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._size = len(data)
        self._appended = 0
        self._broken = None

    def close(self) -> None:
        """Close the file and release the directory lock. Idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
