"""The content-addressed artifact store of one node: module bytes kept under their digest.

Layout, in the node's ``DATA_DIR/artifacts/``::

    sha256/<64 hex digits>        the bytes whose SHA-256 is that name
    sha256/.incoming-<random>     a write in progress (deleted when the store is opened)
    sha256/.partial-<64 hex>      a fetch in progress, kept so that a cut-off fetch resumes

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

**Partial fetches.** A fetch in chunks writes them at their offsets into ``.partial-<hex>``
(:class:`PartialArtifact`), which keeps its name across failures and restarts so that a fetch
cut off halfway resumes with the chunks it has. The partial file is never visible under the
digest: it is renamed to it only after the whole file hashed to the digest. Chunks are checked
against a *manifest* (the SHA-256 of every :data:`MANIFEST_CHUNK_BYTES` of the file), which a
holder computes in the same pass that verifies its copy (:meth:`ArtifactStore.manifest`).

**Quota.** With ``quota`` set, the bytes held (partial fetches included) stay within it: making
room deletes the least recently used artifacts first, never one that ``pinned()`` names (what
this node's replicas need) nor one being written. An artifact larger than the quota is refused
with :class:`ArtifactTooLarge`; one that does not fit because pinned artifacts fill the quota
with :class:`QuotaExceeded`.

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
import math
import os
import secrets
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

from pollen.resources.models import DIGEST_RE

__all__ = [
    "CHUNK_BYTES",
    "DIGEST_PREFIX",
    "MANIFEST_CHUNK_BYTES",
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
    "Manifest",
    "PartialArtifact",
    "QuotaExceeded",
    "digest_hex",
    "sha256_digest",
]

log = logging.getLogger(__name__)

DIGEST_PREFIX: Final = "sha256:"
#: Largest artifact a node stores, receives from a peer, or accepts in an upload.
MAX_ARTIFACT_BYTES: Final = 256 << 20
#: Bytes read or written at once; also the largest frame of a fetch (:mod:`pollen.mesh.fetch`).
CHUNK_BYTES: Final = 1 << 20
#: Bytes per chunk of a manifest, the unit a fetch asks holders for and checks on arrival.
MANIFEST_CHUNK_BYTES: Final = 4 << 20
ALGORITHM_DIR: Final = "sha256"
_TEMP_PREFIX: Final = ".incoming-"
_PARTIAL_PREFIX: Final = ".partial-"
#: A partial fetch untouched for this long is deleted when the store opens.
PARTIAL_MAX_AGE: Final = 24 * 3600.0


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


class QuotaExceeded(ArtifactError):
    """No room within the store's quota, because the artifacts it may not delete fill it."""


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
        # The manifest is made on the way too: serving the artifact in chunks later must not
        # cost another pass over every byte before the first chunk goes out.
        self._chunk_hash = hashlib.sha256()
        self._chunk_fill = 0
        self._hashes: list[bytes] = []
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
        limit = self._store.limit if self.expected_size is None else self.expected_size
        if self.written + len(data) > limit:
            self.abort()
            if self.expected_size is not None:
                raise ArtifactTooLarge(f"more than {limit} bytes, the announced size")
            raise ArtifactTooLarge(self._store.too_large_message(self.written + len(data)))
        self._file.write(data)
        self._hash.update(data)
        self.written += len(data)
        view = memoryview(data)
        while view:
            take = min(len(view), MANIFEST_CHUNK_BYTES - self._chunk_fill)
            self._chunk_hash.update(view[:take])
            self._chunk_fill += take
            view = view[take:]
            if self._chunk_fill == MANIFEST_CHUNK_BYTES:
                self._hashes.append(self._chunk_hash.digest())
                self._chunk_hash = hashlib.sha256()
                self._chunk_fill = 0

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
        try:
            self._store.make_room(self.written, keep=actual)
        except ArtifactError:
            self.abort()
            raise
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
        if self._chunk_fill:
            self._hashes.append(self._chunk_hash.digest())
        manifest = Manifest(self.written, MANIFEST_CHUNK_BYTES, tuple(self._hashes))
        with contextlib.suppress(OSError):
            # Just hashed while written: no need to hash it again before its first use.
            stat = target.stat()
            signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
            self._store._verified_now(actual, signature, manifest)
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
        #: The file's (inode, size, modification time) when it was opened.
        self.signature = self._signature
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


@dataclass(frozen=True)
class Manifest:
    """What an artifact is made of, chunk by chunk: ``size`` bytes in chunks of ``chunk``
    bytes (the last one shorter), ``hashes[i]`` the SHA-256 of chunk ``i``."""

    size: int
    chunk: int
    hashes: tuple[bytes, ...]

    @property
    def count(self) -> int:
        """How many chunks."""
        return len(self.hashes)

    def span(self, index: int) -> tuple[int, int]:
        """Offset and length of chunk ``index``."""
        offset = index * self.chunk
        return offset, min(self.chunk, self.size - offset)

    @staticmethod
    def chunks_of(size: int, chunk: int) -> int:
        """How many chunks ``size`` bytes take."""
        return -(-size // chunk)


class PartialArtifact:
    """A fetch in progress: chunks written at their offsets into a file of the final size.

    Get it from :meth:`ArtifactStore.partial`. Methods are thread-safe (positional writes).
    :meth:`commit` hashes the whole file and renames it to its digest; :meth:`close` keeps the
    file for a later fetch to resume; :meth:`discard` deletes it.
    """

    def __init__(self, store: ArtifactStore, digest: str, size: int) -> None:
        self._store = store
        self.digest = digest
        self.size = size
        self.path = store.directory / f"{_PARTIAL_PREFIX}{digest_hex(digest)}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            existing = os.fstat(fd).st_size
            #: Whether a file from an earlier attempt was found (its chunks may be reused).
            self.resumed = existing == size and size > 0
            if existing != size:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, size)
                with contextlib.suppress(OSError):
                    # Blocks allocated up front: writing chunks into holes costs the file
                    # system an allocation each, several times the copy itself.
                    os.posix_fallocate(fd, 0, size)
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd
        # Held around every use of the descriptor and its closing: a worker thread still
        # writing after its fetch gave up must fail, not write into whatever file reuses the
        # descriptor's number.
        self._io = threading.RLock()
        self.committed = False

    def _descriptor(self) -> int:
        if self._fd is None:
            raise ArtifactError("this partial artifact is closed")
        return self._fd

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset`` (inside the final size)."""
        if offset < 0 or offset + len(data) > self.size:
            raise ArtifactTooLarge(f"a write past the {self.size} bytes of {self.digest}")
        view = memoryview(data)
        with self._io:
            fd = self._descriptor()
            while view:
                written = os.pwrite(fd, view, offset)
                view = view[written:]
                offset += written

    def read_at(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` as they are in the file now."""
        with self._io:
            return os.pread(self._descriptor(), length, offset)

    def read_into(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the bytes at ``offset`` (short of the end: zeros)."""
        with self._io:
            got = os.preadv(self._descriptor(), [view], offset)
        if got < len(view):
            view[got:] = bytes(len(view) - got)

    def chunk_matches(self, manifest: Manifest, index: int) -> bool:
        """Whether chunk ``index`` is already in the file, whole (resuming a fetch)."""
        offset, length = manifest.span(index)
        return hashlib.sha256(self.read_at(offset, length)).digest() == manifest.hashes[index]

    def commit(self, hashed: str | None = None) -> str:
        """Hash the whole file; if it is ``digest``, make it durable and visible under it.

        ``hashed`` is the SHA-256 (hex) of the file's bytes when the caller hashed them in
        order as they were written, which saves reading them again. (A manifest is not kept:
        the whole hash does not prove a peer's chunk hashes right.) Raises
        :class:`DigestMismatch` otherwise, keeping the file: the caller may check its chunks
        against a manifest, fetch the wrong ones again, or :meth:`discard` it.
        """
        with self._io:
            fd = self._descriptor()
            if hashed is None:
                hasher = hashlib.sha256()
                offset = 0
                while offset < self.size:
                    data = os.pread(fd, min(CHUNK_BYTES * 4, self.size - offset), offset)
                    if not data:
                        break
                    hasher.update(data)
                    offset += len(data)
                hashed = hasher.hexdigest()
            actual = DIGEST_PREFIX + hashed
            if actual != self.digest:
                raise DigestMismatch(f"the chunks put together hash to {actual}, not {self.digest}")
            os.fsync(fd)
            target = self._store.path(self.digest)
            # Renamed while still counted as being fetched: making room must not take it.
            os.replace(self.path, target)
            _fsync_directory(self._store.directory)
            self.committed = True
            self._store._added(self.digest)
            self.close()
        with contextlib.suppress(OSError):
            stat = target.stat()
            signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
            self._store._verified_now(self.digest, signature)
        return self.digest

    def close(self) -> None:
        """Release the file and keep it (a later fetch of the digest resumes from it)."""
        with self._io:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                os.close(fd)
        self._store._partial_done(self.digest)

    def discard(self) -> None:
        """Delete what was written."""
        self.close()
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)


class ArtifactStore:
    """The artifacts one node holds, under ``root`` (``DATA_DIR/artifacts``).

    Opening it deletes writes a crash left unfinished (and partial fetches older than
    :data:`PARTIAL_MAX_AGE`). ``on_change`` is called (from whichever thread wrote or deleted)
    when the set of held digests changes, so that the node can announce it; ``max_size``
    bounds every artifact; ``quota`` (bytes, None for none) bounds them all together, and
    ``pinned()`` names the digests that making room must never delete (called from worker
    threads: it must be cheap and thread-safe).
    """

    def __init__(
        self,
        root: Path,
        *,
        max_size: int = MAX_ARTIFACT_BYTES,
        quota: int | None = None,
        pinned: Callable[[], Collection[str]] = frozenset,
        on_change: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if quota is not None and quota <= 0:
            raise ValueError("the artifact quota must be a positive number of bytes")
        self.root = root
        self.directory = root / ALGORITHM_DIR
        self.max_size = max_size
        self.quota = quota
        self.pinned = pinned
        self.on_change = on_change
        self._clock = clock
        self._lock = threading.Lock()
        # Serialises making room, so that two writers do not both count the same free space.
        self._room_lock = threading.Lock()
        # Digests being fetched into a partial file now: neither evicted nor their partial.
        self._active: set[str] = set()
        # (digest, chunk size) -> (file signature, manifest) of the file last found whole.
        self._manifests: dict[tuple[str, int], tuple[tuple[int, int, int], Manifest]] = {}
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
            if entry.name.startswith(_PARTIAL_PREFIX):
                with contextlib.suppress(OSError):
                    stale = clock() - entry.stat(follow_symlinks=False).st_mtime > PARTIAL_MAX_AGE
                    valid = DIGEST_RE.fullmatch(DIGEST_PREFIX + entry.name[len(_PARTIAL_PREFIX) :])
                    if stale or not valid or not entry.is_file(follow_symlinks=False):
                        log.info("artifact store: deleting %s, an abandoned fetch", entry.name)
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
        if size is not None:
            if size < 0 or size > self.limit:
                raise ArtifactTooLarge(self.too_large_message(size))
            # Room first, so that a large write does not fill the disk before it is refused.
            self.make_room(size, keep=expected)
        return ArtifactWriter(self, expected, size)

    def partial(self, digest: str, size: int) -> PartialArtifact:
        """The partial file of a chunked fetch of ``digest`` (``size`` bytes), resumed if an
        earlier attempt left one of that size. Makes room for it within the quota first;
        raises :class:`ArtifactTooLarge` or :class:`QuotaExceeded`. One fetch per digest at
        a time (the fetcher shares fetches): a second raises :class:`ArtifactError`."""
        digest_hex(digest)
        if size < 0 or size > self.limit:
            raise ArtifactTooLarge(self.too_large_message(size, digest))
        with self._lock:
            if digest in self._active:
                raise ArtifactError(f"{digest} is being fetched already")
            self._active.add(digest)
        try:
            self.make_room(size, keep=digest)
            return PartialArtifact(self, digest, size)
        except BaseException:
            self._partial_done(digest)
            raise

    def _partial_done(self, digest: str) -> None:
        with self._lock:
            self._active.discard(digest)

    # --- quota ------------------------------------------------------------------------------------

    @property
    def limit(self) -> int:
        """The largest artifact this store takes: ``max_size``, or the quota if smaller."""
        return self.max_size if self.quota is None else min(self.max_size, self.quota)

    def too_large_message(self, size: int, digest: str | None = None) -> str:
        """One sentence saying why an artifact of ``size`` bytes is refused."""
        what = f"{digest} is {size} bytes" if digest else f"an artifact of {size} bytes is"
        if self.quota is not None and self.quota < self.max_size and size > self.quota:
            return (
                f"{what}, over this node's artifact quota of {self.quota} bytes "
                "(pollen node --artifact-quota)"
            )
        return f"{what}, over the limit of {self.max_size} bytes per artifact"

    def usage(self) -> int:
        """Bytes held: whole artifacts and partial fetches (what the quota counts)."""
        total = 0
        for entry in os.scandir(self.directory):
            if entry.name.startswith(_TEMP_PREFIX):
                continue
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
        return total

    def make_room(self, needed: int, *, keep: str | None = None) -> list[str]:
        """Delete what it takes for ``needed`` more bytes to fit in the quota; returns the
        digests deleted.

        Abandoned partial fetches go first, then artifacts from the least recently used,
        never one ``pinned()`` names, one being fetched, or ``keep`` (whose own file or
        partial file is not counted either: it is what the room is for). Raises
        :class:`ArtifactTooLarge` if ``needed`` alone is over the quota and
        :class:`QuotaExceeded` if what may not be deleted leaves too little room.
        """
        if self.quota is None:
            return []
        if needed > self.quota:
            raise ArtifactTooLarge(self.too_large_message(needed, keep))
        with self._room_lock:
            sizes: dict[str, int] = {}
            partials: list[tuple[float, str, int]] = []
            own = {digest_hex(keep)} if keep else set()
            for entry in os.scandir(self.directory):
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    stat = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if entry.name.startswith(_PARTIAL_PREFIX):
                    hex_part = entry.name[len(_PARTIAL_PREFIX) :]
                    if hex_part in own:
                        continue
                    partials.append((stat.st_mtime, hex_part, stat.st_size))
                elif not entry.name.startswith(_TEMP_PREFIX) and entry.name not in own:
                    sizes[DIGEST_PREFIX + entry.name] = stat.st_size
            used = sum(sizes.values()) + sum(size for _, _, size in partials)
            if used + needed <= self.quota:
                return []
            pinned = set(self.pinned())
            with self._lock:
                active = set(self._active)
                recency = dict(self._used)
            for _, hex_part, size in sorted(partials):
                if DIGEST_PREFIX + hex_part in active:
                    continue
                with contextlib.suppress(OSError):
                    os.unlink(self.directory / f"{_PARTIAL_PREFIX}{hex_part}")
                    used -= size
                if used + needed <= self.quota:
                    return []
            evicted: list[str] = []
            candidates = sorted(
                (digest for digest in sizes if digest not in pinned and digest not in active),
                # A file not known yet was renamed into place a moment ago: newest, not oldest.
                key=lambda digest: (recency.get(digest, math.inf), digest),
            )
            for digest in candidates:
                if used + needed <= self.quota:
                    break
                log.info(
                    "artifact store: deleting %s (%d bytes, least recently used) to stay "
                    "within the quota of %d bytes",
                    digest,
                    sizes[digest],
                    self.quota,
                )
                if self.remove(digest):
                    used -= sizes[digest]
                    evicted.append(digest)
            if used + needed > self.quota:
                kept = sum(size for digest, size in sizes.items() if digest not in evicted)
                raise QuotaExceeded(
                    f"{needed} bytes do not fit in this node's artifact quota of {self.quota} "
                    f"bytes: {kept} bytes are held by artifacts this node's replicas use or "
                    "that are being fetched"
                )
            return evicted

    # --- manifests --------------------------------------------------------------------------------

    def manifest(self, digest: str, chunk: int = MANIFEST_CHUNK_BYTES) -> Manifest:
        """The chunk hashes of a held artifact, computed in one pass that also verifies the
        whole file (and cached until the file changes). Raises :class:`ArtifactNotFound`, or
        :class:`CorruptArtifact` (and deletes the file) if it no longer matches its digest."""
        path = self.path(digest)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise ArtifactNotFound(f"this node does not hold {digest}") from None
        signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._manifests.get((digest, chunk))
        if cached is not None and cached[0] == signature:
            return cached[1]
        hashes = []
        with self.open(digest, chunk) as reader:
            size = reader.size
            signature = reader.signature
            for data in reader:
                hashes.append(hashlib.sha256(data).digest())
        found = Manifest(size, chunk, tuple(hashes))
        with self._lock:
            self._manifests[(digest, chunk)] = (signature, found)
        return found

    def read_chunk(
        self, digest: str, manifest: Manifest, index: int, into: bytearray | None = None
    ) -> bytes | memoryview:
        """Chunk ``index`` of a held artifact, checked against its manifest: hashed unless
        the file is the very version (inode, size, modification time) that was hashed whole
        when the manifest was made, as :meth:`verify` does. With ``into`` (a buffer of at
        least a chunk, reused by the caller), the bytes are read into it and a view of them
        returned. Raises :class:`ArtifactNotFound`, or :class:`CorruptArtifact` (and deletes
        the file)."""
        offset, length = manifest.span(index)
        path = self.path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise ArtifactNotFound(f"this node does not hold {digest}") from None
        try:
            stat = os.fstat(fd)
            inode = stat.st_ino
            data: bytes | memoryview
            if into is None:
                data = os.pread(fd, length, offset)
            else:
                data = memoryview(into)[:length]
                data = data[: os.preadv(fd, [data], offset)]
        finally:
            os.close(fd)
        with self._lock:
            cached = self._manifests.get((digest, manifest.chunk))
        whole = cached is not None and cached[0] == (inode, stat.st_size, stat.st_mtime_ns)
        if len(data) == length and whole:
            return data
        if len(data) != length or hashlib.sha256(data).digest() != manifest.hashes[index]:
            self._corrupt(digest, inode)
            raise CorruptArtifact(f"the stored copy of {digest} is corrupt; it was deleted")
        return data

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
            for key in [key for key in self._manifests if key[0] == digest]:
                del self._manifests[key]
        if held:
            self._changed()

    def _verified_now(
        self, digest: str, signature: tuple[int, int, int], manifest: Manifest | None = None
    ) -> None:
        with self._lock:
            self._verified[digest] = signature
            if manifest is not None and manifest.size == signature[1]:
                self._manifests[(digest, manifest.chunk)] = (signature, manifest)

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
