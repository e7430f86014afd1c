"""Bulk data between two nodes: mutually authenticated TLS over TCP, beside the QUIC mesh.

aioquic moves about 15 to 50 MB/s on one stream (SPEC section 9): every packet is built,
encrypted and acknowledged in Python. Python's :mod:`ssl` on a TCP socket, driven from a
worker thread, leaves all of that to OpenSSL and the kernel and moves well over 100 MB/s on
loopback, which is what an artifact fetch needs (SPEC section 7, ADR 0017). This module is
that side path; the QUIC stream stays the way to negotiate it and the fallback (relayed
fetches, a port a firewall blocks).

**Authentication is the mesh's** (ADR 0004), with the same certificates:

* both ends present their node certificate; TLS 1.3 only, no session tickets (every handshake
  carries certificates), no resumption;
* OpenSSL checks the peer's chain against the cluster CA inside the handshake at both ends
  (unlike aioquic's server, :mod:`ssl` does verify client chains), so the dialler never
  sends its certificate to a listener outside the cluster;
* then, before one byte of application data is read or written, both ends run
  :func:`pki.verify_node_certificate` (cluster, validity, revocation) through the mesh
  transport's :meth:`~pollen.mesh.transport.MeshTransport.verify_peer`, on the event loop;
  the dialler also checks that the listener is the node it meant to reach. A refused peer's
  socket is closed without reading what it sent.

Connections carry ``u32 big-endian length | payload`` frames (as mesh streams do) and raw
bytes whose length a frame announced; what they mean is the user's business (the artifact
fetch, :mod:`pollen.mesh.fetch`). Sockets are blocking with timeouts and used from worker
threads of a dedicated pool: a read or a write of megabytes releases the GIL for its whole
length, and the event loop stays free for membership and gossip.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import socket
import ssl
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pollen.mesh import identity, pki

__all__ = [
    "BulkConnection",
    "BulkError",
    "BulkServer",
    "BulkTls",
    "connect",
]

log = logging.getLogger(__name__)

#: Seconds for the TCP connect plus the TLS handshake.
HANDSHAKE_TIMEOUT: Final = 10.0
#: Largest frame (a request or an answer header; bulk bytes are not framed).
MAX_FRAME_BYTES: Final = 64 * 1024
#: Connections served at once; further ones are closed before their handshake.
MAX_CONNECTIONS: Final = 64
#: Seconds between checks of a served connection's peer against revocation and expiry.
RECHECK_SECONDS: Final = 10.0
_LENGTH: Final = struct.Struct(">I")


class BulkError(Exception):
    """A bulk connection failed or was refused; one sentence."""


def _pem_key(key: object) -> bytes:
    assert hasattr(key, "private_bytes")
    data: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return data


class BulkTls:
    """TLS contexts made from a node's credentials, and the check of a peer's certificate.

    ``verify(certificate)`` returns the peer's node name or raises
    :class:`~pollen.mesh.pki.CertificateError`; the mesh transport's ``verify_peer`` is the
    one to pass, so that the side path refuses exactly whom the mesh refuses.
    """

    def __init__(
        self,
        credentials: identity.NodeCredentials,
        verify: Callable[[x509.Certificate], str],
    ) -> None:
        self.name = credentials.node_name
        self.verify = verify
        ca = pki.certificate_pem(credentials.ca_certificate).decode()
        self.server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        # ssl loads keys only from files: a private directory, deleted once they are loaded.
        with tempfile.TemporaryDirectory(prefix="pollen-tls-") as directory:
            key_file = Path(directory) / "node.key"
            cert_file = Path(directory) / "node.crt"
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(_pem_key(credentials.node_key))
            cert_file.write_bytes(pki.certificate_pem(credentials.certificate))
            for context in (self.server_context, self.client_context):
                context.minimum_version = ssl.TLSVersion.TLSv1_3
                context.load_cert_chain(cert_file, key_file)
                context.load_verify_locations(cadata=ca)
                context.verify_mode = ssl.CERT_REQUIRED
        # Names are checked by verify_node_certificate (a node URI, not a host name).
        self.client_context.check_hostname = False
        # No tickets: a resumed session carries no certificate to check (as on the mesh).
        self.server_context.num_tickets = 0
        self.server_context.options |= ssl.OP_NO_TICKET

    def peer_name(self, sock: ssl.SSLSocket) -> str:
        """The verified node name of the peer on ``sock``; raises :class:`BulkError`."""
        der = sock.getpeercert(binary_form=True)
        if not der:
            raise BulkError("the peer presented no certificate")
        try:
            return self.verify(x509.load_der_x509_certificate(der))
        except (pki.CertificateError, ValueError) as exc:
            raise BulkError(f"the peer's certificate is refused: {exc}") from None


class BulkConnection:
    """One authenticated connection; blocking, for use from one worker thread at a time.

    ``peer`` is the authenticated name of the other end. Every read and write gives up after
    ``timeout`` seconds of no progress, raising :class:`BulkError`.
    """

    def __init__(self, sock: ssl.SSLSocket, peer: str, timeout: float) -> None:
        self._sock = sock
        self.peer = peer
        sock.settimeout(timeout)
        self._closed = False
        self._buffer = bytearray()
        #: Raises :class:`BulkError` when the peer is no longer accepted (revoked, expired);
        #: the server calls it between requests. Cheap when called often.
        self.recheck: Callable[[], None] = lambda: None

    def buffer(self, size: int) -> memoryview:
        """A scratch buffer of ``size`` bytes, the same memory every time: reused, it costs
        no page faults (a fresh one of megabytes costs more than copying into it)."""
        if len(self._buffer) < size:
            self._buffer = bytearray(size)
        return memoryview(self._buffer)[:size]

    def write_frame(self, payload: bytes) -> None:
        """Send one frame."""
        self.send(_LENGTH.pack(len(payload)) + payload)

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send raw bytes."""
        try:
            self._sock.sendall(data)
        except (OSError, ValueError) as exc:
            raise BulkError(f"the connection to {self.peer} failed while sending: {exc}") from None

    def read_frame(self, limit: int = MAX_FRAME_BYTES) -> bytes | None:
        """The next frame, or None if the peer closed the connection between frames."""
        head = bytearray(_LENGTH.size)
        if not self.recv_into(memoryview(head), eof_ok=True):
            return None
        (length,) = _LENGTH.unpack(head)
        if length > limit:
            raise BulkError(f"{self.peer} sent a frame of {length} bytes, over {limit}")
        payload = bytearray(length)
        self.recv_into(memoryview(payload))
        return bytes(payload)

    def recv_into(self, view: memoryview, *, eof_ok: bool = False) -> bool:
        """Fill ``view`` exactly. False if the peer closed before its first byte and
        ``eof_ok``; :class:`BulkError` if it closed or stalled part way."""
        got = 0
        while got < len(view):
            try:
                count = self._sock.recv_into(view[got:])
            except (OSError, ValueError) as exc:
                raise BulkError(
                    f"the connection to {self.peer} failed after {got} of {len(view)} bytes: "
                    f"{exc or type(exc).__name__}"
                ) from None
            if count == 0:
                if got == 0 and eof_ok:
                    return False
                raise BulkError(
                    f"{self.peer} closed the connection after {got} of {len(view)} bytes"
                )
            got += count
        return True

    def close(self) -> None:
        """Close at once; a thread blocked on this connection wakes with :class:`BulkError`.

        Safe to call from any thread, more than once."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            # The plain socket's shutdown, not SSLSocket's (which would tear down the TLS
            # object under a thread still reading): it wakes that thread, which then fails.
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._sock.close()


ConnectionHandler = Callable[[BulkConnection], None]
"""Serves one authenticated connection, blocking, in a worker thread; returning closes it."""


class BulkServer:
    """Accepts bulk connections on a TCP port and hands authenticated ones to ``handler``.

    The handshake runs in a worker thread; the certificate check runs on the event loop
    before the handler reads anything.
    """

    def __init__(
        self,
        tls: BulkTls,
        handler: ConnectionHandler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        idle_timeout: float = 30.0,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._tls = tls
        self._handler = handler
        self._host = host
        self._requested_port = port
        self._idle_timeout = idle_timeout
        self._max_connections = max_connections
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._open: set[BulkConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_connections, thread_name_prefix="bulk-serve"
        )
        self.port = 0
        #: Connections refused: a bad certificate, a failed handshake, too many at once.
        self.refused = 0

    async def start(self) -> int:
        """Listen; returns the port."""
        infos = await asyncio.get_running_loop().getaddrinfo(
            self._host, self._requested_port, type=socket.SOCK_STREAM
        )
        family, _, _, _, address = infos[0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._accepting = asyncio.get_running_loop().create_task(self._accept())
        return self.port

    async def close(self) -> None:
        """Stop listening and cut every connection."""
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
            self._accepting = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for conn in list(self._open):
            conn.close()
        for task in list(self._tasks):
            task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            try:
                sock, _ = await loop.sock_accept(self._listener)
            except OSError as exc:
                log.warning("bulk server: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            if len(self._tasks) >= self._max_connections:
                self.refused += 1
                sock.close()
                continue
            task = loop.create_task(self._serve(sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _handshake(self, sock: socket.socket) -> ssl.SSLSocket:
        sock.setblocking(True)
        sock.settimeout(HANDSHAKE_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._tls.server_context.wrap_socket(sock, server_side=True)

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            tls_sock = await loop.run_in_executor(self._pool, self._handshake, sock)
        except (OSError, ssl.SSLError) as exc:
            self.refused += 1
            log.info("bulk server: handshake failed: %s", exc)
            sock.close()
            return
        try:
            peer = self._tls.peer_name(tls_sock)
        except BulkError as exc:
            self.refused += 1
            log.warning("bulk server: %s", exc)
            tls_sock.close()
            return
        conn = BulkConnection(tls_sock, peer, self._idle_timeout)
        conn.recheck = self._rechecker(tls_sock, loop)
        self._open.add(conn)
        try:
            await loop.run_in_executor(self._pool, self._run, conn)
        finally:
            self._open.discard(conn)
            conn.close()

    def _rechecker(
        self, tls_sock: ssl.SSLSocket, loop: asyncio.AbstractEventLoop
    ) -> Callable[[], None]:
        """A check of the peer's certificate again, at most every :data:`RECHECK_SECONDS`,
        on the event loop (the revocation hook reads the document), for the worker thread
        serving the connection: a node revoked while connected is cut off, as on the mesh."""
        checked = [time.monotonic()]

        async def verify() -> str:
            return self._tls.peer_name(tls_sock)

        def recheck() -> None:
            if time.monotonic() - checked[0] < RECHECK_SECONDS:
                return
            future = asyncio.run_coroutine_threadsafe(verify(), loop)
            try:
                future.result(timeout=HANDSHAKE_TIMEOUT)
            except concurrent.futures.TimeoutError:
                future.cancel()
                raise BulkError("the check of the peer's certificate took too long") from None
            checked[0] = time.monotonic()

        return recheck

    def _run(self, conn: BulkConnection) -> None:
        try:
            self._handler(conn)
        except BulkError as exc:
            log.info("bulk connection from %s: %s", conn.peer, exc)
        except Exception:
            log.exception("bulk connection from %s failed", conn.peer)


def _dial_tls(tls: BulkTls, host: str, port: int) -> ssl.SSLSocket:
    try:
        sock = socket.create_connection((host, port), timeout=HANDSHAKE_TIMEOUT)
    except OSError as exc:
        raise BulkError(f"cannot connect to {host} port {port}: {exc}") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return tls.client_context.wrap_socket(sock)
    except (OSError, ssl.SSLError) as exc:
        sock.close()
        raise BulkError(f"the TLS handshake with {host} port {port} failed: {exc}") from None


def _authenticated(
    tls: BulkTls, tls_sock: ssl.SSLSocket, peer: str, idle_timeout: float
) -> BulkConnection:
    try:
        name = tls.peer_name(tls_sock)
        if name != peer:
            raise BulkError(f"the bulk port answered as {name}, not {peer}")
    except BaseException:
        tls_sock.close()
        raise
    return BulkConnection(tls_sock, name, idle_timeout)


async def connect(
    tls: BulkTls,
    host: str,
    port: int,
    peer: str,
    *,
    executor: concurrent.futures.Executor,
    idle_timeout: float = 30.0,
) -> BulkConnection:
    """Connect to ``peer``'s bulk port: the handshake in ``executor``, the certificate check
    on the event loop (the revocation hook reads the document); raises :class:`BulkError`."""
    loop = asyncio.get_running_loop()
    tls_sock = await loop.run_in_executor(executor, _dial_tls, tls, host, port)
    return _authenticated(tls, tls_sock, peer, idle_timeout)
