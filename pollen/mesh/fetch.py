"""Artifact fetch: getting an artifact's bytes from a node that holds them, over the mesh.

Who holds what travels in membership gossip: every node lists the digests it holds (the most
recently used :data:`~pollen.mesh.wire.MAX_ARTIFACTS` of them) in its ``MemberMeta``.
A node that needs an artifact asks the holders, nearest first by Vivaldi estimate, on a mesh
stream of kind :data:`ARTIFACT_STREAM` (direct, or through a relay when there is no direct
route; :meth:`~pollen.mesh.service.MeshService.open_stream` decides).

Protocol, one stream per fetch, every frame length-prefixed by the transport::

    fetcher -> holder   {"digest": "sha256:<hex>"}                         (then end of stream)
    holder -> fetcher   {"size": N}  or  {"error": "one sentence"}
    holder -> fetcher   N bytes in frames of 1 to 1 MiB, then the end of the stream

Both JSON objects are at most :data:`MAX_HEADER_BYTES` and decoded strictly (unknown fields,
wrong types and out-of-range sizes are refused): every byte comes from a peer. A holder resets
a stream whose request is malformed or does not come in time; it answers with an error when
it does not hold the artifact or is busy. It reads from its store through a verifying reader
that keeps the last chunk back until the whole file matched its digest, and resets the stream
if it did not, so a fetcher never takes a corrupt copy for a complete one. The fetcher checks
anyway: it writes into the store's verifying writer, and bytes that do not hash to the digest
(or more bytes than announced, or frames over the limit) are discarded and the holder is
skipped for :data:`PENALTY_SECONDS`. A holder that refuses, is unreachable, falls silent or is
cut off mid-transfer is simply left for the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from pollen.mesh.membership import MemberState
from pollen.mesh.service import MeshService
from pollen.mesh.transport import FramedStream, TransportError
from pollen.runtime.artifacts import (
    CHUNK_BYTES,
    MAX_ARTIFACT_BYTES,
    ArtifactError,
    ArtifactNotFound,
    ArtifactStore,
    CorruptArtifact,
    DigestMismatch,
    InvalidDigest,
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
#: Largest data frame; a holder sends the bytes in frames of at most this.
MAX_CHUNK_BYTES: Final = CHUNK_BYTES
#: Seconds a holder has to send its answer, and a fetcher its request.
HEADER_TIMEOUT: Final = 10.0
#: Seconds a transfer may go without a data frame before the fetcher gives up on the holder.
IDLE_TIMEOUT: Final = 30.0
#: Seconds a holder that sent wrong bytes (or broke the protocol) is skipped.
PENALTY_SECONDS: Final = 60.0
#: Transfers one node serves at once; further requests are answered "busy".
MAX_CONCURRENT_SERVES: Final = 32
#: Seconds between looks at membership while :meth:`ArtifactFetcher.ensure` waits for a holder.
_HOLDER_POLL_SECONDS: Final = 0.1


class FetchProtocolError(Exception):
    """A malformed fetch request or answer; one sentence."""


def _decode_object(frame: bytes, what: str, keys: set[str]) -> dict[str, Any]:
    if len(frame) > MAX_HEADER_BYTES:
        raise FetchProtocolError(
            f"the {what} is {len(frame)} bytes, over the limit of {MAX_HEADER_BYTES}"
        )
    try:
        value = orjson.loads(frame)
    except orjson.JSONDecodeError:
        raise FetchProtocolError(f"the {what} is not JSON") from None
    if not isinstance(value, dict):
        raise FetchProtocolError(f"the {what} is not a JSON object")
    extra = set(value) - keys
    if extra:
        shown = ", ".join(sorted(repr(key)[:40] for key in extra)[:5])
        raise FetchProtocolError(f"the {what} has unknown fields: {shown}")
    return value


@dataclass(frozen=True)
class FetchRequest:
    """Fetcher to holder: send me the bytes of ``digest``."""

    digest: str

    def encode(self) -> bytes:
        return orjson.dumps({"digest": self.digest})

    @classmethod
    def decode(cls, frame: bytes) -> FetchRequest:
        """Parse a request; raises :class:`FetchProtocolError`, and only that."""
        value = _decode_object(frame, "fetch request", {"digest"})
        digest = value.get("digest")
        try:
            digest_hex(digest)
        except InvalidDigest:
            raise FetchProtocolError("the fetch request has no valid digest") from None
        assert isinstance(digest, str)
        return cls(digest)


@dataclass(frozen=True)
class FetchAnswer:
    """Holder to fetcher: ``size`` bytes follow, or the fetch is refused with ``error``."""

    size: int | None = None
    error: str | None = None

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
        return orjson.dumps({"size": self.size})

    @classmethod
    def decode(cls, frame: bytes) -> FetchAnswer:
        """Parse an answer; raises :class:`FetchProtocolError`, and only that."""
        value = _decode_object(frame, "fetch answer", {"size", "error"})
        if len(value) != 1:
            raise FetchProtocolError("the fetch answer must have exactly one of size or error")
        if "error" in value:
            error = value["error"]
            if not isinstance(error, str):
                raise FetchProtocolError("the fetch answer's error is not a string")
            # A peer's words end up in logs and API answers: no control characters.
            return cls(error="".join(c if c.isprintable() else "?" for c in error))
        size = value["size"]
        if type(size) is not int or not 0 <= size <= MAX_ARTIFACT_BYTES:
            raise FetchProtocolError(
                f"the fetch answer's size must be an integer from 0 to {MAX_ARTIFACT_BYTES}"
            )
        return cls(size=size)


# --- serving ------------------------------------------------------------------------------


class ArtifactServer:
    """Serves :data:`ARTIFACT_STREAM` streams from one node's store.

    Register :meth:`serve` with :meth:`MeshService.handle_streams`. ``served`` counts the
    transfers completed, ``refused`` the requests answered with an error.
    """

    def __init__(self, store: ArtifactStore, node_name: str) -> None:
        self._store = store
        self._name = node_name
        self._serving = 0
        self.served = 0
        self.refused = 0

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
            await self._send(origin, request.digest, stream)
        finally:
            self._serving -= 1

    async def _refuse(self, stream: FramedStream, reason: str) -> None:
        self.refused += 1
        await stream.write_frame(FetchAnswer(error=reason).encode())

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
    """A completed fetch: what, from whom (through which relay), how much, how long."""

    digest: str
    holder: str
    via: str | None
    size: int
    seconds: float


class _HolderFailed(Exception):
    """This holder did not deliver; ``penalise`` when it sent wrong bytes or broke protocol."""

    def __init__(self, reason: str, *, penalise: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.penalise = penalise


class ArtifactFetcher:
    """Makes artifacts present in the local store, fetching them from holders in the mesh.

    ``distance(peer)`` ranks holders (default: the mesh's Vivaldi estimate; unknown last).
    ``history`` keeps the last fetches made, newest last.
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
    ) -> None:
        self._mesh = mesh
        self._store = store
        self._distance = distance or mesh.estimated_rtt
        self._penalty = penalty
        self._idle_timeout = idle_timeout
        self._clock = clock
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
        fetched again. Otherwise the holders are tried nearest first until one delivers bytes
        that hash to ``digest``. With ``wait``, up to that many seconds are spent waiting for a
        holder to be advertised (and for new holders after every known one failed).
        Concurrent calls for one digest share one fetch (the first caller's ``wait`` applies).
        Raises :class:`~pollen.runtime.artifacts.InvalidDigest` for a malformed digest and
        :class:`ArtifactUnavailable` when no holder delivered.
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

    async def _fetch(self, digest: str, wait: float) -> Path:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        attempts: list[FetchAttempt] = []
        tried: set[str] = set()
        while True:
            for holder in self.holders(digest):
                if holder in tried:
                    continue
                tried.add(holder)
                try:
                    record = await self._fetch_from(holder, digest)
                except _HolderFailed as failure:
                    log.info("fetching %s from %s failed: %s", digest, holder, failure.reason)
                    attempts.append(FetchAttempt(holder, failure.reason))
                    if failure.penalise:
                        self._penalised[holder] = self._clock() + self._penalty
                    continue
                self.history.append(record)
                log.info(
                    "fetched %s (%d bytes) from %s%s in %.3fs",
                    digest,
                    record.size,
                    holder,
                    f" through {record.via}" if record.via else "",
                    record.seconds,
                )
                return self._store.path(digest)
            if loop.time() >= deadline:
                raise ArtifactUnavailable(digest, tuple(attempts))
            await asyncio.sleep(_HOLDER_POLL_SECONDS)

    async def _fetch_from(self, holder: str, digest: str) -> FetchRecord:
        started = self._clock()
        try:
            opened = await self._mesh.open_stream(holder, ARTIFACT_STREAM)
        except TransportError as exc:
            raise _HolderFailed(f"unreachable ({exc})") from None
        stream = opened.stream
        try:
            size = await self._request(stream, digest)
            await self._receive(stream, digest, size)
        except _HolderFailed:
            stream.reset()
            raise
        except TransportError as exc:
            stream.reset()
            raise _HolderFailed(f"cut off ({exc})") from None
        except BaseException:
            stream.reset()
            raise
        return FetchRecord(digest, holder, opened.via, size, self._clock() - started)

    async def _request(self, stream: FramedStream, digest: str) -> int:
        await stream.write_frame(FetchRequest(digest).encode())
        await stream.finish()
        try:
            async with asyncio.timeout(HEADER_TIMEOUT):
                frame = await stream.read_frame()
        except TimeoutError:
            raise _HolderFailed(f"no answer within {HEADER_TIMEOUT:g}s") from None
        if frame is None:
            raise _HolderFailed("ended the stream without an answer")
        try:
            answer = FetchAnswer.decode(frame)
        except FetchProtocolError as exc:
            raise _HolderFailed(str(exc), penalise=True) from None
        if answer.error is not None:
            raise _HolderFailed(f"refused: {answer.error}")
        assert answer.size is not None
        if answer.size > self._store.max_size:
            raise _HolderFailed(
                f"announced {answer.size} bytes, over the limit of {self._store.max_size}"
            )
        return answer.size

    async def _receive(self, stream: FramedStream, digest: str, size: int) -> None:
        writer = await asyncio.to_thread(self._store.writer, digest, size=size)
        try:
            while True:
                try:
                    async with asyncio.timeout(self._idle_timeout):
                        frame = await stream.read_frame()
                except TimeoutError:
                    raise _HolderFailed(
                        f"silent for {self._idle_timeout:g}s after {writer.written} of {size} bytes"
                    ) from None
                if frame is None:
                    break
                if not 0 < len(frame) <= MAX_CHUNK_BYTES:
                    raise _HolderFailed(f"sent a data frame of {len(frame)} bytes", penalise=True)
                if writer.written + len(frame) > size:
                    raise _HolderFailed(
                        f"sent more than the {size} bytes it announced", penalise=True
                    )
                await asyncio.to_thread(writer.write, frame)
            if writer.written < size:
                raise _HolderFailed(f"cut off after {writer.written} of {size} bytes")
            try:
                await asyncio.to_thread(writer.commit)
            except DigestMismatch:
                raise _HolderFailed(
                    "sent bytes that do not match the digest", penalise=True
                ) from None
        finally:
            if writer.digest is None:
                await asyncio.to_thread(writer.abort)
