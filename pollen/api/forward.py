"""Gateway forwarding: one HTTP request for a workload, carried to another node over the mesh.

The gateway of a node without a Ready instance of a workload hands the request to a node that
has one, on a mesh stream of kind :data:`GATEWAY_STREAM` (direct, or through a relay when there
is no direct route: :meth:`~pollen.mesh.service.MeshService.open_stream` decides). ``pollen.call``
to a workload that does not run here takes the same way. This module is the protocol and both of
its ends; which node to ask is the gateway's business (:mod:`pollen.api.gateway`).

On the stream, every frame length-prefixed by the transport (ADR 0014)::

    origin -> target   request head: {"workload", "method", "path", "query", "headers",
                                      "remote", "host", "port", "scheme", "protocol", "depth"}
    origin -> target   the body in frames of at most 1 MiB, then the end of its side
    target -> origin   answer head: {"status", "headers", "error"}  or  {"refused": "..."}
    target -> origin   the body in frames (none after a refusal), then the end of the stream

``path`` is the path below the workload's route (what becomes ``PATH_INFO``), ``depth`` counts
nested ``pollen.call``s (0 for a request from outside). A target serves a forwarded request
only from its own instances and never forwards it again, so requests cannot loop; it answers
``refused`` when it has no Ready instance (the origin's view of the document was behind) or its
instance stopped taking requests before this one ran: the request did not run, and the origin
may try the next node. ``error`` is set when the runtime wrote the answer because the workload
failed (as :attr:`HttpResponse.error`), so that ``pollen.call`` keeps its error codes across
nodes.

Every frame from a peer is hostile until checked (SPEC section 8): heads are size-capped and
decoded strictly (exact field sets, types, ranges, no control characters where HTTP forbids
them), bodies are capped, and a malformed request resets the stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from pollen.api.proxy import (
    FrameChannel,
    ProxyError,
    decode_head,
    decode_headers,
    read_body,
    write_body,
)
from pollen.mesh.transport import TransportError
from pollen.runtime import abi
from pollen.runtime.wagi import HttpRequest, HttpResponse

__all__ = [
    "GATEWAY_STREAM",
    "ForwardError",
    "ForwardFailed",
    "ForwardedAnswer",
    "ForwardedRequest",
    "LocalServe",
    "exchange",
    "serve_stream",
]

log = logging.getLogger(__name__)

#: Stream kind of a forwarded gateway request (or workload call).
GATEWAY_STREAM: Final = "gateway"
#: Largest head frame: the gateway's own request head (URL and headers) is capped at 72 KiB,
#: and JSON escaping can double that.
MAX_HEAD_BYTES: Final = 256 * 1024
#: Largest forwarded request body: what ``pollen.call`` may send (the gateway sends less).
MAX_REQUEST_BODY: Final = abi.MAX_REQUEST_BYTES
#: Largest forwarded response body.
MAX_RESPONSE_BODY: Final = 64 * 1024 * 1024
MAX_HEADERS: Final = 256
MAX_HEADER_VALUE: Final = 64 * 1024
#: Seconds a target waits for the request head, then for the whole body.
HEAD_TIMEOUT: Final = 10.0
BODY_TIMEOUT: Final = 30.0

_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}\Z")  # an HTTP token
_WORKLOAD_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
# A path or query as the HTTP parser hands them over: no controls, no spaces. Lone surrogates
# are refused everywhere: they cannot be encoded (as JSON, or as anything else).
_PATH_RE = re.compile(r"^/[^\x00-\x20\x7f\ud800-\udfff]{0,16383}\Z")
_QUERY_RE = re.compile(r"^[^\x00-\x20\x7f\ud800-\udfff]{0,16384}\Z")
_TEXT_RE = re.compile(r"^[^\x00-\x1f\x7f\ud800-\udfff]{0,1024}\Z")  # host, remote address
_PROTOCOL_RE = re.compile(r"^HTTP/[0-9]\.[0-9]\Z")
# A header value may hold anything but the characters that would end or split a header line.
_BAD_VALUE_CHARS = re.compile(r"[\r\n\x00\ud800-\udfff]")
_REQUEST_FIELDS = frozenset(
    {
        "workload",
        "method",
        "path",
        "query",
        "headers",
        "remote",
        "host",
        "port",
        "scheme",
        "protocol",
        "depth",
    }
)
_ANSWER_FIELDS = frozenset({"status", "headers", "error"})
MAX_ERROR_CHARS: Final = 1024

Headers = tuple[tuple[str, str], ...]


class ForwardError(Exception):
    """A malformed head or body from the other end; one sentence."""


class ForwardFailed(Exception):
    """A forwarded request got no complete answer. ``sent`` tells whether the target may have
    received it whole (and so may have run it): only then is retrying elsewhere not safe for
    a request that is not idempotent."""

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


def _header_ok(name: str, value: str) -> bool:
    return (
        bool(_TOKEN_RE.match(name))
        and len(value) <= MAX_HEADER_VALUE
        and not _BAD_VALUE_CHARS.search(value)
    )


def _decode_headers(value: object, what: str) -> Headers:
    return decode_headers(value, what, limit=MAX_HEADERS, header_ok=_header_ok, error=ForwardError)


def _head(frame: bytes, what: str) -> dict[str, Any]:
    try:
        return decode_head(frame, what, MAX_HEAD_BYTES)
    except ProxyError as exc:
        raise ForwardError(str(exc)) from None


def _printable(text: str) -> str:
    # A peer's words end up in logs and HTTP answers: no control characters.
    return "".join(c if c.isprintable() else "?" for c in text[:MAX_ERROR_CHARS])


@dataclass(frozen=True)
class ForwardedRequest:
    """A request for ``workload``, with its body; ``depth`` counts nested calls."""

    workload: str
    request: HttpRequest
    depth: int = 0

    def encode(self) -> bytes:
        """The head frame; raises :class:`ForwardError` for what a target would refuse."""
        request = self.request
        head = {
            "workload": self.workload,
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "headers": [list(h) for h in request.headers],
            "remote": request.remote_addr,
            "host": request.server_name,
            "port": request.server_port,
            "scheme": request.scheme,
            "protocol": request.protocol,
            "depth": self.depth,
        }
        # Checked here too, so that an origin answers a bad request itself instead of sending
        # what every target would reset.
        _decode_request(head)
        frame = orjson.dumps(head)
        if len(frame) > MAX_HEAD_BYTES:
            raise ForwardError(f"the forwarded request head is over {MAX_HEAD_BYTES} bytes")
        return frame

    @classmethod
    def decode(cls, frame: bytes, body: bytes = b"") -> ForwardedRequest:
        """Parse a head frame (the body comes separately); raises :class:`ForwardError`."""
        workload, request, depth = _decode_request(_head(frame, "forwarded request head"))
        return cls(workload, _with_body(request, body), depth)


def _with_body(request: HttpRequest, body: bytes) -> HttpRequest:
    return dataclasses.replace(request, body=body) if body else request


def _decode_request(value: Mapping[str, Any]) -> tuple[str, HttpRequest, int]:
    if set(value) != _REQUEST_FIELDS:
        raise ForwardError("the forwarded request head has missing or unknown fields")
    workload, method, path, query = (value[k] for k in ("workload", "method", "path", "query"))
    if not isinstance(workload, str) or len(workload) > 253 or not _WORKLOAD_RE.match(workload):
        raise ForwardError("the forwarded request names no valid workload")
    if not isinstance(method, str) or len(method) > 32 or not _TOKEN_RE.match(method):
        raise ForwardError("the forwarded request has a malformed method")
    if not isinstance(path, str) or not _PATH_RE.match(path):
        raise ForwardError("the forwarded request path is not an absolute path")
    if not isinstance(query, str) or not _QUERY_RE.match(query):
        raise ForwardError("the forwarded request query is malformed")
    remote, host, port = value["remote"], value["host"], value["port"]
    scheme, protocol, depth = value["scheme"], value["protocol"], value["depth"]
    if not isinstance(remote, str) or not _TEXT_RE.match(remote):
        raise ForwardError("the forwarded request has a malformed remote address")
    if not isinstance(host, str) or not _TEXT_RE.match(host):
        raise ForwardError("the forwarded request has a malformed host")
    if type(port) is not int or not 0 <= port <= 65535:
        raise ForwardError("the forwarded request has a port outside 0-65535")
    if scheme not in ("http", "https"):
        raise ForwardError("the forwarded request scheme is neither http nor https")
    if not isinstance(protocol, str) or not _PROTOCOL_RE.match(protocol):
        raise ForwardError("the forwarded request protocol is not HTTP/x.y")
    if type(depth) is not int or not 0 <= depth <= abi.MAX_CALL_DEPTH:
        raise ForwardError(f"the forwarded call depth is outside 0-{abi.MAX_CALL_DEPTH}")
    request = HttpRequest(
        method=method,
        path=path,
        query=query,
        headers=_decode_headers(value["headers"], "forwarded request"),
        scheme=scheme,
        server_name=host,
        server_port=port,
        remote_addr=remote,
        protocol=protocol,
        # The route is the workload's name, wherever the request entered the swarm.
        script_name=f"/{workload}",
    )
    return workload, request, depth


@dataclass(frozen=True)
class ForwardedAnswer:
    """The target's answer: a response, or a refusal (``refused``: why it did not run it)."""

    response: HttpResponse | None = None
    refused: str | None = None

    def __post_init__(self) -> None:
        if (self.response is None) == (self.refused is None):
            raise ValueError("a forwarded answer is either a response or a refusal")

    def encode_head(self) -> bytes:
        """The answer head frame. Response headers that a strict decoder would refuse are
        left out rather than failing the whole answer."""
        if self.refused is not None:
            return orjson.dumps({"refused": _printable(self.refused)})
        response = self.response
        assert response is not None
        headers = [[k, v] for k, v in response.headers if _header_ok(k, v)][:MAX_HEADERS]
        error = _printable(response.error) if response.error is not None else None
        return orjson.dumps({"status": response.status, "headers": headers, "error": error})

    @classmethod
    def decode_head(cls, frame: bytes) -> ForwardedAnswer:
        """Parse an answer head (a response's body comes separately); raises
        :class:`ForwardError`."""
        value = _head(frame, "forwarded answer head")
        if set(value) == {"refused"}:
            refused = value["refused"]
            if not isinstance(refused, str):
                raise ForwardError("the forwarded answer's refusal is not a string")
            return cls(refused=_printable(refused))
        if set(value) != _ANSWER_FIELDS:
            raise ForwardError("the forwarded answer head has missing or unknown fields")
        status, error = value["status"], value["error"]
        if type(status) is not int or not 100 <= status <= 599:
            raise ForwardError("the forwarded answer has an invalid status")
        if error is not None and not isinstance(error, str):
            raise ForwardError("the forwarded answer's error is not a string")
        headers = _decode_headers(value["headers"], "forwarded answer")
        return cls(
            HttpResponse(
                status=status,
                headers=headers,
                error=_printable(error) if error is not None else None,
            )
        )


# --- the origin's end ----------------------------------------------------------------------


async def exchange(stream: FrameChannel, forwarded: ForwardedRequest) -> ForwardedAnswer:
    """Send ``forwarded`` on ``stream`` and return the target's whole answer.

    Raises :class:`ForwardFailed` when the stream breaks or the answer is malformed (the
    stream is reset then), and :class:`ForwardError` at once, before anything is sent, for a
    request no target would take.
    """
    head = forwarded.encode()
    sent = False
    try:
        await stream.write_frame(head)
        await write_body(stream, forwarded.request.body)
        await stream.finish()
        sent = True
        first = await stream.read_frame()
        if first is None:
            raise ForwardError("the target ended the stream without an answer")
        answer = ForwardedAnswer.decode_head(first)
        if answer.response is None:
            stream.reset()  # nothing follows a refusal
            return answer
        try:
            body = await read_body(stream, MAX_RESPONSE_BODY)
        except ProxyError as exc:
            raise ForwardError(str(exc)) from None
    except (ForwardError, TransportError, ConnectionError) as exc:
        stream.reset()
        raise ForwardFailed(str(exc) or type(exc).__name__, sent=sent) from None
    except BaseException:
        stream.reset()
        raise
    response = answer.response
    return ForwardedAnswer(
        HttpResponse(response.status, response.headers, body, error=response.error)
    )


# --- the target's end ----------------------------------------------------------------------

LocalServe = Callable[[str, HttpRequest, int], Awaitable[ForwardedAnswer] | None]
"""Serves a forwarded request from this node's own instances: ``(workload, request, depth)``
to the answer, or None when no instance here is Ready. Never forwards again."""


async def serve_stream(origin: str, stream: FrameChannel, local: LocalServe) -> None:
    """Serve one :data:`GATEWAY_STREAM` stream from ``origin`` with ``local``.

    A malformed or late request resets the stream; what the workload answers, errors
    included, goes back as it is.
    """
    try:
        async with asyncio.timeout(HEAD_TIMEOUT):
            first = await stream.read_frame()
        if first is None:
            return
        forwarded = ForwardedRequest.decode(first)
        async with asyncio.timeout(BODY_TIMEOUT):
            body = await read_body(stream, MAX_REQUEST_BODY)
    except (ForwardError, ProxyError, TimeoutError) as exc:
        log.info("bad forwarded request from %s: %s", origin, str(exc) or "timed out")
        stream.reset()
        return
    request = _with_body(forwarded.request, body)
    pending = local(forwarded.workload, request, forwarded.depth)
    if pending is None:
        answer = ForwardedAnswer(refused=f'no Ready instance of "{forwarded.workload}" here')
    else:
        answer = await pending
    await stream.write_frame(answer.encode_head())
    if answer.response is not None:
        await write_body(stream, answer.response.body)
