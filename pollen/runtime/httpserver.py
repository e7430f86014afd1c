"""A small HTTP/1.1 server that turns requests into ``HttpRequest`` and answers ``HttpResponse``.

This is the front end of ``pollen run`` and of the node's gateway: one job, serving the
runtime's request and response types over TCP. It is an ``asyncio.Protocol`` around the
``httptools`` parser (llhttp, the parser of Node.js) rather than aiohttp's server: a request
to a workload needs no routing, middleware, cookies or streaming, and aiohttp's per-request
machinery (a task, a ``BaseRequest``, a ``StreamResponse``, their header multidicts) cost
more than the parsing itself (ADR 0010).

What it does:

- keep-alive (HTTP/1.1 by default, HTTP/1.0 with ``Connection: keep-alive``) and pipelining,
  answered in order; idle connections are closed after ``keep_alive_timeout``;
- bodies by ``Content-Length`` or chunked, capped at ``max_body_bytes`` (413, connection
  closed); ``Expect: 100-continue`` is answered before the body is read;
- request line and headers capped (431); anything the parser refuses is a 400 and the
  connection is closed, while the server goes on serving everyone else;
- ``HEAD``: the handler's headers and ``Content-Length``, no body;
- a handler may answer at once (an ``HttpResponse``), or with an ``asyncio.Future`` (what
  ``HttpExecutor.dispatch`` returns: no task per request) or a coroutine; an exception
  becomes a 500 and is logged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import httptools

from pollen.runtime.wagi import HttpRequest, HttpResponse

log = logging.getLogger(__name__)

Handler = Callable[[HttpRequest], "HttpResponse | Awaitable[HttpResponse]"]

_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
# Framed by the server itself; a handler's own values would contradict the framing.
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "date"})
#: Requests parsed ahead of the one being served on a connection before reading pauses.
MAX_PIPELINED = 8


@dataclass(frozen=True)
class ServerLimits:
    """What one request or connection may use."""

    #: Largest request body; more is answered 413 and the connection closed.
    max_body_bytes: int = 1024 * 1024
    #: Largest request target (URL).
    max_url_bytes: int = 8 * 1024
    #: Largest request head: request line and every header together.
    max_head_bytes: int = 64 * 1024
    #: Most header fields in one request.
    max_headers: int = 100
    #: Seconds an idle keep-alive connection (or one that sends a request too slowly) stays.
    keep_alive_timeout: float = 75.0


class _Refused(Exception):
    """Raised from a parser callback to stop parsing with ``status``."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Date:
    """The ``Date`` header, formatted at most once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = email.utils.formatdate(now, usegmt=True).encode()
        return self._value


_date = _Date()


def _header_line(name: str, value: str) -> bytes | None:
    """``Name: value\\r\\n``; None for a field that could split the response."""
    line = f"{name}: {value}\r\n"
    if "\n" in name or "\r" in name or ":" in name or "\n" in value or "\r" in value:
        return None
    return line.encode("latin-1", "replace")


def render(
    response: HttpResponse, *, keep_alive: bool, head: bool = False, http10: bool = False
) -> bytes:
    """The bytes of ``response`` on the wire, framed by ``Content-Length``."""
    status = response.status
    parts = [
        b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown")),
        b"Date: %s\r\n" % _date(),
    ]
    for name, value in response.headers:
        if name.lower() in _FRAMING:
            continue
        line = _header_line(name, value)
        if line is not None:
            parts.append(line)
    body = response.body
    if status >= 200 and status not in (204, 304):
        parts.append(b"Content-Length: %d\r\n" % len(body))
    else:
        body = b""
    if not keep_alive:
        parts.append(b"Connection: close\r\n")
    elif http10:
        parts.append(b"Connection: keep-alive\r\n")
    parts.append(b"\r\n")
    if not head:
        parts.append(body)
    return b"".join(parts)


def _plain(status: int, text: str) -> HttpResponse:
    return HttpResponse(
        status=status,
        headers=(("Content-Type", "text/plain; charset=utf-8"),),
        body=f"{text}\n".encode(),
    )


@dataclass
class _Pending:
    """One request on a connection, in the order it came, with its answer once there."""

    request: HttpRequest | None
    keep_alive: bool
    head: bool
    http10: bool
    response: HttpResponse | None = None


class _Connection(asyncio.Protocol):
    """One client connection: parse, hand to the handler, write answers in order."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._limits = server.limits
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._queue: collections.deque[_Pending] = collections.deque()
        self._closing = False  # no more requests will be read
        self._eof = False  # the client half-closed its side
        self._paused_reading = False
        self._paused_writing = False
        self._remote = ""
        self.last_active = time.monotonic()
        self._message_started: float | None = None
        self._reset()

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._remote = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._closing = True
        self._queue.clear()
        self._server.connections.discard(self)
        if self._server.closing:
            self._server.note_idle()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self.last_active = time.monotonic()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An Upgrade (or CONNECT) request was answered like any other; what follows is
            # another protocol, which nothing here speaks: read no further.
            self._stop_reading()
        except (httptools.HttpParserCallbackError, httptools.HttpParserError) as exc:
            refused = exc.__context__ if isinstance(exc.__context__, _Refused) else None
            status = refused.status if refused is not None else 400
            self._fail(status)

    def eof_received(self) -> bool:
        # The client sent all it will send (a half-close): answer what was read, then close.
        self._stop_reading()
        self._eof = True
        return bool(self._queue)  # True keeps the transport open for the answers

    def pause_writing(self) -> None:
        # The client does not read its answers: stop reading its requests until it does.
        self._paused_writing = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._paused_writing = False
        self._update_reading()

    # --- parser callbacks ------------------------------------------------------------------

    def _reset(self) -> None:
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._head_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0

    def on_message_begin(self) -> None:
        self._reset()
        # A request must arrive whole within the timeout: trickling bytes does not renew it.
        self._message_started = time.monotonic()

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limits.max_url_bytes:
            raise _Refused(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if (
            len(self._headers) >= self._limits.max_headers
            or self._head_bytes > self._limits.max_head_bytes
        ):
            raise _Refused(431)
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        declared = None
        expects = False
        for name, value in self._headers:
            lowered = name.lower()
            if lowered == "content-length":
                declared = value
            elif lowered == "expect" and value.lower() == "100-continue":
                expects = True
        if (
            declared is not None
            and declared.isdigit()
            and int(declared) > self._limits.max_body_bytes
        ):
            raise _Refused(413)
        if expects and self._transport is not None and not self._queue:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._limits.max_body_bytes:
            raise _Refused(413)
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._message_started = None
        parser = self._parser
        method = parser.get_method().decode("latin-1")
        version = parser.get_http_version()
        keep_alive = bool(parser.should_keep_alive()) and not self._server.closing
        try:
            url = httptools.parse_url(self._url)
        except httptools.HttpParserInvalidURLError:
            raise _Refused(400) from None
        host = self._server.host
        for name, value in self._headers:
            if name.lower() == "host":
                host = value.rsplit(":", 1)[0] if not value.endswith("]") else value
                break
        request = HttpRequest(
            method=method,
            path=url.path.decode("latin-1") if url.path else "/",
            query=url.query.decode("latin-1") if url.query else "",
            headers=tuple(self._headers),
            body=b"".join(self._body),
            server_name=host or self._server.host,
            server_port=self._server.port,
            remote_addr=self._remote,
            protocol=f"HTTP/{version}",
        )
        self._reset()
        pending = _Pending(request, keep_alive, method == "HEAD", version == "1.0")
        self._queue.append(pending)
        if not keep_alive:
            self._stop_reading()
        elif len(self._queue) > MAX_PIPELINED:
            self._update_reading()
        self._dispatch(pending)

    # --- answers ------------------------------------------------------------------------------

    def _dispatch(self, pending: _Pending) -> None:
        assert pending.request is not None
        try:
            result = self._server.handler(pending.request)
            if isinstance(result, HttpResponse):
                self._answer(pending, result)
                return
            future = result if isinstance(result, asyncio.Future) else asyncio.ensure_future(result)
        except Exception:
            log.exception("the HTTP handler failed")
            self._answer(pending, _plain(500, "Internal Server Error"))
            return
        future.add_done_callback(lambda done: self._completed(pending, done))

    def _completed(self, pending: _Pending, future: asyncio.Future[HttpResponse]) -> None:
        if future.cancelled():
            response = _plain(503, "Service Unavailable")
        elif future.exception() is not None:
            log.error("the HTTP handler failed", exc_info=future.exception())
            response = _plain(500, "Internal Server Error")
        else:
            response = future.result()
        self._answer(pending, response)

    def _answer(self, pending: _Pending, response: HttpResponse) -> None:
        pending.response = response
        pending.request = None  # the body can go now
        self._flush()

    def _flush(self) -> None:
        """Write every answer that is ready, in request order."""
        queue = self._queue
        transport = self._transport
        while queue and queue[0].response is not None and transport is not None:
            pending = queue.popleft()
            assert pending.response is not None
            transport.write(
                render(
                    pending.response,
                    keep_alive=pending.keep_alive,
                    head=pending.head,
                    http10=pending.http10,
                )
            )
            if not pending.keep_alive:
                queue.clear()
                transport.close()
                return
        self.last_active = time.monotonic()
        if self._eof and not queue and transport is not None:
            transport.close()
            return
        self._update_reading()
        if self._server.closing and not queue:
            self._server.note_idle()

    def _fail(self, status: int) -> None:
        """Answer ``status`` after the requests already read, then close."""
        self._stop_reading()
        reason = _REASONS.get(status, b"Bad Request").decode()
        self._queue.append(_Pending(None, False, False, False, _plain(status, reason)))
        self._flush()

    def _stop_reading(self) -> None:
        self._closing = True
        self._update_reading()

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None:
            return
        pause = self._closing or self._paused_writing or len(self._queue) > MAX_PIPELINED
        if pause != self._paused_reading:
            self._paused_reading = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def idle_since(self) -> float | None:
        """When the connection last did anything, if it waits on the client (not on us)."""
        if self._queue or self._transport is None:
            return None
        if self._message_started is not None:
            return self._message_started
        return self.last_active

    def close(self) -> None:
        """Close now (the server is stopping or the connection sat idle too long)."""
        if self._transport is not None:
            self._transport.close()


class HttpServer:
    """Serve ``handler`` over HTTP/1.1 on one TCP address.

    ``await server.start(host, port)`` returns the bound port (useful with port 0);
    ``await server.close()`` stops accepting, lets answers in flight go out for up to
    ``grace`` seconds, then closes every connection.
    """

    def __init__(self, handler: Handler, *, limits: ServerLimits | None = None) -> None:
        self.handler = handler
        self.limits = limits or ServerLimits()
        self.host = "127.0.0.1"
        self.port = 0
        self.closing = False
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._drained: asyncio.Event | None = None  # made by close()

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, *, reuse_port: bool = False
    ) -> int:
        """Listen on ``host:port``; returns the port bound.

        ``reuse_port`` sets ``SO_REUSEPORT``: several processes then listen on the same port,
        each with its own accept queue, and the kernel spreads new connections over them
        (``pollen run --workers``).
        """
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, reuse_port=reuse_port or None
        )
        sockets = self._server.sockets
        self.host = host
        self.port = int(sockets[0].getsockname()[1]) if sockets else port
        self._sweeper = asyncio.create_task(self._sweep(), name="http-idle-sweeper")
        return self.port

    async def _sweep(self) -> None:
        # One timer for all connections, rather than one per request.
        timeout = self.limits.keep_alive_timeout
        while True:
            await asyncio.sleep(min(1.0, timeout / 2))
            cutoff = time.monotonic() - timeout
            for connection in list(self.connections):
                since = connection.idle_since()
                if since is not None and since < cutoff:
                    connection.close()

    def note_idle(self) -> None:
        """A connection has no answer left to write: while closing, maybe all are done."""
        if self._drained is not None and all(
            connection.idle_since() is not None for connection in self.connections
        ):
            self._drained.set()

    async def close(self, grace: float = 5.0) -> None:
        """Stop listening, give answers in flight ``grace`` seconds, close everything."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        self._drained = asyncio.Event()
        self.note_idle()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), grace)
        for connection in list(self.connections):
            connection.close()
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> HttpServer:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
