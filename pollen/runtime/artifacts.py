"""The content-addressed artifact store of one node: module bytes kept under their digest.

Layout, in the node's ``DATA_DIR/artifacts/``::

    sha256/<64 hex digits>        the bytes whose SHA-256 is that name
    sha256/.incoming-<random>     a write in progress (deleted when the store is opened)

**Atomicity.** Bytes are written to a temporary file in the same directory, hashed while they
are written, flushed and fsynced, checked against the expected digest (and size), and only then
renamed to their digest, after which the directory is fsynced. A rename within one directory is
atomic, so a crash at any moment leaves either no file under the digest or the whole of it;
what a crash leaves behind is a temporary file, which the next :class:`ArtifactStore` deletes.

**Verification on use, not on open.** A file may still rot or be altered on disk after it was
written. Hashing everything at start would cost a node start time in proportion to what it
holds; hashing when the bytes are used costs about a millisecond per MiB, which is nothing next
to sending or compiling them. So every read hashes what it reads: :meth:`ArtifactStore.read`
returns bytes only once they matched, and :class:`ArtifactReader` (what the mesh and the API
serve from) holds back the last chunk until the whole file matched, so a peer never receives
the whole of a corrupt file. :meth:`ArtifactStore.verify` hashes a file once per version of it
on disk (inode, size, modification time) for callers that only need a path. A file found
corrupt is deleted, so this node stops announcing it and can fetch it again.

Digests are hostile input (they come from manifests, API paths and peers): anything other than
``sha256:`` followed by 64 lowercase hex digits is refused with :class:`InvalidDigest` before
it comes near a path.

The store is synchronous and thread-safe; async callers run its reads, writes and hashing in a
worker thread (``asyncio.to_thread``), where :mod:`hashlib` releases the GIL.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Final

from pollen.resources.models import DIGEST_RE

__all__ = [
    "CHUNK_BYTES",
    "DIGEST_PREFIX",
    "MAX_ARTIFACT_BYTES",
    "ArtifactError",
    "ArtifactNotFound",
    "ArtifactReader",
    "ArtifactStore",
    "ArtifactTooLarge",
    "ArtifactWriter",
    "CorruptArtifact",
    "DigestMismatch",
    "InvalidDigest",
    "digest_hex",
    "sha256_digest",
]

log = logging.getLogger(__name__)

DIGEST_PREFIX: Final = "sha256:"
#: Largest artifact a node stores, receives from a peer, or accepts in an upload.
MAX_ARTIFACT_BYTES: Final = 256 << 20
#: Bytes read or written at once; also the largest frame of a fetch (:mod:`pollen.mesh.fetch`).
CHUNK_BYTES: Final = 1 << 20
ALGORITHM_DIR: Final = "sha256"
_TEMP_PREFIX: Final = ".incoming-"


class ArtifactError(Exception):
    """A problem with the artifact store or with an artifact's bytes; ``str()`` is one sentence."""


class InvalidDigest(ArtifactError, ValueError):
    """A string that is not ``sha256:`` followed by 64 lowercase hex digits."""


class ArtifactNotFound(ArtifactError):
    """This node does not hold the artifact."""


class ArtifactTooLarge(ArtifactError):
    """More bytes than the store accepts, or than were announced."""


class DigestMismatch(ArtifactError):
    """Bytes that do not hash to the digest they were given as (or not of the size announced)."""


class CorruptArtifact(ArtifactError):
    """A stored file whose bytes no longer match its digest; it has been deleted."""


def digest_hex(digest: object) -> str:
    """The hex part of a valid digest; raises :class:`InvalidDigest` for anything else."""
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        shown = repr(digest)[:80] if isinstance(digest, str) else type(digest).__name__
        raise InvalidDigest(
            f"{shown} is not an artifact digest: expected sha256: followed by 64 lowercase "
            "hex digits"
        )
    return digest[len(DIGEST_PREFIX) :]


def sha256_digest(data: bytes | bytearray | memoryview) -> str:
    """The content address of ``data``: ``sha256:<hex>``."""
    return DIGEST_PREFIX + hashlib.sha256(data).hexdigest()


def _fsync_directory(directory: Path) -> None:
    # Makes a rename in ``directory`` durable (the file's own fsync does not cover its name).
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactWriter:
    """One artifact being written; get it from :meth:`ArtifactStore.writer`.

    :meth:`write` the bytes in pieces, then :meth:`commit`. Leaving the ``with`` block without
    committing (an exception, a cancelled fetch) deletes what was written.
    """

    def __init__(
        self,
        store: ArtifactStore,
        expected: str | None,
        expected_size: int | None,
    ) -> None:
        self._store = store
        self.expected = expected
        self.expected_size = expected_size
        self._hash = hashlib.sha256()
        self.written = 0
        self._temp = store.directory / f"{_TEMP_PREFIX}{secrets.token_hex(8)}"
        self._file: IO[bytes] | None = open(self._temp, "xb")  # noqa: SIM115 (closed in commit/abort)
        self.digest: str | None = None

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.digest is None:
            self.abort()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``; raises :class:`ArtifactTooLarge` past the size limit or the size
        announced (and then the write is aborted)."""
        if self._file is None:
            raise ArtifactError("this artifact write is already finished")
        limit = self._store.max_size if self.expected_size is None else self.expected_size
        if self.written + len(data) > limit:
            self.abort()
            what = "the announced size" if self.expected_size is not None else "the limit"
            raise ArtifactTooLarge(f"more than {limit} bytes, {what} of this artifact")
        self._file.write(data)
        self._hash.update(data)
        self.written += len(data)

    def commit(self) -> str:
        """Check the bytes, make them durable and visible under their digest; returns it.

        Raises :class:`DigestMismatch` (and deletes what was written) when the bytes hash to
        something other than the expected digest or are not of the expected size.
        """
        if self._file is None:
            raise ArtifactError("this artifact write is already finished")
        actual = DIGEST_PREFIX + self._hash.hexdigest()
        if self.expected_size is not None and self.written != self.expected_size:
            self.abort()
            raise DigestMismatch(
                f"got {self.written} bytes where {self.expected_size} were announced"
            )
        if self.expected is not None and actual != self.expected:
            self.abort()
            raise DigestMismatch(f"the bytes hash to {actual}, not {self.expected}")
        file, self._file = self._file, None
        try:
            file.flush()
            os.fsync(file.fileno())
        finally:
            file.close()
        target = self._store.directory / actual[len(DIGEST_PREFIX) :]
        try:
            os.replace(self._temp, target)
        except BaseException:
            self._temp.unlink(missing_ok=True)
            raise
        _fsync_directory(self._store.directory)
        self.digest = actual
        self._store._added(actual)
        with contextlib.suppress(OSError):
            # Just hashed while written: no need to hash it again before its first use.
            stat = target.stat()
            self._store._verified_now(actual, (stat.st_ino, stat.st_size, stat.st_mtime_ns))
        return actual

    def abort(self) -> None:
        """Drop what was written; nothing appears under any digest."""
        if self._file is not None:
            file, self._file = self._file, None
            file.close()
        with contextlib.suppress(OSError):
            self._temp.unlink(missing_ok=True)


class ArtifactReader:
    """Verified reading of one stored artifact; get it from :meth:`ArtifactStore.open`.

    ``size`` is known up front (for a header). :meth:`next_chunk` returns the bytes in chunks
    of at most ``chunk_size`` and keeps the last one back until the whole file has hashed to
    its digest: a corrupt file raises :class:`CorruptArtifact` (and is deleted) before its
    end is handed out, so no reader ever gets all of it.
    """

    def __init__(self, store: ArtifactStore, digest: str, chunk_size: int) -> None:
        self._store = store
        self.digest = digest
        self._chunk_size = chunk_size
        path = store.path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise ArtifactNotFound(f"this node does not hold {digest}") from None
        self._file: IO[bytes] = os.fdopen(fd, "rb")
        stat = os.fstat(fd)
        self.size = stat.st_size
        self._signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        self._hash = hashlib.sha256()
        self._ahead: bytes | None = None
        self._done = False

    def __enter__(self) -> ArtifactReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the file."""
        self._file.close()

    def __iter__(self) -> Iterator[bytes]:
        while (chunk := self.next_chunk()) is not None:
            yield chunk

    def _read(self) -> bytes:
        data = self._file.read(self._chunk_size)
        self._hash.update(data)
        return data

    def next_chunk(self) -> bytes | None:
        """The next chunk, or None after the last; raises :class:`CorruptArtifact`."""
        if self._done:
            return None
        current = self._read() if self._ahead is None else self._ahead
        following = self._read()
        if following:
            self._ahead = following
            return current
        # ``current`` is the last chunk: hand it out only if everything matched.
        self._done = True
        self._ahead = None
        self.close()
        if DIGEST_PREFIX + self._hash.hexdigest() != self.digest:
            self._store._corrupt(self.digest, self._signature[0])
            raise CorruptArtifact(f"the stored copy of {self.digest} is corrupt; it was deleted")
        self._store._verified_now(self.digest, self._signature)
        return current or None


class ArtifactStore:
    """The artifacts one node holds, under ``root`` (``DATA_DIR/artifacts``).

    Opening it deletes writes a crash left unfinished. ``on_change`` is called (from whichever
    thread wrote or deleted) when the set of held digests changes, so that the node can
    announce it; ``max_size`` bounds every artifact.
    """

    def __init__(
        self,
        root: Path,
        *,
        max_size: int = MAX_ARTIFACT_BYTES,
        on_change: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = root
        self.directory = root / ALGORITHM_DIR
        self.max_size = max_size
        self.on_change = on_change
        self._clock = clock
        self._lock = threading.Lock()
        # digest -> when it was last stored or used; what "most recently used" is ranked by.
        self._used: dict[str, float] = {}
        # digest -> (inode, size, mtime_ns) of the file last hashed and found whole.
        self._verified: dict[str, tuple[int, int, int]] = {}
        self.directory.mkdir(parents=True, exist_ok=True)
        for entry in os.scandir(self.directory):
            if entry.name.startswith(_TEMP_PREFIX):
                log.info("artifact store: deleting %s, a write a crash left unfinished", entry.name)
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                continue
            digest = DIGEST_PREFIX + entry.name
            if DIGEST_RE.fullmatch(digest) and entry.is_file(follow_symlinks=False):
                self._used[digest] = entry.stat(follow_symlinks=False).st_mtime

    # --- where and what -------------------------------------------------------------------------

    def path(self, digest: str) -> Path:
        """Where ``digest``'s bytes are (whether or not they are there).

        Reading the file directly skips verification: use :meth:`verify` first, or hash what
        you read (the module cache does).
        """
        return self.directory / digest_hex(digest)

    def has(self, digest: str) -> bool:
        """Whether this node holds ``digest`` (without hashing it; see :meth:`verify`)."""
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        """The size in bytes of a held artifact; :class:`ArtifactNotFound` if it is not held."""
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            raise ArtifactNotFound(f"this node does not hold {digest}") from None

    def digests(self) -> list[str]:
        """Every digest held, sorted, read from the directory."""
        found = []
        for entry in os.scandir(self.directory):
            digest = DIGEST_PREFIX + entry.name
            if DIGEST_RE.fullmatch(digest) and entry.is_file(follow_symlinks=False):
                found.append(digest)
        return sorted(found)

    def recent(self, limit: int | None = None) -> list[str]:
        """Digests held, most recently stored or used first (at most ``limit`` of them).

        Use is tracked in memory and seeded from the files' modification times at open.
        """
        with self._lock:
            ranked = sorted(self._used.items(), key=lambda item: (-item[1], item[0]))
        digests = [digest for digest, _ in ranked]
        return digests if limit is None else digests[:limit]

    def touch(self, digest: str) -> None:
        """Record a use of ``digest`` (it ranks first in :meth:`recent`)."""
        digest_hex(digest)
        with self._lock:
            if digest in self._used:
                self._used[digest] = self._clock()

    # --- reading ----------------------------------------------------------------------------------

    def open(self, digest: str, chunk_size: int = CHUNK_BYTES) -> ArtifactReader:
        """A verifying reader of ``digest``; :class:`ArtifactNotFound` if it is not held."""
        reader = ArtifactReader(self, digest, chunk_size)
        self.touch(digest)
        return reader

    def read(self, digest: str) -> bytes:
        """All of ``digest``'s bytes, verified; :class:`CorruptArtifact` if they do not match."""
        with self.open(digest) as reader:
            return b"".join(reader)

    def verify(self, digest: str) -> bool:
        """Whether the file under ``digest`` is held and whole, hashing it if it changed since
        it was last found whole. A corrupt file is deleted (and False returned)."""
        path = self.path(digest)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return False
        signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if self._verified.get(digest) == signature:
                return True
        try:
            with self.open(digest) as reader:
                for _ in reader:
                    pass
        except (ArtifactNotFound, CorruptArtifact):
            return False
        return True

    # --- writing ----------------------------------------------------------------------------------

    def writer(self, expected: str | None = None, *, size: int | None = None) -> ArtifactWriter:
        """A streaming write; ``expected`` is the digest the bytes must hash to, ``size``
        their exact length (both checked at :meth:`ArtifactWriter.commit`)."""
        if expected is not None:
            digest_hex(expected)
        if size is not None and not 0 <= size <= self.max_size:
            raise ArtifactTooLarge(
                f"an artifact of {size} bytes is over the limit of {self.max_size}"
            )
        return ArtifactWriter(self, expected, size)

    def put(self, data: bytes | bytearray | memoryview, expected: str | None = None) -> str:
        """Store ``data``; returns its digest. With ``expected``, the bytes must match it."""
        with self.writer(expected) as w:
            w.write(data)
            return w.commit()

    def put_file(self, source: Path, expected: str | None = None) -> str:
        """Store a copy of the file ``source``; returns its digest."""
        with open(source, "rb") as file, self.writer(expected) as w:
            while chunk := file.read(CHUNK_BYTES):
                w.write(chunk)
            return w.commit()

    def remove(self, digest: str) -> bool:
        """Delete ``digest``; returns whether it was held."""
        try:
            os.unlink(self.path(digest))
        except FileNotFoundError:
            return False
        self._forget(digest)
        return True

    # --- bookkeeping ------------------------------------------------------------------------------

    def _added(self, digest: str) -> None:
        with self._lock:
            new = digest not in self._used
            self._used[digest] = self._clock()
            self._verified.pop(digest, None)
        if new:
            self._changed()

    def _forget(self, digest: str) -> None:
        with self._lock:
            held = self._used.pop(digest, None) is not None
            self._verified.pop(digest, None)
        if held:
            self._changed()

    def _verified_now(self, digest: str, signature: tuple[int, int, int]) -> None:
        with self._lock:
            self._verified[digest] = signature

    def _corrupt(self, digest: str, inode: int) -> None:
        log.warning("artifact store: deleting %s: its bytes no longer match its digest", digest)
        path = self.path(digest)
        with contextlib.suppress(OSError):
            # Only the file found corrupt: a whole copy renamed over it since must stay.
            if path.stat().st_ino != inode:
                return
            path.unlink()
        self._forget(digest)

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:
                log.exception("artifact store: the change callback failed")
