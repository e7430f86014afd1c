"""The node proxy: any node's API, reached through the node you talk to, over the mesh.

``/apis/pollen.dev/v1alpha1/nodes/NAME/proxy/PATH`` on one node answers what ``PATH`` answers on
node ``NAME``'s API, the way Kubernetes' node proxy subresource reaches a kubelet. The request
travels on a mesh stream of kind :data:`PROXY_STREAM` (directly, or through a relay when there is
no direct route), and the answer streams back, so a watch works through it too.

On the stream: the origin writes a request head frame (JSON: method, path, query, headers),
then the body in frames, then finishes its side; the target answers with a response head frame
(status, headers), the body in frames, and finishes. The target replays the request against its
own API on loopback with its own token: the caller was authenticated by the origin, and every
node of the cluster is trusted with the API (any of them can write the whole document anyway).
A proxied request carries :data:`PROXIED_HEADER` and is never proxied again, so no chain of
proxies can loop.

Every frame from a peer is hostile until checked (SPEC section 8): heads are size-capped and
validated field by field, and a bad one resets the stream.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from pollen.api.errors import ApiError
from pollen.mesh.frames import decode_object

PROXY_STREAM: Final = "api-proxy"
#: Set on the request a target replays against its own API; such a request is not proxied.
PROXIED_HEADER: Final = "Pollen-Proxied-From"
MAX_HEAD_BYTES: Final = 64 * 1024
BODY_FRAME_BYTES: Final = 1024 * 1024
MAX_PROXIED_BODY: Final = 64 * 1024 * 1024

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}\Z")  # an HTTP header name
_VALUE_RE = re.compile(r"^[\t\x20-\x7e\x80-\xff]{0,8192}\Z")
_PATH_RE = re.compile(r"^/[\x21-\x7e]{0,8191}\Z")
_QUERY_RE = re.compile(r"^[\x21-\x7e]{0,8192}\Z")
# Hop-by-hop headers (RFC 9110 section 7.6.1) and those each hop sets for itself.
_NOT_FORWARDED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "authorization",
        "via",
        PROXIED_HEADER.lower(),
    }
)
MAX_HEADERS: Final = 100


class ProxyError(Exception):
    """A malformed proxy frame, or a target that cannot be reached; one sentence."""


class FrameChannel(Protocol):
    """A bidirectional stream of frames to another node (a mesh stream)."""

    async def read_frame(self) -> bytes | None: ...

    async def write_frame(self, payload: bytes) -> None: ...

    async def finish(self) -> None: ...

    def reset(self) -> None: ...


@dataclass(frozen=True)
class Channel:
    """A frame channel to a node, and the relay it goes through, if any."""

    frames: FrameChannel
    via: str | None = None


OpenChannel = Callable[[str], Awaitable[Channel]]
"""Opens a :data:`PROXY_STREAM` channel to the named node; raises :class:`ProxyError`."""

Headers = tuple[tuple[str, str], ...]


def forwarded_headers(headers: Any) -> Headers:
    """The end-to-end headers of ``headers`` (a multidict or pairs), hop-by-hop ones dropped."""
    items = headers.items() if hasattr(headers, "items") else headers
    return tuple((k, v) for k, v in items if k.lower() not in _NOT_FORWARDED)


def decode_head(frame: bytes, what: str, limit: int = MAX_HEAD_BYTES) -> dict[str, Any]:
    """A head frame as a JSON object of at most ``limit`` bytes; raises :class:`ProxyError`.

    Shared with the gateway's forwarding protocol, which frames requests the same way.
    """
    return decode_object(frame, what, limit, ProxyError)


def _header_ok(name: str, value: str) -> bool:
    return bool(_TOKEN_RE.match(name)) and bool(_VALUE_RE.match(value))


def decode_headers(
    value: object,
    what: str,
    *,
    limit: int = MAX_HEADERS,
    header_ok: Callable[[str, str], bool] = _header_ok,
    error: type[Exception] = ProxyError,
) -> Headers:
    """Header pairs from a decoded head: a list of at most ``limit`` ``[name, value]`` pairs of
    strings that ``header_ok`` accepts (by default an HTTP token and a value of tabs and
    printable Latin-1, at most 8 KiB); raises ``error``.

    Shared with the gateway's forwarding protocol, which passes its own limits and error. Both
    rules refuse lone surrogates, which no encoding can pass on.
    """
    if not isinstance(value, list) or len(value) > limit:
        raise error(f"the {what} headers are not a list of at most {limit} pairs")
    pairs: list[tuple[str, str]] = []
    for pair in value:
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not isinstance(pair[0], str)
            or not isinstance(pair[1], str)
            or not header_ok(pair[0], pair[1])
        ):
            raise error(f"the {what} has a malformed header")
        pairs.append((pair[0], pair[1]))
    return tuple(pairs)


@dataclass(frozen=True)
class ProxyRequest:
    """The head of a proxied request."""

    method: str
    path: str
    query: str = ""
    headers: Headers = ()

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "method": self.method,
                "path": self.path,
                "query": self.query,
                "headers": [list(h) for h in self.headers],
            }
        )

    @classmethod
    def decode(cls, frame: bytes) -> ProxyRequest:
        value = decode_head(frame, "proxied request head")
        if set(value) != {"method", "path", "query", "headers"}:
            raise ProxyError("the proxied request head has missing or unknown fields")
        method, path, query = value["method"], value["path"], value["query"]
        if not isinstance(method, str) or method not in _METHODS:
            raise ProxyError("the proxied request has an unsupported method")
        if not isinstance(path, str) or not _PATH_RE.match(path):
            raise ProxyError("the proxied request path is not an absolute path")
        if not isinstance(query, str) or not _QUERY_RE.match(query):
            raise ProxyError("the proxied request query is malformed")
        return cls(method, path, query, decode_headers(value["headers"], "proxied request"))


@dataclass(frozen=True)
class ProxyResponse:
    """The head of a proxied response; ``via`` names the nodes that passed it on."""

    status: int
    headers: Headers = ()
    via: tuple[str, ...] = ()

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "status": self.status,
                "headers": [list(h) for h in self.headers],
                "via": list(self.via),
            }
        )

    @classmethod
    def decode(cls, frame: bytes) -> ProxyResponse:
        value = decode_head(frame, "proxied response head")
        if set(value) != {"status", "headers", "via"}:
            raise ProxyError("the proxied response head has missing or unknown fields")
        status, via = value["status"], value["via"]
        if type(status) is not int or not 100 <= status <= 599:
            raise ProxyError("the proxied response has an invalid status")
        if (
            not isinstance(via, list)
            or len(via) > 8
            or not all(isinstance(v, str) and _TOKEN_RE.match(v) for v in via)
        ):
            raise ProxyError("the proxied response has a malformed via list")
        return cls(status, decode_headers(value["headers"], "proxied response"), tuple(via))


async def read_body(frames: FrameChannel, limit: int = MAX_PROXIED_BODY) -> bytes:
    """Body frames up to the end of the stream, at most ``limit`` bytes in all."""
    chunks: list[bytes] = []
    size = 0
    while (frame := await frames.read_frame()) is not None:
        size += len(frame)
        if size > limit:
            raise ProxyError(f"the body is over {limit} bytes")
        chunks.append(frame)
    return b"".join(chunks)


async def write_body(frames: FrameChannel, body: bytes) -> None:
    """``body`` in frames of at most :data:`BODY_FRAME_BYTES`."""
    for start in range(0, len(body), BODY_FRAME_BYTES):
        await frames.write_frame(body[start : start + BODY_FRAME_BYTES])


def _via_header(via: tuple[str, ...]) -> str:
    return ", ".join(f"1.1 {name}" for name in via)


class NodeProxy:
    """Both ends of the node proxy for one node: forwarding requests and serving them."""

    def __init__(self, node_name: str, open_channel: OpenChannel) -> None:
        self.node_name = node_name
        self._open_channel = open_channel
        self._local_url = ""
        self._token = ""
        self._session: aiohttp.ClientSession | None = None

    def serve_locally(self, api_url: str, token: str) -> None:
        """Where proxied requests are replayed: this node's own API, with its token."""
        self._local_url = api_url.rstrip("/")
        self._token = token

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # the origin: an API request for another node ----------------------------------------

    async def forward(self, request: web.Request, node: str, path: str) -> web.StreamResponse:
        """Answer ``request`` with what ``path`` answers on ``node``'s API."""
        head = ProxyRequest(
            method=request.method,
            path=path,
            query=request.raw_path.partition("?")[2],
            headers=forwarded_headers(request.headers),
        )
        body = await request.read()
        answer, chunks, via = await self.request(node, head, body)
        return await self._respond(request, answer, chunks, via=via)

    async def request(
        self, node: str, head: ProxyRequest, body: bytes = b""
    ) -> tuple[ProxyResponse, AsyncIterator[bytes], tuple[str, ...]]:
        """Send a request to ``node``'s API (this node's own included) over the node proxy.

        Returns the answer's head, its body as it streams in, and the nodes it passed through,
        the target first. Closing the body iterator early resets the stream. Raises
        ``ApiError``: 503 when ``node`` cannot be reached, 502 when it gave no answer.
        """
        if node == self.node_name:
            try:
                answer, chunks = await self._replay(head, body, origin=self.node_name)
            except (ProxyError, aiohttp.ClientError) as exc:
                raise ApiError(
                    502, "BadGateway", f"this node's API did not answer: {exc}"
                ) from None
            return answer, chunks, (self.node_name,)
        try:
            channel = await self._open_channel(node)
        except ProxyError as exc:
            raise ApiError(503, "ServiceUnavailable", str(exc)) from None
        frames = channel.frames
        try:
            await frames.write_frame(head.encode())
            await write_body(frames, body)
            await frames.finish()
            first = await frames.read_frame()
            if first is None:
                raise ProxyError("the stream ended without an answer")
            answer = ProxyResponse.decode(first)
        except Exception as exc:
            frames.reset()
            raise ApiError(502, "BadGateway", f"node {node} gave no answer: {exc}") from None
        except BaseException:
            frames.reset()
            raise
        via = answer.via + ((channel.via,) if channel.via else ()) + (self.node_name,)
        return answer, _frames_of(frames), via

    async def _respond(
        self,
        request: web.Request,
        answer: ProxyResponse,
        chunks: AsyncIterator[bytes],
        *,
        via: tuple[str, ...],
    ) -> web.StreamResponse:
        headers = CIMultiDict(answer.headers)
        headers["Via"] = _via_header(via)
        response = web.StreamResponse(status=answer.status, headers=headers)
        await response.prepare(request)
        try:
            async for chunk in chunks:
                await response.write(chunk)
        except (ProxyError, ConnectionError, OSError) as exc:
            # The head is out: the only honest signal left is cutting the connection.
            raise ConnectionResetError(f"the proxied answer was cut short: {exc}") from exc
        await response.write_eof()
        return response

    # the target: a request another node forwarded -------------------------------------------

    async def serve(self, origin: str, frames: FrameChannel) -> None:
        """Serve one :data:`PROXY_STREAM` stream from ``origin`` (a mesh stream handler)."""
        first = await frames.read_frame()
        if first is None:
            return
        try:
            head = ProxyRequest.decode(first)
            body = await read_body(frames)
        except ProxyError as exc:
            failure = ApiError(400, "BadRequest", str(exc))
            await frames.write_frame(
                ProxyResponse(
                    400, (("Content-Type", "application/json"),), (self.node_name,)
                ).encode()
            )
            await frames.write_frame(orjson.dumps(failure.to_status()))
            return
        try:
            answer, chunks = await self._replay(head, body, origin=origin)
        except (ProxyError, aiohttp.ClientError) as exc:
            failure = ApiError(
                502, "BadGateway", f"the API of {self.node_name} did not answer: {exc}"
            )
            await frames.write_frame(
                ProxyResponse(
                    502, (("Content-Type", "application/json"),), (self.node_name,)
                ).encode()
            )
            await frames.write_frame(orjson.dumps(failure.to_status()))
            return
        await frames.write_frame(
            ProxyResponse(answer.status, answer.headers, (self.node_name,)).encode()
        )
        async for chunk in chunks:
            await frames.write_frame(chunk)

    async def _replay(
        self, head: ProxyRequest, body: bytes, *, origin: str
    ) -> tuple[ProxyResponse, AsyncIterator[bytes]]:
        """Send ``head`` and ``body`` to this node's own API; the answer head and body chunks."""
        if not self._local_url:
            raise ProxyError(f"node {self.node_name} is not serving its API yet")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                auto_decompress=False,
            )
        headers = CIMultiDict(forwarded_headers(head.headers))
        headers["Authorization"] = f"Bearer {self._token}"
        headers[PROXIED_HEADER] = origin
        # Encoded as it came: the path and query reach the API exactly as the caller sent them.
        url = URL(
            self._local_url + head.path + (f"?{head.query}" if head.query else ""), encoded=True
        )
        response = await self._session.request(
            head.method,
            url,
            headers=headers,
            data=body if body else None,
            allow_redirects=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )
        answer = ProxyResponse(response.status, forwarded_headers(response.headers))

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.content.iter_chunked(BODY_FRAME_BYTES // 16):
                    yield chunk
            finally:
                response.release()

        return answer, chunks()


async def _frames_of(frames: FrameChannel) -> AsyncIterator[bytes]:
    try:
        while (frame := await frames.read_frame()) is not None:
            yield frame
    except BaseException:
        frames.reset()
        raise
