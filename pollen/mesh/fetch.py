"""Artifact fetch: getting an artifact's bytes from the nodes that hold them.

Who holds what travels in membership gossip: every node lists the digests it holds (the most
recently used :data:`~pollen.mesh.wire.MAX_ARTIFACTS` of them) in its ``MemberMeta``.
A node that needs an artifact asks the holders, nearest first by Vivaldi estimate, on mesh
streams of kind :data:`ARTIFACT_STREAM` (direct, or through a relay when there is no direct
route; :meth:`~pollen.mesh.service.MeshService.open_stream` decides). ADR 0012 and ADR 0017.

Protocol, one request per stream, every frame length-prefixed by the transport::

    fetcher -> holder   {"digest": D, "manifest": true}                     (then end of stream)
    holder -> fetcher   {"size": N, "chunk": C, "port": P}  or  {"error": "one sentence"}
    holder -> fetcher   one frame: the SHA-256 of every chunk of C bytes, 32 bytes each

    fetcher -> holder   {"digest": D, "chunk": I}
    holder -> fetcher   {"size": N, "length": L}  or  {"error": ...}, then L bytes in frames

    fetcher -> holder   {"digest": D}                               (the whole artifact, ADR 0012)
    holder -> fetcher   {"size": N}  or  {"error": ...}, then N bytes in frames

``port`` (optional) is the holder's bulk port (:mod:`pollen.mesh.bulk`): mutually
authenticated TLS over TCP, where the same chunk requests are framed the same way and the
answer's ``L`` bytes follow raw. A fetcher with a direct route to the holder takes its chunks
there; through a relay, or when the port cannot be reached, over mesh streams.

Headers are JSON objects of at most :data:`MAX_HEADER_BYTES`, decoded strictly (unknown
fields, wrong types and out-of-range numbers are refused): every byte comes from a peer. A
holder resets a stream whose request is malformed or late, answers an error when it does not
hold the artifact or is busy, and checks every chunk it serves against its manifest (computed
in the pass that verified its copy), so a copy that rotted is dropped, not served.

**Fetching** (:class:`ArtifactFetcher`): the manifest comes from the nearest holder that
answers; chunks are then fetched from up to :data:`MAX_SOURCES` holders at once (those whose
manifest is the same), each taking the next chunk not yet fetched, so a fast holder takes
more; when none is left, an idle holder fetches again a chunk still in flight elsewhere, and
the first copy wins. Chunks are written at their offsets into the store's partial file, which
outlives a failed fetch: the next attempt keeps the chunks that still match the manifest. The
SHA-256 of the whole file, computed in order as chunks arrive, decides before the file appears
under the digest. If it is wrong, the chunks are checked against the manifest: wrong ones are
discarded and fetched again from the others, and whoever sent them is penalised (skipped for
:data:`PENALTY_SECONDS`); if every chunk matches, the manifest lied, and every holder that
agreed with it is penalised.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson

from pollen.mesh import bulk
from pollen.mesh.frames import decode_object
from pollen.mesh.membership import MemberState
from pollen.mesh.service import MeshService
from pollen.mesh.transport import FramedStream, TransportError
from pollen.runtime.artifacts import (
    CHUNK_BYTES,
    MANIFEST_CHUNK_BYTES,
    MAX_ARTIFACT_BYTES,
    ArtifactError,
    ArtifactNotFound,
    ArtifactStore,
    CorruptArtifact,
    DigestMismatch,
    InvalidDigest,
    Manifest,
    PartialArtifact,
    digest_hex,
)

__all__ = [
    "ARTIFACT_STREAM",
    "ArtifactFetcher",
    "ArtifactServer",
    "ArtifactUnavailable",
    "FetchAnswer",
    "FetchAttempt",
    "FetchProtocolError",
    "FetchRecord",
    "FetchRequest",
]

log = logging.getLogger(__name__)

#: Stream kind of an artifact fetch.
ARTIFACT_STREAM: Final = "artifact"
#: Largest request or answer header.
MAX_HEADER_BYTES: Final = 1024
#: Largest data frame on a mesh stream; a holder sends bytes in frames of at most this.
MAX_CHUNK_BYTES: Final = CHUNK_BYTES
#: Chunk sizes a manifest may use: powers of two in this range.
MIN_MANIFEST_CHUNK: Final = 64 * 1024
MAX_MANIFEST_CHUNK: Final = 16 << 20
#: Seconds a holder has to send its answer, and a fetcher its request.
HEADER_TIMEOUT: Final = 10.0
#: Seconds a transfer may go without data before the fetcher gives up on the holder.
IDLE_TIMEOUT: Final = 30.0
#: Seconds a holder that sent wrong bytes (or broke the protocol) is skipped.
PENALTY_SECONDS: Final = 60.0
#: Transfers one node serves at once on mesh streams; further requests are answered "busy".
MAX_CONCURRENT_SERVES: Final = 32
#: Holders one fetch takes chunks from at once.
MAX_SOURCES: Final = 3
#: Chunks in flight from one holder at once (one bulk connection or mesh stream each).
STREAMS_PER_SOURCE: Final = 2
#: Seconds a chunk is in flight before an idle holder fetches it too (a slow holder must not
#: hold up the end of a transfer).
ENDGAME_SECONDS: Final = 2.0
#: Seconds between looks at membership while :meth:`ArtifactFetcher.ensure` waits for a holder.
_HOLDER_POLL_SECONDS: Final = 0.1
_HASH_BYTES: Final = 32


class FetchProtocolError(Exception):
    """A malformed fetch request or answer; one sentence."""


def _decode_object(frame: bytes, what: str, keys: set[str]) -> dict[str, Any]:
    value = decode_object(frame, what, MAX_HEADER_BYTES, FetchProtocolError)
    extra = set(value) - keys
    if extra:
        shown = ", ".join(sorted(repr(key)[:40] for key in extra)[:5])
        raise FetchProtocolError(f"the {what} has unknown fields: {shown}")
    return value


def _integer(value: dict[str, Any], key: str, what: str, high: int) -> int | None:
    number = value.get(key)
    if number is None:
        return None
    if type(number) is not int or not 0 <= number <= high:
        raise FetchProtocolError(f"the {what}'s {key} must be an integer from 0 to {high}")
    return number


@dataclass(frozen=True)
class FetchRequest:
    """Fetcher to holder: the bytes of ``digest``; or its manifest; or one of its chunks."""

    digest: str
    manifest: bool = False
    chunk: int | None = None

    def encode(self) -> bytes:
        value: dict[str, Any] = {"digest": self.digest}
        if self.manifest:
            value["manifest"] = True
        if self.chunk is not None:
            value["chunk"] = self.chunk
        return orjson.dumps(value)

    @classmethod
    def decode(cls, frame: bytes) -> FetchRequest:
        """Parse a request; raises :class:`FetchProtocolError`, and only that."""
        value = _decode_object(frame, "fetch request", {"digest", "manifest", "chunk"})
        digest = value.get("digest")
        try:
            digest_hex(digest)
        except InvalidDigest:
            raise FetchProtocolError("the fetch request has no valid digest") from None
        assert isinstance(digest, str)
        manifest = value.get("manifest", False)
        if manifest is not True and manifest is not False:
            raise FetchProtocolError("the fetch request's manifest must be true or false")
        chunk = _integer(value, "chunk", "fetch request", MAX_ARTIFACT_BYTES // MIN_MANIFEST_CHUNK)
        if manifest and chunk is not None:
            raise FetchProtocolError("the fetch request asks for a manifest and a chunk")
        return cls(digest, manifest, chunk)


@dataclass(frozen=True)
class FetchAnswer:
    """Holder to fetcher: the artifact's ``size`` (with, for a manifest, its ``chunk`` size
    and the holder's bulk ``port``; for a chunk, its ``length``), or a refusal, ``error``."""

    size: int | None = None
    error: str | None = None
    chunk: int | None = None
    port: int | None = None
    length: int | None = None

    def __post_init__(self) -> None:
        if (self.size is None) == (self.error is None):
            raise ValueError("a fetch answer has either a size or an error")

    @property
    def ok(self) -> bool:
        return self.error is None

    def encode(self) -> bytes:
        if self.error is not None:
            # 160 characters fit the header limit even if every one is escaped as \uXXXX.
            return orjson.dumps({"error": self.error[:160]})
        value: dict[str, int] = {"size": self.size or 0}
        for key in ("chunk", "port", "length"):
            number = getattr(self, key)
            if number is not None:
                value[key] = number
        return orjson.dumps(value)

    @classmethod
    def decode(cls, frame: bytes) -> FetchAnswer:
        """Parse an answer; raises :class:`FetchProtocolError`, and only that."""
        value = _decode_object(frame, "fetch answer", {"size", "error", "chunk", "port", "length"})
        if ("error" in value) == ("size" in value):
            raise FetchProtocolError("the fetch answer must have exactly one of size or error")
        if "error" in value:
            if len(value) != 1:
                raise FetchProtocolError("the fetch answer's error comes alone")
            error = value["error"]
            if not isinstance(error, str):
                raise FetchProtocolError("the fetch answer's error is not a string")
            # A peer's words end up in logs and API answers: no control characters.
            return cls(error="".join(c if c.isprintable() else "?" for c in error))
        size = _integer(value, "size", "fetch answer", MAX_ARTIFACT_BYTES)
        chunk = _integer(value, "chunk", "fetch answer", MAX_MANIFEST_CHUNK)
        if chunk is not None and (chunk < MIN_MANIFEST_CHUNK or chunk & (chunk - 1)):
            raise FetchProtocolError(
                f"the fetch answer's chunk must be a power of two from {MIN_MANIFEST_CHUNK} "
                f"to {MAX_MANIFEST_CHUNK}"
            )
        port = _integer(value, "port", "fetch answer", 65535)
        if port == 0:
            raise FetchProtocolError("the fetch answer's port must be from 1 to 65535")
        length = _integer(value, "length", "fetch answer", MAX_MANIFEST_CHUNK)
        return cls(size=size, chunk=chunk, port=port, length=length)


# --- serving ------------------------------------------------------------------------------


class ArtifactServer:
    """Serves :data:`ARTIFACT_STREAM` streams, and bulk connections, from one node's store.

    Register :meth:`serve` with :meth:`MeshService.handle_streams`, and give :meth:`serve_bulk`
    to a :class:`~pollen.mesh.bulk.BulkServer`; ``bulk_port()`` is the port announced in
    manifests (None: none). ``served`` counts the whole transfers and chunks served,
    ``refused`` the requests answered with an error.
    """

    def __init__(
        self,
        store: ArtifactStore,
        node_name: str,
        *,
        bulk_port: Callable[[], int | None] = lambda: None,
        chunk_size: int = MANIFEST_CHUNK_BYTES,
    ) -> None:
        self._store = store
        self._name = node_name
        self._bulk_port = bulk_port
        self._chunk_size = chunk_size
        self._serving = 0
        self.served = 0
        self.refused = 0
        #: Chunks served (over both paths) and manifests sent.
        self.chunks_served = 0
        self.manifests_served = 0

    async def serve(self, origin: str, stream: FramedStream) -> None:
        """Answer one fetch request from ``origin``."""
        try:
            async with asyncio.timeout(HEADER_TIMEOUT):
                frame = await stream.read_frame()
        except TimeoutError:
            log.info("artifact fetch from %s: no request within %ss", origin, HEADER_TIMEOUT)
            stream.reset()
            return
        if frame is None:
            return
        try:
            request = FetchRequest.decode(frame)
        except FetchProtocolError as exc:
            log.info("artifact fetch from %s: %s", origin, exc)
            stream.reset()
            return
        if self._serving >= MAX_CONCURRENT_SERVES:
            await self._refuse(stream, f"{self._name} is serving too many artifacts at once")
            return
        self._serving += 1
        try:
            if request.manifest:
                await self._send_manifest(origin, request.digest, stream)
            elif request.chunk is not None:
                await self._send_chunk(origin, request.digest, request.chunk, stream)
            else:
                await self._send(origin, request.digest, stream)
        finally:
            self._serving -= 1

    async def _refuse(self, stream: FramedStream, reason: str) -> None:
        self.refused += 1
        await stream.write_frame(FetchAnswer(error=reason).encode())

    def _manifest(self, digest: str) -> Manifest:
        return self._store.manifest(digest, self._chunk_size)

    async def _send_manifest(self, origin: str, digest: str, stream: FramedStream) -> None:
        try:
            manifest = await asyncio.to_thread(self._manifest, digest)
        except ArtifactNotFound:
            await self._refuse(stream, f"{self._name} does not hold {digest}")
            return
        except CorruptArtifact as exc:
            log.warning("artifact fetch from %s: %s", origin, exc)
            await self._refuse(stream, f"{self._name}'s copy of {digest} was corrupt")
            return
        answer = FetchAnswer(size=manifest.size, chunk=manifest.chunk, port=self._bulk_port())
        await stream.write_frame(answer.encode())
        await stream.write_frame(b"".join(manifest.hashes))
        self.manifests_served += 1

    def _chunk(
        self, digest: str, index: int, into: bytearray | None = None
    ) -> tuple[int, bytes | memoryview]:
        """The artifact's size and chunk ``index``, checked against the manifest."""
        manifest = self._manifest(digest)
        if index >= manifest.count:
            raise IndexError(f"{digest} has {manifest.count} chunks, not {index + 1}")
        return manifest.size, self._store.read_chunk(digest, manifest, index, into)

    async def _send_chunk(self, origin: str, digest: str, index: int, stream: FramedStream) -> None:
        try:
            size, data = await asyncio.to_thread(self._chunk, digest, index)
        except ArtifactNotFound:
            await self._refuse(stream, f"{self._name} does not hold {digest}")
            return
        except IndexError as exc:
            await self._refuse(stream, str(exc))
            return
        except CorruptArtifact as exc:
            log.warning("artifact fetch from %s: %s", origin, exc)
            await self._refuse(stream, f"{self._name}'s copy of {digest} was corrupt")
            return
        await stream.write_frame(FetchAnswer(size=size, length=len(data)).encode())
        view = memoryview(data)
        for offset in range(0, len(data), MAX_CHUNK_BYTES):
            await stream.write_frame(bytes(view[offset : offset + MAX_CHUNK_BYTES]))
        self.chunks_served += 1

    async def _send(self, origin: str, digest: str, stream: FramedStream) -> None:
        try:
            reader = await asyncio.to_thread(self._store.open, digest, MAX_CHUNK_BYTES)
        except ArtifactNotFound:
            await self._refuse(stream, f"{self._name} does not hold {digest}")
            return
        try:
            await stream.write_frame(FetchAnswer(size=reader.size).encode())
            while (chunk := await asyncio.to_thread(reader.next_chunk)) is not None:
                await stream.write_frame(chunk)
        except CorruptArtifact as exc:
            # The store deleted it; the fetcher sees a reset, never the end of a bad copy.
            log.warning("artifact fetch from %s: %s", origin, exc)
            stream.reset()
            return
        finally:
            reader.close()
        self.served += 1

    def serve_bulk(self, conn: bulk.BulkConnection) -> None:
        """Answer chunk requests on an authenticated bulk connection until the peer closes
        it (blocking: the bulk server runs it in a worker thread)."""
        # Reused for every chunk of this connection (see BulkConnection.buffer).
        buffer = bytearray(self._chunk_size)
        while (frame := conn.read_frame(MAX_HEADER_BYTES)) is not None:
            conn.recheck()
            try:
                request = FetchRequest.decode(frame)
            except FetchProtocolError as exc:
                log.info("bulk fetch from %s: %s", conn.peer, exc)
                return  # closes the connection
            if request.chunk is None:
                log.info("bulk fetch from %s: only chunks are served here", conn.peer)
                return
            try:
                size, data = self._chunk(request.digest, request.chunk, buffer)
            except ArtifactNotFound:
                self.refused += 1
                refusal = f"{self._name} does not hold {request.digest}"
                conn.write_frame(FetchAnswer(error=refusal).encode())
                continue
            except IndexError as exc:
                self.refused += 1
                conn.write_frame(FetchAnswer(error=str(exc)).encode())
                continue
            except CorruptArtifact as exc:
                log.warning("bulk fetch from %s: %s", conn.peer, exc)
                return
            conn.write_frame(FetchAnswer(size=size, length=len(data)).encode())
            conn.send(data)
            self.chunks_served += 1


# --- fetching -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchAttempt:
    """One holder tried for an artifact, and why it did not work."""

    holder: str
    reason: str


class ArtifactUnavailable(ArtifactError):
    """No holder could provide the artifact; ``attempts`` says who was tried and why.

    No attempts means no alive node advertises the digest (yet: a push may be in progress).
    """

    def __init__(self, digest: str, attempts: tuple[FetchAttempt, ...] = ()) -> None:
        self.digest = digest
        self.attempts = attempts
        if attempts:
            tried = "; ".join(f"{a.holder}: {a.reason}" for a in attempts)
            message = f"cannot fetch {digest}: every holder failed ({tried})"
        else:
            message = f"cannot fetch {digest}: no alive node advertises it"
        super().__init__(message)


@dataclass(frozen=True)
class FetchRecord:
    """A completed fetch: what, from whom (the holder that sent the most chunks, through
    which relay), how much, how long; every holder that sent chunks, the bytes received,
    the bytes kept from an earlier attempt that was cut off, and whether chunks came over
    the bulk path."""

    digest: str
    holder: str
    via: str | None
    size: int
    seconds: float
    sources: tuple[str, ...] = ()
    transferred: int = 0
    resumed: int = 0
    bulk: bool = False


class _HolderFailed(Exception):
    """This holder did not deliver; ``penalise`` when it sent wrong bytes or broke protocol."""

    def __init__(self, reason: str, *, penalise: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.penalise = penalise


@dataclass(frozen=True)
class _Probe:
    """What a holder said about an artifact: its manifest, and its bulk port."""

    holder: str
    via: str | None
    manifest: Manifest
    port: int | None


@dataclass
class _Transfer:
    """The chunks of one fetch: left, in flight (and with whom), done; shared by its workers
    (all on the event loop, except :meth:`accept`, which worker threads call)."""

    digest: str
    manifest: Manifest
    partial: PartialArtifact
    first: str
    pending: deque[int] = field(default_factory=deque)
    in_flight: dict[int, set[str]] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    by: Counter[str] = field(default_factory=Counter)
    vias: dict[str, str] = field(default_factory=dict)
    since: dict[int, float] = field(default_factory=dict)
    kept: set[int] = field(default_factory=set)
    probes: dict[str, _Probe] = field(default_factory=dict)
    owners: dict[int, str] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)
    transferred: int = 0
    resumed: int = 0
    bulk: bool = False
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    # The whole file's SHA-256, computed in order while chunks arrive, so that it is ready
    # when the last one is written: the chunk just received is hashed from memory if it is
    # next in order, and chunks that came early are read back from the page cache then.
    _hasher: Any = field(default_factory=hashlib.sha256)
    _hashed: int = 0
    _written: set[int] = field(default_factory=set)
    _in_order: bool = True
    _hash_lock: threading.Lock = field(default_factory=threading.Lock)
    _hash_buffer: bytearray | None = None

    def __post_init__(self) -> None:
        self.pending.extend(range(self.manifest.count))

    def whole_hash(self) -> str | None:
        """The hex SHA-256 of the whole file if it was computed on the way, else None."""
        with self._hash_lock:
            self._advance()
            if self._in_order and self._hashed == self.manifest.count:
                return str(self._hasher.hexdigest())
        return None

    def _hash_in_order(self, index: int, data: bytes | bytearray | memoryview) -> None:
        with self._hash_lock:
            if not self._in_order or index < self._hashed:
                return
            self._written.add(index)
            if index == self._hashed:
                self._hasher.update(data)
                self._hashed += 1
            self._advance()

    def _advance(self) -> None:
        # Under _hash_lock.
        while self._in_order and self._hashed < self.manifest.count:
            index = self._hashed
            if index not in self._written and index not in self.kept:
                return
            offset, length = self.manifest.span(index)
            if self._hash_buffer is None:
                self._hash_buffer = bytearray(self.manifest.chunk)
            view = memoryview(self._hash_buffer)[:length]
            self.partial.read_into(offset, view)
            self._hasher.update(view)
            self._hashed += 1

    @property
    def finished(self) -> bool:
        return len(self.done) == self.manifest.count

    def scan(self) -> None:
        """Keep the chunks an earlier attempt left whole in the partial file (in a thread)."""
        for index in range(self.manifest.count):
            if self.partial.chunk_matches(self.manifest, index):
                self.done.add(index)
                self.kept.add(index)
                self.resumed += self.manifest.span(index)[1]
        self.pending = deque(i for i in range(self.manifest.count) if i not in self.done)

    def find_bad(self) -> dict[str, list[int]]:
        """Check every chunk in the file against the manifest (in a thread, once the whole
        file did not hash to the digest): the chunks that do not match, by the holder that
        sent them, made pending again (and the whole-file hash is then read from disk)."""
        bad: dict[str, list[int]] = {}
        unowned: list[int] = []
        for index in range(self.manifest.count):
            if not self.partial.chunk_matches(self.manifest, index):
                owner = self.owners.get(index)
                if owner is None:
                    unowned.append(index)  # kept from an earlier attempt: nobody to blame
                else:
                    bad.setdefault(owner, []).append(index)
        with self._hash_lock:
            self._in_order = False
        for index in unowned:
            self.done.discard(index)
            self.kept.discard(index)
            self.pending.append(index)
        for holder, indexes in bad.items():
            self.by[holder] -= len(indexes)
            if self.by[holder] <= 0:
                del self.by[holder]
            for index in indexes:
                self.done.discard(index)
                self.kept.discard(index)
                self.owners.pop(index, None)
                self.pending.append(index)
        return bad

    def take(self, holder: str, now: float) -> int | None:
        """The next chunk for ``holder``: one nobody fetches yet, else (at the end) one that
        a single other holder has been fetching for :data:`ENDGAME_SECONDS`, so that a slow
        holder does not hold up the end; None when there is nothing to do now."""
        while self.pending:
            index = self.pending.popleft()
            if index not in self.done:
                self.in_flight.setdefault(index, set()).add(holder)
                self.since[index] = now
                return index
        for index, holders in self.in_flight.items():
            late = now - self.since.get(index, now) >= ENDGAME_SECONDS
            if late and holder not in holders and len(holders) < 2:
                holders.add(holder)
                return index
        return None

    def give_back(self, index: int, holder: str) -> None:
        """``holder`` did not deliver chunk ``index``: someone else must."""
        holders = self.in_flight.get(index)
        if holders is not None:
            holders.discard(holder)
            if not holders:
                del self.in_flight[index]
        if index not in self.done and index not in self.in_flight:
            self.pending.appendleft(index)
        self._notify()

    def complete(self, index: int, holder: str, length: int, *, bulk: bool) -> None:
        """Chunk ``index`` arrived from ``holder`` and was written."""
        self.transferred += length
        holders = self.in_flight.pop(index, set())
        if index not in self.done:
            self.done.add(index)
            self.owners[index] = holder
            self.by[holder] += 1
            self.bulk = self.bulk or bulk
        # A second holder still fetching it is let finish; its copy is simply not used.
        for other in holders - {holder}:
            self.in_flight.setdefault(index, set()).add(other)
        self._notify()

    async def changed(self) -> None:
        """Wait until a chunk completes or is given back (or for a while: a chunk in flight
        may become late enough to fetch again)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ENDGAME_SECONDS / 4):
                await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def accept(self, holder: str, index: int, data: bytes | bytearray | memoryview) -> None:
        """Write chunk ``index`` and feed the whole-file hash (in a worker thread). Chunks
        are checked against the manifest only if the whole turns out wrong
        (:meth:`find_bad`)."""
        if index not in self.done:
            offset, _ = self.manifest.span(index)
            with contextlib.suppress(ArtifactError):  # closed: the fetch ended meanwhile
                self.partial.write_at(offset, data)
                self._hash_in_order(index, data)


class ArtifactFetcher:
    """Makes artifacts present in the local store, fetching them from holders in the mesh.

    ``distance(peer)`` ranks holders (default: the mesh's Vivaldi estimate; unknown last).
    ``bulk`` (the node's TLS credentials) enables the bulk path to holders that announce a
    port; ``sources`` and ``streams`` bound the holders one fetch uses at once and the
    chunks in flight per holder. ``history`` keeps the last fetches made, newest last.
    """

    def __init__(
        self,
        mesh: MeshService,
        store: ArtifactStore,
        *,
        distance: Callable[[str], float | None] | None = None,
        penalty: float = PENALTY_SECONDS,
        idle_timeout: float = IDLE_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        bulk: bulk.BulkTls | None = None,
        sources: int = MAX_SOURCES,
        streams: int = STREAMS_PER_SOURCE,
    ) -> None:
        self._mesh = mesh
        self._store = store
        self._distance = distance or mesh.estimated_rtt
        self._penalty = penalty
        self._idle_timeout = idle_timeout
        self._clock = clock
        self._bulk = bulk
        self._sources = max(1, sources)
        self._streams = max(1, streams)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._penalised: dict[str, float] = {}
        self._inflight: dict[str, asyncio.Task[Path]] = {}
        self.history: deque[FetchRecord] = deque(maxlen=64)

    # --- what membership says ---------------------------------------------------------------

    def holders(self, digest: str) -> list[str]:
        """Alive nodes advertising ``digest``, nearest first (unknown distance last), penalised
        ones left out."""
        digest_hex(digest)
        now = self._clock()
        found = []
        for name, member in self._mesh.members().items():
            if name == self._mesh.name or member.state != MemberState.ALIVE:
                continue
            if digest in member.meta.artifacts and not self._is_penalised(name, now):
                found.append(name)

        def rank(name: str) -> tuple[bool, float, str]:
            rtt = self._distance(name)
            return (rtt is None, rtt or 0.0, name)

        return sorted(found, key=rank)

    def penalised(self) -> Mapping[str, float]:
        """Holders skipped for now, with the clock time their penalty ends."""
        now = self._clock()
        return {name: until for name, until in self._penalised.items() if until > now}

    def _is_penalised(self, name: str, now: float) -> bool:
        until = self._penalised.get(name)
        if until is None:
            return False
        if until <= now:
            del self._penalised[name]
            return False
        return True

    # --- fetching ---------------------------------------------------------------------------

    async def ensure(self, digest: str, *, wait: float = 0.0) -> Path:
        """The path of ``digest``'s bytes in the local store, fetched first if needed.

        A local copy is verified (once per version of the file); a corrupt one is deleted and
        fetched again. Otherwise chunks are fetched from the nearest holders until the whole
        file hashes to ``digest``. With ``wait``, up to that many seconds are spent waiting
        for a holder to be advertised (and for new holders after every known one failed).
        Concurrent calls for one digest share one fetch (the first caller's ``wait`` applies).
        Raises :class:`~pollen.runtime.artifacts.InvalidDigest` for a malformed digest,
        :class:`ArtifactUnavailable` when no holder delivered, and
        :class:`~pollen.runtime.artifacts.ArtifactTooLarge` or
        :class:`~pollen.runtime.artifacts.QuotaExceeded` when the artifact does not fit in
        this node's store.
        """
        digest_hex(digest)
        if await asyncio.to_thread(self._store.verify, digest):
            self._store.touch(digest)
            return self._store.path(digest)
        task = self._inflight.get(digest)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(digest, wait))
            self._inflight[digest] = task
            task.add_done_callback(lambda done: self._fetched(digest, done))
        # Shielded: one caller giving up must not cancel the fetch the others wait for.
        return await asyncio.shield(task)

    def _fetched(self, digest: str, task: asyncio.Task[Path]) -> None:
        if self._inflight.get(digest) is task:
            del self._inflight[digest]
        if not task.cancelled():
            task.exception()  # retrieved: a fetch whose callers all left must not warn

    async def close(self) -> None:
        """Cancel the fetches in flight (the node is stopping)."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=4 * MAX_SOURCES * STREAMS_PER_SOURCE, thread_name_prefix="bulk-fetch"
            )
        return self._pool

    async def _fetch(self, digest: str, wait: float) -> Path:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        attempts: list[FetchAttempt] = []
        failed: set[str] = set()
        while True:
            candidates = [holder for holder in self.holders(digest) if holder not in failed]
            if candidates:
                record = await self._transfer(digest, candidates, attempts, failed)
                if record is not None:
                    self.history.append(record)
                    log.info(
                        "fetched %s (%d bytes, %d received, %d resumed) from %s%s%s in %.3fs",
                        digest,
                        record.size,
                        record.transferred,
                        record.resumed,
                        ", ".join(record.sources) or record.holder,
                        f" through {record.via}" if record.via else "",
                        " over the bulk path" if record.bulk else "",
                        record.seconds,
                    )
                    return self._store.path(digest)
                continue
            if loop.time() >= deadline:
                raise ArtifactUnavailable(digest, tuple(attempts))
            await asyncio.sleep(_HOLDER_POLL_SECONDS)

    def _failed(
        self, holder: str, failure: _HolderFailed, attempts: list[FetchAttempt], failed: set[str]
    ) -> None:
        log.info("fetching from %s failed: %s", holder, failure.reason)
        attempts.append(FetchAttempt(holder, failure.reason))
        failed.add(holder)
        if failure.penalise:
            self._penalised[holder] = self._clock() + self._penalty

    async def _transfer(
        self, digest: str, candidates: list[str], attempts: list[FetchAttempt], failed: set[str]
    ) -> FetchRecord | None:
        """One try with the holders not failed yet: the record, or None if it did not end
        with the whole file (holders that failed are added to ``failed``)."""
        started = self._clock()
        first: _Probe | None = None
        for holder in candidates:
            try:
                first = await self._probe(holder, digest)
                break
            except _HolderFailed as failure:
                self._failed(holder, failure, attempts, failed)
        if first is None:
            return None
        manifest = first.manifest
        # Raises ArtifactTooLarge or QuotaExceeded: this node's limit, not the holder's fault.
        partial = await asyncio.to_thread(self._store.partial, digest, manifest.size)
        transfer = _Transfer(digest, manifest, partial, first.holder)
        transfer.probes[first.holder] = first
        try:
            if partial.resumed:
                await asyncio.to_thread(transfer.scan)
            while True:
                holders = [holder for holder in candidates if holder not in failed]
                await self._run_workers(transfer, holders, attempts, failed)
                if not transfer.finished:
                    return None
                try:
                    await asyncio.to_thread(partial.commit, transfer.whole_hash())
                    break
                except DigestMismatch:
                    pass
                # Chunks are checked only now, when the whole is wrong: on the way they cost
                # a second hash of every byte, which is most of what a fetch costs.
                bad = await asyncio.to_thread(transfer.find_bad)
                if not transfer.finished and not bad:
                    continue  # only chunks kept from an earlier attempt had changed
                if not bad:
                    # Every chunk matched the manifest, so whoever sent chunks agreed with a
                    # manifest that is wrong: none of them has the artifact.
                    for holder in sorted(set(transfer.by) | {first.holder}):
                        reason = "sent chunks that do not add up to the digest"
                        lie = _HolderFailed(reason, penalise=True)
                        self._failed(holder, lie, attempts, failed)
                    await asyncio.to_thread(partial.discard)
                    return None
                for holder, indexes in sorted(bad.items()):
                    shown = ", ".join(str(index) for index in indexes[:8])
                    reason = f"sent chunks ({shown}) whose bytes do not match the digest"
                    self._failed(holder, _HolderFailed(reason, penalise=True), attempts, failed)
        finally:
            if not partial.committed:
                # Kept for the next attempt, which resumes with the chunks that match.
                await asyncio.to_thread(partial.close)
        main = transfer.by.most_common(1)[0][0] if transfer.by else first.holder
        return FetchRecord(
            digest,
            main,
            transfer.vias.get(main),
            manifest.size,
            self._clock() - started,
            tuple(sorted(transfer.by)),
            transfer.transferred,
            transfer.resumed,
            transfer.bulk,
        )

    async def _run_workers(
        self,
        transfer: _Transfer,
        holders: list[str],
        attempts: list[FetchAttempt],
        failed: set[str],
    ) -> None:
        """Fetch the chunks not done yet from ``holders``, nearest first, a few at once,
        replacing a holder that fails with the next; returns when every chunk is done or
        no holder is left."""
        spare = deque(holders)
        workers: dict[asyncio.Task[None], str] = {}
        loop = asyncio.get_running_loop()

        def start(holder: str) -> None:
            probe = transfer.probes.get(holder)
            workers[loop.create_task(self._worker(transfer, holder, probe))] = holder

        # No more holders than chunks left: a small artifact comes from its nearest holder.
        wanted = min(self._sources, max(1, len(transfer.pending)))
        while len(workers) < wanted and spare:
            start(spare.popleft())
        try:
            while workers and not transfer.finished:
                done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    holder = workers.pop(task)
                    error = task.exception()
                    if isinstance(error, _HolderFailed):
                        transfer.failed.add(holder)
                        self._failed(holder, error, attempts, failed)
                    elif error is not None:
                        raise error
                while len(workers) < wanted and spare and not transfer.finished:
                    start(spare.popleft())
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _worker(self, transfer: _Transfer, holder: str, probe: _Probe | None) -> None:
        """Fetch chunks from ``holder`` until the transfer is finished; raises
        :class:`_HolderFailed` when the holder fails (its chunks go back to the others)."""
        if probe is None:
            probe = transfer.probes[holder] = await self._probe(holder, transfer.digest)
        if probe.manifest != transfer.manifest:
            raise _HolderFailed(f"its chunk list differs from {transfer.first}'s")
        if probe.via is not None:
            transfer.vias[holder] = probe.via
        connections = await self._bulk_connections(probe, transfer)
        try:
            if connections:
                lanes = [self._lane(transfer, holder, conn) for conn in connections]
            else:
                lanes = [self._lane(transfer, holder, None) for _ in range(self._streams)]
            tasks = [asyncio.ensure_future(lane) for lane in lanes]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    if task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for conn in connections:
                conn.close()

    async def _lane(
        self, transfer: _Transfer, holder: str, conn: bulk.BulkConnection | None
    ) -> None:
        while not transfer.finished:
            if holder in transfer.failed:
                return
            index = transfer.take(holder, asyncio.get_running_loop().time())
            if index is None:
                await transfer.changed()
                continue
            try:
                if conn is not None:
                    await asyncio.get_running_loop().run_in_executor(
                        self._executor(), self._bulk_chunk, conn, transfer, index
                    )
                else:
                    await self._mesh_chunk(holder, transfer, index)
            except BaseException:
                transfer.give_back(index, holder)
                raise
            transfer.complete(
                index, holder, transfer.manifest.span(index)[1], bulk=conn is not None
            )

    async def _bulk_connections(
        self, probe: _Probe, transfer: _Transfer
    ) -> list[bulk.BulkConnection]:
        """Connections to the holder's bulk port, when it has one and the route is direct;
        none (the chunks go over mesh streams) when it cannot be reached."""
        if self._bulk is None or probe.port is None or probe.via is not None:
            return []
        peer = self._mesh.transport.peer(probe.holder)
        if peer is None:
            return []
        host = str(peer.address[0])
        connections: list[bulk.BulkConnection] = []
        # No more connections than chunks: each costs a handshake.
        for _ in range(min(self._streams, max(1, len(transfer.pending)))):
            try:
                connections.append(
                    await bulk.connect(
                        self._bulk,
                        host,
                        probe.port,
                        probe.holder,
                        executor=self._executor(),
                        idle_timeout=self._idle_timeout,
                    )
                )
            except bulk.BulkError as exc:
                log.info("bulk path to %s: %s; using mesh streams", probe.holder, exc)
                break
        return connections

    def _bulk_chunk(self, conn: bulk.BulkConnection, transfer: _Transfer, index: int) -> None:
        """One chunk over a bulk connection (in a worker thread)."""
        _, length = transfer.manifest.span(index)
        try:
            conn.write_frame(FetchRequest(transfer.digest, chunk=index).encode())
            frame = conn.read_frame(MAX_HEADER_BYTES)
            if frame is None:
                raise _HolderFailed("closed the bulk connection without an answer")
            self._check_chunk_answer(frame, transfer.manifest, length)
            # One buffer per connection, reused: a fresh multi-megabyte buffer per chunk
            # costs the kernel page faults that, measured, took longer than the write.
            data = conn.buffer(length)
            conn.recv_into(data)
        except bulk.BulkError as exc:
            raise _HolderFailed(f"cut off ({exc})") from None
        transfer.accept(conn.peer, index, data)

    @staticmethod
    def _check_chunk_answer(frame: bytes, manifest: Manifest, length: int) -> None:
        try:
            answer = FetchAnswer.decode(frame)
        except FetchProtocolError as exc:
            raise _HolderFailed(str(exc), penalise=True) from None
        if answer.error is not None:
            raise _HolderFailed(f"refused: {answer.error}")
        if answer.size != manifest.size or answer.length != length:
            raise _HolderFailed(
                f"answered a chunk of {answer.length} bytes of {answer.size}, not {length} of "
                f"{manifest.size}",
                penalise=True,
            )

    async def _mesh_chunk(self, holder: str, transfer: _Transfer, index: int) -> None:
        """One chunk over a mesh stream (direct or relayed)."""
        _, length = transfer.manifest.span(index)
        stream = await self._open(holder)
        try:
            await stream.write_frame(FetchRequest(transfer.digest, chunk=index).encode())
            await stream.finish()
            self._check_chunk_answer(await self._header(stream), transfer.manifest, length)
            data = bytearray()
            while True:
                try:
                    async with asyncio.timeout(self._idle_timeout):
                        frame = await stream.read_frame()
                except TimeoutError:
                    raise _HolderFailed(
                        f"silent for {self._idle_timeout:g}s after {len(data)} of {length} "
                        f"bytes of chunk {index}"
                    ) from None
                if frame is None:
                    break
                if not 0 < len(frame) <= MAX_CHUNK_BYTES:
                    raise _HolderFailed(f"sent a data frame of {len(frame)} bytes", penalise=True)
                if len(data) + len(frame) > length:
                    raise _HolderFailed(
                        f"sent more than the {length} bytes of chunk {index}", penalise=True
                    )
                data += frame
            if len(data) < length:
                raise _HolderFailed(f"cut off after {len(data)} of {length} bytes of chunk {index}")
        except _HolderFailed:
            stream.reset()
            raise
        except TransportError as exc:
            stream.reset()
            raise _HolderFailed(f"cut off ({exc})") from None
        except BaseException:
            stream.reset()
            raise
        await asyncio.to_thread(transfer.accept, holder, index, data)

    async def _open(self, holder: str) -> FramedStream:
        try:
            return (await self._mesh.open_stream(holder, ARTIFACT_STREAM)).stream
        except TransportError as exc:
            raise _HolderFailed(f"unreachable ({exc})") from None

    async def _header(self, stream: FramedStream) -> bytes:
        try:
            async with asyncio.timeout(HEADER_TIMEOUT):
                frame = await stream.read_frame()
        except TimeoutError:
            raise _HolderFailed(f"no answer within {HEADER_TIMEOUT:g}s") from None
        if frame is None:
            raise _HolderFailed("ended the stream without an answer")
        return frame

    async def _probe(self, holder: str, digest: str) -> _Probe:
        """Ask ``holder`` for the manifest of ``digest`` (and its bulk port)."""
        try:
            opened = await self._mesh.open_stream(holder, ARTIFACT_STREAM)
        except TransportError as exc:
            raise _HolderFailed(f"unreachable ({exc})") from None
        stream = opened.stream
        try:
            await stream.write_frame(FetchRequest(digest, manifest=True).encode())
            await stream.finish()
            try:
                answer = FetchAnswer.decode(await self._header(stream))
            except FetchProtocolError as exc:
                raise _HolderFailed(str(exc), penalise=True) from None
            if answer.error is not None:
                raise _HolderFailed(f"refused: {answer.error}")
            if answer.size is None or answer.chunk is None:
                raise _HolderFailed(
                    "answered a manifest request without a chunk size", penalise=True
                )
            count = Manifest.chunks_of(answer.size, answer.chunk)
            hashes = await self._header_sized(stream, count * _HASH_BYTES)
        except _HolderFailed:
            stream.reset()
            raise
        except TransportError as exc:
            stream.reset()
            raise _HolderFailed(f"cut off ({exc})") from None
        except BaseException:
            stream.reset()
            raise
        stream.reset()  # nothing more is expected; free the stream at both ends at once
        manifest = Manifest(
            answer.size,
            answer.chunk,
            tuple(hashes[i : i + _HASH_BYTES] for i in range(0, len(hashes), _HASH_BYTES)),
        )
        return _Probe(holder, opened.via, manifest, answer.port)

    async def _header_sized(self, stream: FramedStream, length: int) -> bytes:
        try:
            async with asyncio.timeout(HEADER_TIMEOUT):
                frame = await stream.read_frame()
        except TimeoutError:
            raise _HolderFailed(f"sent no manifest within {HEADER_TIMEOUT:g}s") from None
        if frame is None or len(frame) != length:
            got = "none" if frame is None else f"{len(frame)} bytes"
            raise _HolderFailed(f"sent a manifest of {got}, not {length} bytes", penalise=True)
        return frame
