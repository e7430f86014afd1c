"""Mutually authenticated QUIC between the nodes of a cluster, and the enrolment of new nodes.

This is the thin asyncio shell of the mesh: it moves opaque bytes between authenticated peers and
knows nothing of membership, gossip or RPC. ADR 0004 records the design; in short:

**One UDP socket per node.** A small endpoint routes datagrams by connection ID to aioquic
connections, both those it accepts and those it opens, so a node is reachable and dials from one
address (what firewalls and a later relay see).

**Mutual authentication.** Both ends present a node certificate (``pollen.mesh.pki``).

* The dialling side has aioquic verify the listener's certificate chain against the cluster CA
  inside the TLS handshake (``verify_mode=CERT_REQUIRED``, ``cadata`` = the CA), so it never
  sends its own certificate to a node outside the cluster.
* aioquic's server neither asks for nor verifies client certificates. The listener's QUIC
  connections are a subclass that sets aioquic's internal ``_request_client_certificate`` flag,
  so TLS asks for a certificate and checks the client's CertificateVerify (proof of possessing
  the key). aioquic then completes the handshake whether or not a certificate came, so on
  ``HandshakeCompleted`` -- the first event, before any stream or datagram event, since 1-RTT
  packets cannot be decrypted earlier -- both sides run :func:`pki.verify_node_certificate`
  (CA signature, validity, cluster, revocation). A refused peer's connection is closed with
  :attr:`CloseCode.UNAUTHENTICATED` before anything it sent is read and before we send it
  anything but the close. No session tickets are issued, so every handshake carries certificates.

**One connection per peer** carries: datagrams (QUIC DATAGRAM frames) for small membership
messages, one unidirectional control stream each way (a hello, then reliable messages too large
for a datagram), and bidirectional streams of length-prefixed frames for gossip and RPC, opened
with a *kind*. Every frame is ``u32 big-endian length | payload``; a frame over the limit, a
truncated frame, a bad hello or stream header, or a second control stream closes that connection
with :attr:`CloseCode.PROTOCOL_ERROR`. The rest of the node keeps serving.

**Enrolment** uses the same port with its own ALPN, ``pollen-enrol/1``, offered only by nodes
holding the root key. Such a connection carries exactly one exchange (see ``tokens.py``): the
listener sends a nonce on a stream it opens, the joiner answers with its token, name, key and
proof of possession, the listener answers with a certificate or a refusal. Anything else, or
more than a few KiB, or taking longer than ``enrol_timeout``, closes the connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import secrets
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import Any, cast

import orjson
from aioquic._buffer import Buffer
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.packet import QuicPacketType, pull_quic_header
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pollen.mesh import identity, pki, tokens

log = logging.getLogger(__name__)

ALPN_MESH = "pollen/1"
ALPN_ENROL = "pollen-enrol/1"
CONNECTION_ID_LENGTH = 8
SAFE_DATAGRAM_SIZE = 1200
LOOPBACK_DATAGRAM_SIZE = 9000
# Largest datagram payload aioquic accepts from a peer; what we send is much smaller.
MAX_DATAGRAM_FRAME_SIZE = 65536
# Room for the short header, AEAD tag and DATAGRAM frame header in one QUIC packet. aioquic keeps
# a DATAGRAM that fits in no packet at the head of its queue forever, blocking all later ones,
# so anything that might not fit goes on the control stream instead.
_DATAGRAM_OVERHEAD = 64
MAX_STREAM_KIND = 64
_MAX_HELLO = 256
_KIND_RE = re.compile(r"^[a-z0-9][a-z0-9._/-]{0,63}\Z")
_INSTANCE_RE = re.compile(r"^[0-9a-f]{32}\Z")
_LENGTH = struct.Struct(">I")
PROTOCOL_VERSION = 1


class CloseCode(IntEnum):
    """Application error codes of CONNECTION_CLOSE, so a peer's log says why it was dropped."""

    NO_ERROR = 0x0
    UNAUTHENTICATED = 0x101
    PROTOCOL_ERROR = 0x102
    SUPERSEDED = 0x103
    OVERLOADED = 0x104
    REVOKED = 0x105
    SHUTDOWN = 0x106
    TIMEOUT = 0x107
    INTERNAL_ERROR = 0x108


class TransportError(Exception):
    """Base of the transport's errors; messages are one sentence."""


class ConnectionRefused(TransportError):
    """A connection could not be established or authenticated (by either side)."""


class PeerUnavailable(TransportError):
    """There is no open connection to that peer."""


class StreamClosed(TransportError):
    """The stream or its connection is closed, or the peer reset it."""


class FrameError(TransportError):
    """A peer broke the framing rules (or our limits); its connection is closed with ``code``."""

    def __init__(self, message: str, code: CloseCode = CloseCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


# --- framing ------------------------------------------------------------------------------------


def encode_frame(payload: bytes) -> bytes:
    """``u32 big-endian length | payload``."""
    return _LENGTH.pack(len(payload)) + payload


class FrameDecoder:
    """Incremental decoder of length-prefixed frames with a size limit (sans-IO).

    An oversized length is refused as soon as its four bytes arrive, before any of the body is
    buffered, so a peer cannot make us hold more than ``max_size`` bytes per stream. The first
    frame of a stream (a header or a hello) may have a smaller limit of its own.
    """

    def __init__(self, max_size: int, first_max_size: int | None = None) -> None:
        self.max_size = max_size
        self._first_max_size = first_max_size
        self._buffer = bytearray()
        self._need: int | None = None

    @property
    def buffered(self) -> int:
        """Bytes received that belong to a frame not yet complete."""
        return len(self._buffer) + (0 if self._need is None else 4)

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the frames they complete, or raise :class:`FrameError`."""
        self._buffer += data
        frames: list[bytes] = []
        while True:
            if self._need is None:
                if len(self._buffer) < 4:
                    break
                (size,) = _LENGTH.unpack_from(self._buffer)
                limit = self.max_size
                if self._first_max_size is not None:
                    limit, self._first_max_size = self._first_max_size, None
                if size > limit:
                    raise FrameError(f"a frame of {size} bytes exceeds the limit of {limit}")
                del self._buffer[:4]
                self._need = size
            if len(self._buffer) < self._need:
                break
            frames.append(bytes(self._buffer[: self._need]))
            del self._buffer[: self._need]
            self._need = None
        return frames

    def end(self) -> None:
        """The stream ended: raise :class:`FrameError` if a frame was cut short."""
        if self._buffer or self._need is not None:
            raise FrameError("the stream ended in the middle of a frame")


# --- configuration and public types ---------------------------------------------------------


@dataclass(frozen=True)
class TransportConfig:
    """Limits and timings of the transport. Frame limits must agree across a cluster."""

    max_frame_size: int = 4 * 1024 * 1024
    """Largest frame on a gossip/RPC stream."""
    max_message_size: int = 1024 * 1024
    """Largest membership message (larger than a datagram: sent on the control stream)."""
    max_buffered_bytes: int = 64 * 1024 * 1024
    """Bytes a peer may have us hold that the application has not read yet."""
    stream_high_water: int = 1024 * 1024
    """``write_frame`` waits while a stream has more than this sent but not acknowledged."""
    max_datagram_size: int | None = None
    """QUIC packet size. ``None``: 1200 bytes, safe on any path (aioquic does no path MTU
    discovery), or 9000 when bound to a loopback address, where only loopback peers are
    reachable and larger packets move about five times as much per second."""
    idle_timeout: float = 30.0
    """A connection with no traffic for this long closes (QUIC idle timeout); ping to keep it."""
    connect_timeout: float = 10.0
    """Handshake, authentication and hello must be done within this, or the connection closes."""
    enrol_timeout: float = 10.0
    """The whole enrolment exchange must be done within this."""
    max_pending_handshakes: int = 128
    """Connections not yet authenticated; further Initial packets are dropped."""
    max_enrolments: int = 8
    """Enrolment exchanges at once; more are closed with ``OVERLOADED``."""
    revocation_interval: float = 30.0
    """How often open connections are checked again against revocation and expiry."""

    @property
    def datagram_limit(self) -> int:
        """Largest message (channel byte included) sent as a datagram."""
        return (self.max_datagram_size or SAFE_DATAGRAM_SIZE) - _DATAGRAM_OVERHEAD


@dataclass(frozen=True)
class RttStats:
    """QUIC's own RTT estimate of a connection (RFC 9002), in seconds."""

    smoothed: float
    latest: float
    minimum: float
    variance: float


MessageHandler = Callable[[str, int, bytes], None]
"""``on_message(peer_name, channel, payload)``: a datagram or reliable message arrived."""
StreamHandler = Callable[[str, str, "FramedStream"], Awaitable[None]]
"""``on_stream(peer_name, kind, stream)``: a peer opened a stream; run as a task."""
PeerHandler = Callable[[str, bool], None]
"""``on_peer(peer_name, connected)``: a peer's connection came up or went away.

When a connection is replaced (the peer restarted, or two nodes dialled each other at once),
``False`` then ``True`` are reported, so per-connection state (a sync state) starts afresh.
"""


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _default_datagram_size(host: str) -> int:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    return LOOPBACK_DATAGRAM_SIZE if loopback else SAFE_DATAGRAM_SIZE


# --- streams ------------------------------------------------------------------------------------


class FramedStream:
    """A bidirectional QUIC stream carrying length-prefixed frames.

    Reading returns whole frames; ``None`` means the peer finished its side cleanly. A stream
    whose connection closes, or that the peer resets, raises :class:`StreamClosed`.
    """

    def __init__(self, conn: _Connection, stream_id: int, kind: str, *, local: bool) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.kind = kind
        self.local = local
        self._header_pending = not local
        self._decoder = FrameDecoder(conn.config.max_frame_size, None if local else MAX_STREAM_KIND)
        self._frames: deque[bytes] = deque()
        self._held = 0  # bytes received and not yet read by the application
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._error: StreamClosed | None = None
        # The peer will send nothing more (FIN, reset, or the connection is gone). Until then
        # the stream stays known, so late data is never mistaken for a new stream's header.
        self._read_finished = False
        self._discarding = False  # the application wants no more of what the peer sends
        self._write_done = False

    @property
    def peer(self) -> str:
        """The authenticated name of the node at the other end."""
        return self._conn.peer_name

    async def read_frame(self) -> bytes | None:
        """The next frame, ``None`` at a clean end, or :class:`StreamClosed`."""
        while not self._frames:
            if self._error is not None:
                raise self._error
            if self._eof:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        frame = self._frames.popleft()
        self._release(len(frame) + 4)
        return frame

    async def write_frame(self, payload: bytes) -> None:
        """Send one frame; waits while too much is unacknowledged (backpressure)."""
        if len(payload) > self._conn.config.max_frame_size:
            raise ValueError(
                f"a frame of {len(payload)} bytes exceeds the limit of "
                f"{self._conn.config.max_frame_size}"
            )
        if self._write_done or self._conn.closed:
            raise StreamClosed("the stream is closed for writing")
        self._conn.send_stream(self.stream_id, encode_frame(payload))
        await self._conn.drain(self.stream_id)

    async def finish(self) -> None:
        """Close our side of the stream (the peer reads ``None`` after the last frame)."""
        self._finish_now()

    def reset(self) -> None:
        """Abort the stream in both directions; frames not yet read are dropped."""
        if not self._write_done and not self._conn.closed:
            self._conn.reset_stream(self.stream_id)
        self._write_done = True
        self._stop_reading()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        while (frame := await self.read_frame()) is not None:
            yield frame

    # called by the connection

    def _feed(self, data: bytes, end_stream: bool) -> list[bytes]:
        """Take received bytes; return the header frame if this completes it (peer streams)."""
        if self._read_finished:
            return []
        if self._discarding:
            if end_stream:
                self._read_finished = True
                self._conn.forget_if_done(self)
            return []
        before = self._decoder.buffered
        frames = self._decoder.feed(data)
        if end_stream:
            self._decoder.end()
        header: list[bytes] = []
        if frames and self._header_pending:
            self._header_pending = False
            header.append(frames.pop(0))
        added = self._decoder.buffered - before + sum(len(f) + 4 for f in frames)
        self._held += added
        self._conn.hold(added)
        self._frames.extend(frames)
        if end_stream:
            self._eof = True
            self._read_finished = True
        if frames or end_stream:
            self._wake()
        self._conn.forget_if_done(self)
        return header

    def _fail(self, error: StreamClosed) -> None:
        if self._error is None:
            self._error = error
        self._read_finished = True
        self._write_done = True
        self._wake()

    def _peer_stopped(self) -> None:
        self._write_done = True
        self._conn.forget_if_done(self)

    def _finish_now(self) -> None:
        if self._write_done or self._conn.closed:
            self._write_done = True
            return
        self._write_done = True
        self._conn.send_stream(self.stream_id, b"", end_stream=True)
        self._conn.forget_if_done(self)

    def _stop_reading(self) -> None:
        if not self._read_finished and not self._discarding and not self._conn.closed:
            self._conn.stop_stream(self.stream_id)
        self._discarding = True
        self._frames.clear()
        self._release(self._held)
        if self._error is None:
            self._error = StreamClosed("the stream was closed")
        self._wake()
        self._conn.forget_if_done(self)

    def _release(self, count: int) -> None:
        count = min(count, self._held)
        self._held -= count
        self._conn.hold(-count)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    @property
    def _done(self) -> bool:
        return self._read_finished and self._write_done


# --- connections --------------------------------------------------------------------------------


class _ServerQuicConnection(QuicConnection):
    """aioquic's connection, asking the client for a certificate in the TLS handshake."""

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        # aioquic has no public switch for this: its server TLS context requests a client
        # certificate only when this internal flag is set. Fail loudly if a new aioquic renames
        # it, rather than silently accepting clients that present nothing.
        if not hasattr(self.tls, "_request_client_certificate"):
            raise RuntimeError("this aioquic version cannot request client certificates")
        self.tls._request_client_certificate = True


def _peer_certificate(quic: QuicConnection) -> x509.Certificate | None:
    # aioquic keeps the peer's leaf certificate on its TLS context without a public accessor.
    cert = getattr(quic.tls, "_peer_certificate", None)
    return cert if isinstance(cert, x509.Certificate) else None


class _Connection(QuicConnectionProtocol):
    """One QUIC connection: authentication, then a mesh or enrolment session."""

    def __init__(
        self,
        quic: QuicConnection,
        *,
        endpoint: _Endpoint,
        config: TransportConfig,
        address: NetworkAddress,
        outgoing: bool,
        owner: MeshTransport | None = None,
        expected_peer: str | None = None,
        enrol_client: _EnrolClient | None = None,
        deadline: float,
    ) -> None:
        super().__init__(quic)
        self.endpoint = endpoint
        self.config = config
        self.address = address
        self.outgoing = outgoing
        self.owner = owner
        self.expected_peer = expected_peer
        self.enrol_client = enrol_client
        self.peer_name = ""
        self.peer_certificate: x509.Certificate | None = None
        self.peer_instance = ""
        self.registered = False
        self.closed = False
        self.close_reason = ""
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[PeerConnection] = loop.create_future()
        # connect() callers may give up; their futures must not log "never retrieved".
        self.ready.add_done_callback(_consume_exception)
        self.session: _MeshSession | _EnrolServer | None = None
        self.facade = PeerConnection(self)
        self._buffered = 0
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._deadline: asyncio.TimerHandle | None = loop.call_later(deadline, self._on_deadline)
        self._connection_id_issued_handler = lambda cid: endpoint.register(cid, self)
        self._connection_id_retired_handler = lambda cid: endpoint.unregister(cid)
        self._connection_terminated_handler = lambda: endpoint.forget(self)

    # aioquic hooks

    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        super().datagram_received(data, addr)
        if not self.closed:
            close_event = getattr(self._quic, "_close_event", None)
            if close_event is not None:
                # aioquic closed the connection itself (a TLS alert, a QUIC protocol error): say
                # so now rather than after the closing period, so connect() fails fast.
                self._teardown(
                    close_event.reason_phrase or f"error 0x{close_event.error_code:x}",
                    close_event.error_code,
                )
        if self._drain_waiters:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.ConnectionTerminated):
            self._teardown(event.reason_phrase or f"error 0x{event.error_code:x}", event.error_code)
            return
        if self.closed:
            # Nothing a refused or closing peer sent reaches the application.
            return
        try:
            if isinstance(event, events.HandshakeCompleted):
                self._on_handshake(event)
            elif self.enrol_client is not None:
                self.enrol_client.handle(self, event)
            elif self.session is not None:
                self.session.handle(event)
        except FrameError as exc:
            self.refuse(exc.code, str(exc))
        except Exception:
            # A bug must cost one connection, not leave aioquic's event loop half-run.
            log.exception("failed on an event from %s", self.peer_name or self.address[0])
            self.refuse(CloseCode.INTERNAL_ERROR, "internal error")

    # authentication

    def _on_handshake(self, event: events.HandshakeCompleted) -> None:
        if self.enrol_client is not None:
            self.enrol_client.authenticate(self)
            return
        if self.owner is None:
            self.refuse(CloseCode.PROTOCOL_ERROR, "this endpoint accepts no connections")
            return
        if not self.outgoing and event.alpn_protocol == ALPN_ENROL:
            self.owner._start_enrolment(self)
            return
        if event.alpn_protocol != ALPN_MESH:
            self.refuse(CloseCode.PROTOCOL_ERROR, "unknown application protocol")
            return
        cert = _peer_certificate(self._quic)
        if cert is None:
            self.refuse(CloseCode.UNAUTHENTICATED, "certificate refused: none was presented")
            return
        try:
            name = self.owner.verify_peer(cert)
        except pki.CertificateError as exc:
            self.refuse(CloseCode.UNAUTHENTICATED, f"certificate refused: {exc}")
            return
        if name == self.owner.name:
            self.refuse(CloseCode.UNAUTHENTICATED, f"node {name!r} cannot connect to itself")
            return
        if self.expected_peer is not None and name != self.expected_peer:
            self.refuse(
                CloseCode.UNAUTHENTICATED,
                f"expected node {self.expected_peer!r} but node {name!r} answered",
            )
            return
        self.peer_name = name
        self.peer_certificate = cert
        self.session = _MeshSession(self, self.owner)

    def refuse(self, code: CloseCode, reason: str) -> None:
        """Close the connection with ``code``; nothing more is read from it."""
        if self.closed:
            return
        who = self.peer_name or f"{self.address[0]}:{self.address[1]}"
        quiet = (CloseCode.NO_ERROR, CloseCode.SUPERSEDED, CloseCode.SHUTDOWN)
        level = logging.DEBUG if code in quiet else logging.INFO
        log.log(level, "closing connection with %s: %s", who, reason)
        self.close(error_code=int(code), reason_phrase=reason[:200])
        self._teardown(reason)

    def _teardown(self, reason: str, code: int | None = None) -> None:
        """Forget the connection; ``code`` is the error code of a close that came from afar."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if (
            code == CloseCode.SUPERSEDED
            and self.owner is not None
            and self.peer_name
            and not self.ready.done()
        ):
            # Both nodes dialled at once and the peer kept the other connection, possibly
            # before its hello on this one went out: whoever waits on this one gets that one.
            self.owner._adopt_when_connected(self.peer_name, self.ready)
        elif not self.ready.done():
            self.ready.set_exception(ConnectionRefused(reason))
        if self.session is not None:
            self.session.closed(reason)
        if self.enrol_client is not None:
            self.enrol_client.closed(reason)
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()
        if self.owner is not None:
            self.owner._connection_closed(self)

    def set_deadline(self, seconds: float) -> None:
        """Close the connection in ``seconds`` unless it has registered as a peer by then."""
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = asyncio.get_running_loop().call_later(seconds, self._on_deadline)

    def _on_deadline(self) -> None:
        self._deadline = None
        if not self.registered:
            what = "enrolment" if isinstance(self.session, _EnrolServer) else "handshake"
            self.refuse(CloseCode.TIMEOUT, f"the {what} took too long")

    def mark_registered(self) -> None:
        """The connection became its peer's connection: the handshake deadline is over."""
        self.registered = True
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    # used by sessions and streams

    @property
    def is_client(self) -> bool:
        return bool(self._quic.configuration.is_client)

    def peer_initiated(self, stream_id: int) -> bool:
        # Bit 0 of a stream ID is set for streams the server opened (RFC 9000 section 2.1).
        return bool(stream_id & 1) == self.is_client

    def send_stream(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        try:
            self._quic.send_stream_data(stream_id, data, end_stream=end_stream)
        except (ValueError, AssertionError, RuntimeError) as exc:
            # aioquic refuses writes after FIN or reset, and on streams the peer stopped.
            raise StreamClosed("the stream is closed for writing") from exc
        self._transmit_soon()

    def reset_stream(self, stream_id: int) -> None:
        try:
            self._quic.reset_stream(stream_id, error_code=0)
        except (ValueError, AssertionError):
            return
        self._transmit_soon()

    def stop_stream(self, stream_id: int) -> None:
        try:
            self._quic.stop_stream(stream_id, error_code=0)
        except (ValueError, AssertionError):
            return
        self._transmit_soon()

    def send_datagram(self, payload: bytes) -> None:
        self._quic.send_datagram_frame(payload)
        self._transmit_soon()

    def new_stream_id(self, unidirectional: bool = False) -> int:
        return int(self._quic.get_next_available_stream_id(is_unidirectional=unidirectional))

    def hold(self, count: int) -> None:
        """Account for bytes received but not yet read; too many closes the connection."""
        self._buffered += count
        if count > 0 and self._buffered > self.config.max_buffered_bytes:
            raise FrameError(
                f"the peer has {self._buffered} bytes waiting to be read, more than "
                f"{self.config.max_buffered_bytes}",
                CloseCode.OVERLOADED,
            )

    async def drain(self, stream_id: int) -> None:
        while not self.closed and self._unacknowledged(stream_id) > self.config.stream_high_water:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter
        if self.closed:
            raise StreamClosed(f"the connection is closed: {self.close_reason}")

    def _unacknowledged(self, stream_id: int) -> int:
        # aioquic buffers without limit and has no public measure of it; this reads how much of
        # a stream it still holds (sent but unacknowledged, or not yet sent).
        stream = self._quic._streams.get(stream_id)
        sender = getattr(stream, "sender", None)
        if sender is None:
            return 0
        return int(getattr(sender, "_buffer_stop", 0)) - int(getattr(sender, "_buffer_start", 0))

    def forget_if_done(self, stream: FramedStream) -> None:
        if stream._done and isinstance(self.session, _MeshSession):
            self.session.streams.pop(stream.stream_id, None)

    def rtt_stats(self) -> RttStats | None:
        # QUIC measures RTT on every acknowledged packet; aioquic keeps the estimate on its
        # loss recovery object, which has no public accessor.
        loss = getattr(self._quic, "_loss", None)
        if loss is None or not getattr(loss, "_rtt_initialized", False):
            return None
        return RttStats(
            smoothed=float(loss._rtt_smoothed),
            latest=float(loss._rtt_latest),
            minimum=float(loss._rtt_min),
            variance=float(loss._rtt_variance),
        )

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def _wait_closed(connections: list[_Connection], grace: float) -> None:
    """Wait up to ``grace`` seconds for connections to finish closing."""
    if not connections:
        return
    waits = [asyncio.ensure_future(c.wait_closed()) for c in connections]
    _, pending = await asyncio.wait(waits, timeout=grace)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def _consume_exception(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class PeerConnection:
    """An authenticated connection to one peer, as the application sees it.

    Prefer the name-based methods of :class:`MeshTransport`: when a connection is replaced (the
    peer restarted, or both sides dialled at once) they use the new one, this object does not.
    """

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn

    @property
    def name(self) -> str:
        """The peer's node name, from its certificate."""
        return self._conn.peer_name

    @property
    def address(self) -> NetworkAddress:
        """The peer's UDP address as this node sees it."""
        return self._conn.address

    @property
    def outgoing(self) -> bool:
        """True if this node dialled."""
        return self._conn.outgoing

    @property
    def instance(self) -> str:
        """A random id the peer's process chose at start: it changes when the peer restarts."""
        return self._conn.peer_instance

    @property
    def certificate(self) -> x509.Certificate | None:
        """The peer's verified certificate."""
        return self._conn.peer_certificate

    @property
    def is_open(self) -> bool:
        """False once the connection is closed, refused or replaced."""
        return not self._conn.closed

    def rtt(self) -> float | None:
        """QUIC's smoothed RTT estimate in seconds, ``None`` before the first sample."""
        stats = self._conn.rtt_stats()
        return None if stats is None else stats.smoothed

    def rtt_stats(self) -> RttStats | None:
        """QUIC's RTT estimates in seconds."""
        return self._conn.rtt_stats()

    def send(self, channel: int, payload: bytes, *, reliable: bool = False) -> None:
        """See :meth:`MeshTransport.send`."""
        session = self._session()
        session.send_message(channel, payload, reliable=reliable)

    async def open_stream(self, kind: str) -> FramedStream:
        """Open a framed stream; the peer's ``on_stream`` gets ``kind``."""
        return self._session().open_stream(kind)

    async def ping(self) -> float:
        """Send a QUIC PING and wait for its acknowledgement; the elapsed seconds.

        It waits as long as the connection lives; bound it with ``asyncio.timeout``.
        """
        if self._conn.closed:
            raise PeerUnavailable(f"the connection to {self.name!r} is closed")
        start = time.monotonic()
        try:
            await self._conn.ping()
        except ConnectionError as exc:
            raise PeerUnavailable(f"node {self.name!r} did not answer a ping") from exc
        return time.monotonic() - start

    def close(self, reason: str = "closed by this node") -> None:
        """Close the connection (``NO_ERROR``)."""
        self._conn.refuse(CloseCode.NO_ERROR, reason)

    async def wait_closed(self) -> None:
        """Wait until the connection has fully terminated."""
        await self._conn.wait_closed()

    def _session(self) -> _MeshSession:
        session = self._conn.session
        if self._conn.closed or not isinstance(session, _MeshSession):
            raise PeerUnavailable(f"the connection to {self.name!r} is closed")
        return session

    def __repr__(self) -> str:
        state = "open" if self.is_open else "closed"
        return f"<PeerConnection {self.name!r} {self.address[0]}:{self.address[1]} {state}>"


# --- the mesh session ----------------------------------------------------------------------


class _MeshSession:
    """What an authenticated mesh connection carries: hello, messages, datagrams, streams."""

    def __init__(self, conn: _Connection, owner: MeshTransport) -> None:
        self.conn = conn
        self.owner = owner
        self.streams: dict[int, FramedStream] = {}
        self.hello_seen = False
        self._pending: list[FramedStream] = []
        self._control_in: int | None = None
        # A 1-byte channel precedes each message's payload.
        self._control_decoder = FrameDecoder(conn.config.max_message_size + 1, _MAX_HELLO)
        self._control_out = conn.new_stream_id(unidirectional=True)
        hello = orjson.dumps({"v": PROTOCOL_VERSION, "instance": owner.instance})
        conn.send_stream(self._control_out, encode_frame(hello))

    def handle(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            if event.stream_id & 2:
                self._control_data(event)
            else:
                self._stream_data(event)
        elif isinstance(event, events.DatagramFrameReceived):
            if not self.hello_seen:
                return  # sent before its hello arrived; datagrams may be lost anyway
            if not event.data:
                raise FrameError("an empty datagram")
            self.owner._deliver(self.conn.peer_name, event.data[0], event.data[1:])
        elif isinstance(event, events.StreamReset):
            if event.stream_id == self._control_in:
                raise FrameError("the peer reset its control stream")
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._fail(StreamClosed("the peer reset the stream"))
                self.conn.forget_if_done(stream)
        elif isinstance(event, events.StopSendingReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._peer_stopped()

    def _control_data(self, event: events.StreamDataReceived) -> None:
        if not self.conn.peer_initiated(event.stream_id):
            raise FrameError("data on our own unidirectional stream")
        if self._control_in is None:
            self._control_in = event.stream_id
        elif event.stream_id != self._control_in:
            raise FrameError("a second control stream")
        frames = self._control_decoder.feed(event.data)
        if event.end_stream:
            raise FrameError("the peer ended its control stream")
        for frame in frames:
            if not self.hello_seen:
                self._hello(frame)
                if self.conn.closed:
                    return
            elif not frame:
                raise FrameError("an empty message")
            else:
                self.owner._deliver(self.conn.peer_name, frame[0], frame[1:])

    def _hello(self, frame: bytes) -> None:
        try:
            hello = orjson.loads(frame)
        except orjson.JSONDecodeError as exc:
            raise FrameError("the hello is not JSON") from exc
        if (
            not isinstance(hello, dict)
            or type(hello.get("v")) is not int
            or hello["v"] != PROTOCOL_VERSION
            or not isinstance(hello.get("instance"), str)
            or not _INSTANCE_RE.match(hello["instance"])
        ):
            raise FrameError("the hello is malformed or of another protocol version")
        self.hello_seen = True
        self.conn.peer_instance = hello["instance"]
        self.owner._register(self.conn)
        if self.conn.closed:
            return
        pending, self._pending = self._pending, []
        for stream in pending:
            self.owner._dispatch_stream(stream)

    def _stream_data(self, event: events.StreamDataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            if not self.conn.peer_initiated(event.stream_id):
                return  # late data on a stream we already forgot
            stream = FramedStream(self.conn, event.stream_id, "", local=False)
            self.streams[event.stream_id] = stream
        header = stream._feed(event.data, event.end_stream)
        if stream._header_pending and event.end_stream:
            raise FrameError("a stream ended before its header")
        if header:
            kind = header[0].decode("ascii", "replace")
            if not _KIND_RE.match(kind):
                raise FrameError("a stream header with an invalid kind")
            stream.kind = kind
            if self.hello_seen:
                self.owner._dispatch_stream(stream)
            else:
                self._pending.append(stream)

    def send_message(self, channel: int, payload: bytes, *, reliable: bool) -> None:
        if not 0 <= channel <= 255:
            raise ValueError("a channel is a number from 0 to 255")
        if len(payload) > self.conn.config.max_message_size:
            raise ValueError(
                f"a message of {len(payload)} bytes exceeds the limit of "
                f"{self.conn.config.max_message_size}"
            )
        data = bytes((channel,)) + payload
        if not reliable and len(data) <= self.conn.config.datagram_limit:
            self.conn.send_datagram(data)
        else:
            self.conn.send_stream(self._control_out, encode_frame(data))

    def open_stream(self, kind: str) -> FramedStream:
        if not _KIND_RE.match(kind):
            raise ValueError(f"stream kind {kind!r} is not valid")
        stream_id = self.conn.new_stream_id()
        stream = FramedStream(self.conn, stream_id, kind, local=True)
        self.streams[stream_id] = stream
        self.conn.send_stream(stream_id, encode_frame(kind.encode("ascii")))
        return stream

    def closed(self, reason: str) -> None:
        error = StreamClosed(f"the connection is closed: {reason}")
        for stream in list(self.streams.values()):
            stream._fail(error)
        self.streams.clear()
        self._pending.clear()


# --- enrolment: the admitting side ------------------------------------------------------------

# Events that carry something the peer chose to send (as opposed to connection bookkeeping).
_PEER_DATA_EVENTS = (
    events.StreamDataReceived,
    events.DatagramFrameReceived,
    events.StreamReset,
    events.StopSendingReceived,
)


class _EnrolServer:
    """One enrolment exchange on a connection from a node that has no certificate yet."""

    def __init__(
        self, conn: _Connection, admitter: tokens.Admitter, clock: Callable[[], datetime]
    ) -> None:
        self.conn = conn
        self.admitter = admitter
        self.clock = clock
        self.nonce = tokens.new_nonce()
        self.stream_id = conn.new_stream_id()
        self.decoder = FrameDecoder(tokens.MAX_ENROL_MESSAGE)
        self.received = 0
        self.answered = False
        conn.send_stream(self.stream_id, encode_frame(tokens.encode_challenge(self.nonce)))

    def handle(self, event: events.QuicEvent) -> None:
        if not isinstance(event, _PEER_DATA_EVENTS):
            return  # connection bookkeeping (new connection IDs, pings)
        # Before admission the peer is a stranger: only the one exchange is served.
        if not isinstance(event, events.StreamDataReceived) or event.stream_id != self.stream_id:
            raise FrameError("only the enrolment exchange is served before admission")
        self.received += len(event.data)
        if self.received > tokens.MAX_ENROL_MESSAGE + 4:
            raise FrameError("the enrolment request is too large")
        if self.answered:
            if event.data:
                raise FrameError("data after the enrolment request")
            return
        frames = self.decoder.feed(event.data)
        if event.end_stream:
            self.decoder.end()
        if len(frames) > 1:
            raise FrameError("more than one enrolment request")
        if frames:
            self._answer(frames[0])

    def _answer(self, frame: bytes) -> None:
        self.answered = True
        try:
            request = tokens.EnrolRequest.decode(frame)
            grant = self.admitter.admit(request, self.nonce, self.clock())
        except tokens.EnrolmentError as exc:
            log.warning("refused to admit a node from %s: %s", self.conn.address[0], exc)
            answer = tokens.encode_refusal(str(exc))
        else:
            log.info("admitted node %r from %s", request.node_name, self.conn.address[0])
            answer = tokens.encode_grant(grant)
        # The joiner closes the connection once it has the answer; the deadline covers the rest.
        self.conn.send_stream(self.stream_id, encode_frame(answer), end_stream=True)

    def closed(self, reason: str) -> None:
        pass


# --- enrolment: the joining side ----------------------------------------------------------------


class _NotAdmitted(Exception):
    """This address could not enrol us, but another address of the token might."""


class _EnrolClient:
    """The joiner's side of one enrolment attempt."""

    def __init__(
        self,
        claims: tokens.TokenClaims,
        token: str,
        node_name: str,
        node_key: Ed25519PrivateKey,
        clock: Callable[[], datetime],
    ) -> None:
        self.claims = claims
        self.token = token
        self.node_name = node_name
        self.node_key = node_key
        self.clock = clock
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.answer.add_done_callback(_consume_exception)
        self.decoder = FrameDecoder(tokens.MAX_ENROL_MESSAGE)
        self.stream_id: int | None = None
        self.challenged = False

    def authenticate(self, conn: _Connection) -> None:
        # The token is a bearer secret: only show it to a node the cluster's root key vouches for.
        cert = _peer_certificate(conn._quic)
        try:
            if cert is None:
                raise pki.CertificateError("it presented no certificate")
            pki.verify_node_certificate_with_key(
                cert, self.claims.root_key, self.claims.cluster, self.clock()
            )
        except pki.CertificateError as exc:
            reason = f"it is not a node of cluster {self.claims.cluster!r}: {exc}"
            if not self.answer.done():
                self.answer.set_exception(_NotAdmitted(reason))
            conn.refuse(CloseCode.UNAUTHENTICATED, reason)

    def handle(self, conn: _Connection, event: events.QuicEvent) -> None:
        if not isinstance(event, _PEER_DATA_EVENTS):
            return
        if not isinstance(event, events.StreamDataReceived):
            raise FrameError("unexpected data during enrolment")
        if self.stream_id is None and conn.peer_initiated(event.stream_id):
            self.stream_id = event.stream_id
        if event.stream_id != self.stream_id:
            raise FrameError("unexpected stream during enrolment")
        frames = self.decoder.feed(event.data)
        if event.end_stream:
            self.decoder.end()
        for frame in frames:
            if not self.challenged:
                self.challenged = True
                try:
                    nonce = tokens.decode_challenge(frame)
                except tokens.EnrolmentError as exc:
                    raise FrameError(str(exc)) from exc
                request = tokens.EnrolRequest.create(
                    self.node_key, self.token, self.node_name, nonce
                )
                conn.send_stream(event.stream_id, encode_frame(request.encode()), end_stream=True)
            elif not self.answer.done():
                self.answer.set_result(frame)
                conn.refuse(CloseCode.NO_ERROR, "enrolment finished")

    def closed(self, reason: str) -> None:
        if not self.answer.done():
            self.answer.set_exception(_NotAdmitted(reason))


# --- the UDP endpoint ----------------------------------------------------------------------------


class _Endpoint(asyncio.DatagramProtocol):
    """One UDP socket shared by every connection of a node, routed by connection ID."""

    def __init__(
        self, accept: Callable[[bytes, NetworkAddress], _Connection | None] | None
    ) -> None:
        self._accept = accept
        self._routes: dict[bytes, _Connection] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: NetworkAddress) -> None:
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CONNECTION_ID_LENGTH)
        except ValueError:
            return
        conn = self._routes.get(header.destination_cid)
        if conn is None:
            # Only a full-size Initial may open a connection (RFC 9000 section 14.1); nothing
            # else is answered, which keeps the socket quiet towards scanners.
            if (
                self._accept is None
                or header.packet_type != QuicPacketType.INITIAL
                or len(data) < 1200
            ):
                return
            conn = self._accept(header.destination_cid, addr)
            if conn is None:
                return
        conn.datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable) surface here; QUIC's own timers deal with the loss.
        log.debug("UDP error: %s", exc)

    def attach(self, conn: _Connection, *cids: bytes) -> None:
        assert self.transport is not None
        conn.connection_made(self.transport)
        for cid in cids:
            self._routes[cid] = conn

    def register(self, cid: bytes, conn: _Connection) -> None:
        self._routes[cid] = conn

    def unregister(self, cid: bytes) -> None:
        self._routes.pop(cid, None)

    def forget(self, conn: _Connection) -> None:
        for cid in [cid for cid, c in self._routes.items() if c is conn]:
            del self._routes[cid]


async def _resolve(host: str, port: int, family: int = 0) -> tuple[int, NetworkAddress]:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        # An address literal needs no lookup (asyncio would send it to a thread anyway).
        if ip.version == 4 and family in (0, socket.AF_INET):
            return socket.AF_INET, (str(ip), port)
        if ip.version == 6 and family in (0, socket.AF_INET6):
            return socket.AF_INET6, (str(ip), port, 0, 0)
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise ConnectionRefused(f"cannot resolve {host}: {exc}") from exc
    if not infos:
        raise ConnectionRefused(f"cannot resolve {host}")
    return infos[0][0], infos[0][4]


# --- the transport ------------------------------------------------------------------------------


class MeshTransport:
    """A node's QUIC endpoint: authenticated connections to peers, and enrolment if it admits.

    ``credentials`` are the node's key and certificates (:func:`identity.load_credentials`).
    ``is_revoked(name, serial)`` is asked on every handshake and every ``revocation_interval``.
    ``admitter``, given on nodes holding the root key, makes the node offer enrolment.
    """

    def __init__(
        self,
        credentials: identity.NodeCredentials,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        is_revoked: pki.RevocationCheck | None = None,
        on_message: MessageHandler | None = None,
        on_stream: StreamHandler | None = None,
        on_peer: PeerHandler | None = None,
        admitter: tokens.Admitter | None = None,
        config: TransportConfig | None = None,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.credentials = credentials
        self.name = credentials.node_name
        config = config or TransportConfig()
        if config.max_datagram_size is None:
            config = replace(config, max_datagram_size=_default_datagram_size(host))
        self.config = config
        self.instance = secrets.token_hex(16)
        self._host = host
        self._port = port
        self._is_revoked = is_revoked
        self._on_message = on_message
        self._on_stream = on_stream
        self._on_peer = on_peer
        self._admitter = admitter
        self._clock = clock
        self._endpoint: _Endpoint | None = None
        self._family = 0
        self._connections: set[_Connection] = set()
        self._peers: dict[str, _Connection] = {}
        self._dialing: dict[tuple[NetworkAddress, str | None], _Connection] = {}
        self._adopters: dict[str, list[asyncio.Future[PeerConnection]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._housekeeping: asyncio.Task[None] | None = None
        self._enrolments = 0
        self._stopping = False
        ca_pem = pki.certificate_pem(credentials.ca_certificate)
        common: dict[str, Any] = {
            "certificate": credentials.certificate,
            "private_key": credentials.node_key,
            "idle_timeout": self.config.idle_timeout,
            "max_datagram_frame_size": MAX_DATAGRAM_FRAME_SIZE,
            "max_datagram_size": self.config.max_datagram_size,
            "connection_id_length": CONNECTION_ID_LENGTH,
            "verify_mode": ssl.CERT_REQUIRED,
        }
        self._client_config = QuicConfiguration(
            is_client=True, alpn_protocols=[ALPN_MESH], cadata=ca_pem, **common
        )
        # Enrolment is offered only where it can succeed; elsewhere the joiner's handshake
        # fails on ALPN and it tries the next address of its token.
        server_alpn = [ALPN_MESH, ALPN_ENROL] if admitter is not None else [ALPN_MESH]
        # verify_mode has no effect on aioquic's server (see _ServerQuicConnection); it is set
        # so the configuration says what the code does.
        self._server_config = QuicConfiguration(
            is_client=False, alpn_protocols=server_alpn, **common
        )

    # lifecycle

    async def start(self) -> None:
        """Bind the UDP socket and start serving."""
        loop = asyncio.get_running_loop()
        transport, endpoint = await loop.create_datagram_endpoint(
            lambda: _Endpoint(self._accept), local_addr=(self._host, self._port)
        )
        self._endpoint = endpoint
        sock = transport.get_extra_info("socket")
        self._family = sock.family if sock is not None else socket.AF_INET
        self._housekeeping = loop.create_task(self._recheck_periodically())

    @property
    def bound_address(self) -> tuple[str, int]:
        """The ``(host, port)`` the socket is bound to (the port chosen when 0 was asked for)."""
        if self._endpoint is None or self._endpoint.transport is None:
            raise RuntimeError("the transport is not started")
        sockname = self._endpoint.transport.get_extra_info("sockname")
        return str(sockname[0]), int(sockname[1])

    async def stop(self) -> None:
        """Close every connection, wait briefly for the closes to go out, release the socket."""
        self._stopping = True
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        connections = list(self._connections)
        for conn in connections:
            conn.refuse(CloseCode.SHUTDOWN, "the node is shutting down")
        for waiters in self._adopters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(ConnectionRefused("the transport stopped"))
        self._adopters.clear()
        await _wait_closed(connections, 1.0)
        for conn in connections:
            conn.cancel_timer()
        tasks = list(self._tasks)
        if self._housekeeping is not None:
            tasks.append(self._housekeeping)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._endpoint is not None and self._endpoint.transport is not None:
            self._endpoint.transport.close()

    # peers

    async def connect(
        self,
        address: tuple[str, int],
        *,
        expected_peer: str | None = None,
    ) -> PeerConnection:
        """An authenticated connection to the node at ``address``, dialling if needed.

        With ``expected_peer``, an open connection to that node is reused, and a different node
        answering at ``address`` is refused. Raises :class:`ConnectionRefused` with the reason,
        at the latest after ``config.connect_timeout``.
        """
        if expected_peer is not None:
            existing = self._peers.get(expected_peer)
            if existing is not None and not existing.closed:
                return existing.facade
        if self._endpoint is None or self._stopping:
            raise ConnectionRefused("the transport is not running")
        host, port = address
        _, addr = await _resolve(host, port, self._family)
        for existing in self._peers.values():
            # Nodes dial from their listening socket, so an incoming connection's address is
            # the peer's listening address too.
            if (
                existing.address == addr
                and not existing.closed
                and expected_peer in (None, existing.peer_name)
            ):
                return existing.facade
        key = (addr, expected_peer)
        conn = self._dialing.get(key)
        if conn is None or conn.closed:
            dialled = conn = self._dial(addr, expected_peer)
            self._dialing[key] = conn

            def done(_: object) -> None:
                if self._dialing.get(key) is dialled:
                    del self._dialing[key]

            conn.ready.add_done_callback(done)
        try:
            return await asyncio.shield(conn.ready)
        except ConnectionRefused as exc:
            raise ConnectionRefused(f"connection to {host}:{port} failed: {exc}") from None

    def _dial(self, addr: NetworkAddress, expected_peer: str | None) -> _Connection:
        assert self._endpoint is not None
        quic = QuicConnection(configuration=self._client_config)
        conn = _Connection(
            quic,
            endpoint=self._endpoint,
            config=self.config,
            address=addr,
            outgoing=True,
            owner=self,
            expected_peer=expected_peer,
            deadline=self.config.connect_timeout,
        )
        self._endpoint.attach(conn, quic.host_cid)
        self._connections.add(conn)
        conn.connect(addr)
        return conn

    def _accept(self, original_cid: bytes, addr: NetworkAddress) -> _Connection | None:
        assert self._endpoint is not None
        if self._stopping:
            return None
        pending = sum(1 for c in self._connections if not c.registered and not c.closed)
        if pending >= self.config.max_pending_handshakes:
            log.warning("dropping a connection attempt from %s: too many handshakes", addr[0])
            return None
        quic = _ServerQuicConnection(
            configuration=self._server_config,
            original_destination_connection_id=original_cid,
        )
        conn = _Connection(
            quic,
            endpoint=self._endpoint,
            config=self.config,
            address=addr,
            outgoing=False,
            owner=self,
            deadline=self.config.connect_timeout,
        )
        self._endpoint.attach(conn, original_cid, quic.host_cid)
        self._connections.add(conn)
        return conn

    def peer(self, name: str) -> PeerConnection | None:
        """The open connection to ``name``, if any."""
        conn = self._peers.get(name)
        return conn.facade if conn is not None and not conn.closed else None

    def peers(self) -> list[str]:
        """Names of the peers with an open connection."""
        return sorted(name for name, conn in self._peers.items() if not conn.closed)

    def send(self, peer: str, channel: int, payload: bytes, *, reliable: bool = False) -> None:
        """Send a message to ``peer``'s ``on_message``.

        Small messages go as QUIC datagrams (unreliable, unordered: what SWIM wants); larger
        ones, or any with ``reliable=True``, go on the control stream (reliable, ordered).
        Raises :class:`PeerUnavailable` when there is no connection: dialling is the caller's
        decision.
        """
        self._require(peer).send(channel, payload, reliable=reliable)

    async def open_stream(self, peer: str, kind: str) -> FramedStream:
        """Open a framed stream to ``peer``, whose ``on_stream`` receives ``kind``."""
        return await self._require(peer).open_stream(kind)

    def close_peer(self, peer: str, reason: str = "closed by this node") -> bool:
        """Close the connection to ``peer``; False if there was none."""
        conn = self._peers.get(peer)
        if conn is None or conn.closed:
            return False
        conn.refuse(CloseCode.NO_ERROR, reason)
        return True

    def rtt(self, peer: str) -> float | None:
        """QUIC's smoothed RTT to ``peer`` in seconds, ``None`` if unknown or not connected."""
        conn = self._peers.get(peer)
        return None if conn is None or conn.closed else conn.facade.rtt()

    def recheck_revocations(self) -> list[str]:
        """Check every open connection again (revocation, expiry); close failing ones.

        Call it when a Node is deleted; it also runs every ``revocation_interval`` seconds.
        Returns the names of the peers that were disconnected.
        """
        dropped: list[str] = []
        for conn in list(self._connections):
            if conn.closed or conn.peer_certificate is None:
                continue
            try:
                self.verify_peer(conn.peer_certificate)
            except pki.CertificateError as exc:
                dropped.append(conn.peer_name)
                conn.refuse(CloseCode.REVOKED, f"certificate no longer accepted: {exc}")
        return dropped

    async def _recheck_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.revocation_interval)
            try:
                self.recheck_revocations()
            except Exception:
                log.exception("checking connections against revocations failed")

    def verify_peer(self, certificate: x509.Certificate) -> str:
        """Check a peer's certificate against the cluster CA and the revocation hook."""
        return pki.verify_node_certificate(
            certificate, self.credentials.ca_certificate, self._clock(), self._is_revoked
        )

    # called by connections

    def _register(self, conn: _Connection) -> None:
        """Make ``conn`` the connection to its peer, resolving duplicates the same on both ends."""
        name = conn.peer_name
        existing = self._peers.get(name)
        if existing is not None and (existing is conn or existing.closed):
            existing = None
        if (
            existing is not None
            and existing.peer_instance == conn.peer_instance
            and existing.outgoing != conn.outgoing
        ):
            # Both nodes dialled each other at once. Each end sees the same two connections, so
            # both keep the one dialled by the node with the smaller name.
            dialler_existing = self.name if existing.outgoing else name
            dialler_new = self.name if conn.outgoing else name
            if dialler_existing < dialler_new:
                if not conn.ready.done():
                    conn.ready.set_result(existing.facade)
                conn.refuse(CloseCode.SUPERSEDED, "a connection between these nodes exists")
                return
        # Otherwise the new connection wins: the peer restarted (new instance) or redialled.
        self._peers[name] = conn
        conn.mark_registered()
        if existing is not None:
            existing.refuse(CloseCode.SUPERSEDED, "replaced by a newer connection")
            self._notify(name, False)
        if not conn.ready.done():
            conn.ready.set_result(conn.facade)
        for waiter in self._adopters.pop(name, []):
            if not waiter.done():
                waiter.set_result(conn.facade)
        log.debug("connected to %s (%s)", name, "outgoing" if conn.outgoing else "incoming")
        self._notify(name, True)

    def _adopt_when_connected(self, name: str, waiter: asyncio.Future[PeerConnection]) -> None:
        """Resolve ``waiter`` with the connection to ``name``, now or when it registers."""
        existing = self._peers.get(name)
        if existing is not None and not existing.closed:
            waiter.set_result(existing.facade)
            return
        self._adopters.setdefault(name, []).append(waiter)

        def give_up() -> None:
            waiters = self._adopters.get(name, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._adopters.pop(name, None)
            if not waiter.done():
                waiter.set_exception(ConnectionRefused(f"node {name!r} kept no connection"))

        asyncio.get_running_loop().call_later(self.config.connect_timeout, give_up)

    def _connection_closed(self, conn: _Connection) -> None:
        if conn.session is not None and isinstance(conn.session, _EnrolServer):
            self._enrolments -= 1
        if self._peers.get(conn.peer_name) is conn:
            del self._peers[conn.peer_name]
            self._notify(conn.peer_name, False)
        self._connections.discard(conn)

    def _start_enrolment(self, conn: _Connection) -> None:
        if self._admitter is None:
            conn.refuse(CloseCode.PROTOCOL_ERROR, "this node does not admit new nodes")
            return
        if self._enrolments >= self.config.max_enrolments:
            conn.refuse(CloseCode.OVERLOADED, "too many enrolments in progress")
            return
        self._enrolments += 1
        conn.session = _EnrolServer(conn, self._admitter, self._clock)
        # The whole exchange gets one deadline; the connection never registers as a peer.
        conn.set_deadline(self.config.enrol_timeout)

    def _deliver(self, peer: str, channel: int, payload: bytes) -> None:
        if self._on_message is None:
            return
        try:
            self._on_message(peer, channel, payload)
        except Exception:
            log.exception("the message handler failed on a message from %s", peer)

    def _dispatch_stream(self, stream: FramedStream) -> None:
        if self._on_stream is None:
            stream.reset()
            return
        task = asyncio.get_running_loop().create_task(self._run_stream(stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_stream(self, stream: FramedStream) -> None:
        assert self._on_stream is not None
        try:
            await self._on_stream(stream.peer, stream.kind, stream)
        except StreamClosed as exc:
            log.debug("stream %r from %s closed: %s", stream.kind, stream.peer, exc)
            stream.reset()
        except Exception:
            log.exception(
                "the stream handler failed on a %r stream from %s", stream.kind, stream.peer
            )
            # Reset rather than finish: the opener must not take a cut-short answer as complete.
            stream.reset()
        else:
            stream._finish_now()
            stream._stop_reading()

    def _notify(self, name: str, connected: bool) -> None:
        if self._on_peer is None:
            return
        try:
            self._on_peer(name, connected)
        except Exception:
            log.exception("the peer handler failed for %s", name)

    def _require(self, peer: str) -> PeerConnection:
        conn = self._peers.get(peer)
        if conn is None or conn.closed:
            raise PeerUnavailable(f"there is no connection to node {peer!r}")
        return conn.facade


# --- enrolment: the joiner's entry points ---------------------------------------------------


@dataclass(frozen=True)
class Enrolment:
    """What a successful enrolment gives the joining node."""

    node_key: Ed25519PrivateKey
    certificate: x509.Certificate
    ca_certificate: x509.Certificate
    claims: tokens.TokenClaims
    errors: tuple[str, ...] = field(default=())
    """Addresses of the token that were tried first and failed, with why."""


async def enrol(
    token: str,
    node_name: str,
    *,
    node_key: Ed25519PrivateKey | None = None,
    attempt_timeout: float = 10.0,
    clock: Callable[[], datetime] = _utcnow,
    max_datagram_size: int = SAFE_DATAGRAM_SIZE,
) -> Enrolment:
    """Spend ``token`` for a certificate naming ``node_name``; nothing is written to disk.

    The token is checked locally first (shape, signature, expiry). Its addresses are tried in
    order, each for at most ``attempt_timeout`` seconds: one that is unreachable, does not
    admit, or cannot prove membership of the token's cluster is skipped; a refusal by a genuine
    admitting node ends the attempt with :class:`tokens.EnrolmentError` carrying its reason.
    The returned certificates are checked against the token's root key.
    """
    claims = tokens.verify_token(token, clock())
    identity.check_name(node_name, "node name")
    node_key = node_key or Ed25519PrivateKey.generate()
    errors: list[str] = []
    for host, port in claims.addresses:
        where = tokens.format_address(host, port)
        try:
            answer = await _enrol_at(
                host,
                port,
                claims,
                token,
                node_name,
                node_key,
                attempt_timeout,
                clock,
                max_datagram_size,
            )
        except (_NotAdmitted, ConnectionRefused, OSError) as exc:
            errors.append(f"{where}: {exc}")
            log.info("could not enrol at %s: %s", where, exc)
            continue
        grant = tokens.decode_answer(answer)
        now = clock()
        try:
            pki.verify_ca_certificate(grant.ca_certificate, now, claims.root_key)
            name = pki.verify_node_certificate(grant.certificate, grant.ca_certificate, now)
        except pki.CertificateError as exc:
            raise tokens.EnrolmentError(
                f"the admitting node returned a bad certificate: {exc}"
            ) from exc
        if name != node_name or pki.public_key_b64(
            grant.certificate.public_key()  # type: ignore[arg-type]
        ) != pki.public_key_b64(node_key.public_key()):
            raise tokens.EnrolmentError(
                "the admitting node returned a certificate for another node"
            )
        return Enrolment(
            node_key=node_key,
            certificate=grant.certificate,
            ca_certificate=grant.ca_certificate,
            claims=claims,
            errors=tuple(errors),
        )
    raise tokens.EnrolmentError(
        "no node of the join token could admit this node (" + "; ".join(errors) + ")"
    )


async def _enrol_at(
    host: str,
    port: int,
    claims: tokens.TokenClaims,
    token: str,
    node_name: str,
    node_key: Ed25519PrivateKey,
    attempt_timeout: float,
    clock: Callable[[], datetime],
    max_datagram_size: int,
) -> bytes:
    family, addr = await _resolve(host, port)
    loop = asyncio.get_running_loop()
    local = ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)
    transport, endpoint = await loop.create_datagram_endpoint(
        lambda: _Endpoint(None), local_addr=local
    )
    client = _EnrolClient(claims, token, node_name, node_key, clock)
    # No certificate and no CA yet: the listener's certificate is checked against the token's
    # root key once the handshake completes, before the token is sent.
    configuration = QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN_ENROL],
        verify_mode=ssl.CERT_NONE,
        max_datagram_size=max_datagram_size,
        connection_id_length=CONNECTION_ID_LENGTH,
        idle_timeout=attempt_timeout,
    )
    quic = QuicConnection(configuration=configuration)
    conn = _Connection(
        quic,
        endpoint=endpoint,
        config=TransportConfig(max_datagram_size=max_datagram_size),
        address=addr,
        outgoing=True,
        enrol_client=client,
        # The connection's deadline bounds the whole attempt: when it fires, the connection
        # closes and the answer fails with the reason.
        deadline=attempt_timeout,
    )
    endpoint.attach(conn, quic.host_cid)
    try:
        conn.connect(addr)
        return await asyncio.shield(client.answer)
    finally:
        conn.refuse(CloseCode.NO_ERROR, "enrolment finished")
        await _wait_closed([conn], 1.0)
        conn.cancel_timer()
        transport.close()


async def join_data_dir(
    data_dir: Path,
    token: str,
    node_name: str,
    *,
    attempt_timeout: float = 10.0,
    clock: Callable[[], datetime] = _utcnow,
) -> identity.NodeIdentity:
    """``pollen node --join TOKEN`` on an empty data directory: enrol, then write it.

    Refuses a directory that already holds a node before dialling anyone; writes nothing unless
    the enrolment succeeded and its certificates check out.
    """
    if (data_dir / identity.NODE_FILE).exists():
        raise identity.IdentityError(f"{data_dir} already holds a node; use another --data-dir")
    result = await enrol(token, node_name, attempt_timeout=attempt_timeout, clock=clock)
    return identity.init_joined_data_dir(
        data_dir,
        node_key=result.node_key,
        certificate=result.certificate,
        ca_certificate=result.ca_certificate,
        now=clock(),
    )
