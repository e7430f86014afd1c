"""The WAGI convention (CGI for WASI): HTTP requests in, CGI responses out. Pure functions.

A request becomes environment variables (``REQUEST_METHOD``, ``PATH_INFO``, ``QUERY_STRING``,
``HTTP_*`` headers, ...) and the body becomes stdin. The module writes header lines, a blank
line and the body to stdout. ``Status: 404 Not Found`` sets the status; a ``Location`` header
without ``Status`` means a 302 redirect.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote

from pollen.runtime.errors import BadRequest, MalformedResponse

SERVER_SOFTWARE = "pollen"

# RFC 9110 token characters, without "_" (see ``_header_variable``).
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+\-.^`|~0-9A-Za-z]+$")
# Set by the CGI variables themselves, or hop-by-hop: never passed on as HTTP_*. "Proxy" is
# left out so that no client can set HTTP_PROXY in a workload (the "httpoxy" problem).
_SKIPPED_REQUEST_HEADERS = frozenset(
    {"content-type", "content-length", "proxy", "connection", "keep-alive", "te", "upgrade"}
)
# The server frames the response itself; a module's own values would contradict it.
_SKIPPED_RESPONSE_HEADERS = frozenset(
    {"status", "content-length", "transfer-encoding", "connection", "keep-alive"}
)
MAX_RESPONSE_HEADERS = 100
MAX_RESPONSE_HEADER_BYTES = 64 * 1024


@dataclass(frozen=True)
class HttpRequest:
    """One HTTP request as the gateway or ``pollen run`` received it.

    ``path`` is the raw (still percent-encoded) path below the workload's route, starting with
    ``/``; ``script_name`` is the route prefix itself (``/hello`` behind the gateway, empty
    for ``pollen run``).
    """

    method: str = "GET"
    path: str = "/"
    query: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    scheme: str = "http"
    server_name: str = "127.0.0.1"
    server_port: int = 80
    remote_addr: str = "127.0.0.1"
    protocol: str = "HTTP/1.1"
    script_name: str = ""

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), if any."""
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return None


@dataclass(frozen=True)
class HttpResponse:
    """What a workload answered (or what the runtime answers for it)."""

    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    #: Set when the runtime wrote this answer because the workload failed.
    error: str | None = field(default=None, compare=False)

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), if any."""
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return None

    @classmethod
    def failure(
        cls, status: int, message: str, extra_headers: Iterable[tuple[str, str]] = ()
    ) -> HttpResponse:
        """A plain-text answer of one sentence, for a request the workload could not serve."""
        return cls(
            status=status,
            headers=(("Content-Type", "text/plain; charset=utf-8"), *extra_headers),
            body=(message.rstrip(".") + ".\n").encode(),
            error=message,
        )


def _clean(value: str) -> str:
    # Environment strings are NUL-terminated C strings inside the module.
    return value.replace("\x00", "")


def _header_variable(name: str) -> str | None:
    """``X-Forwarded-For`` -> ``HTTP_X_FORWARDED_FOR``; None for names we do not pass on.

    Names with ``_`` are dropped, as nginx does by default: ``X_Foo`` and ``X-Foo`` would map
    to the same variable, letting a client shadow a header that a proxy in front had set.
    """
    if not _HEADER_NAME_RE.match(name) or name.lower() in _SKIPPED_REQUEST_HEADERS:
        return None
    return "HTTP_" + name.upper().replace("-", "_")


def cgi_environ(
    request: HttpRequest, workload_env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment a WAGI module sees for ``request``: the Workload's own ``env`` first,
    then the CGI variables, which win where names collide."""
    path_info = unquote(request.path, errors="replace")
    if "\x00" in path_info or not request.path.startswith("/"):
        raise BadRequest("the request path must start with / and must not contain NUL")
    env = {key: _clean(value) for key, value in (workload_env or {}).items()}
    query = f"?{request.query}" if request.query else ""
    default_port = {"http": 80, "https": 443}.get(request.scheme)
    host_port = (
        request.server_name
        if request.server_port == default_port
        else f"{request.server_name}:{request.server_port}"
    )
    content_type = request.header("content-type") or ""
    env.update(
        {
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_SOFTWARE": SERVER_SOFTWARE,
            "SERVER_PROTOCOL": request.protocol,
            "SERVER_NAME": request.server_name,
            "SERVER_PORT": str(request.server_port),
            "REQUEST_METHOD": request.method.upper(),
            "SCRIPT_NAME": request.script_name,
            "PATH_INFO": path_info,
            "PATH_TRANSLATED": path_info,
            "X_RAW_PATH_INFO": request.path,
            "QUERY_STRING": request.query,
            "REMOTE_ADDR": request.remote_addr,
            "REMOTE_HOST": request.remote_addr,
            "CONTENT_TYPE": _clean(content_type),
            "CONTENT_LENGTH": str(len(request.body)),
            "X_MATCHED_ROUTE": request.script_name or "/",
            "X_FULL_URL": f"{request.scheme}://{host_port}{request.script_name}"
            f"{request.path}{query}",
        }
    )
    headers: dict[str, str] = {}
    for name, value in request.headers:
        variable = _header_variable(name)
        if variable is None:
            continue
        value = _clean(value)
        if variable in headers:
            # RFC 9110: repeated fields are one comma-separated list (Cookie uses "; ").
            joiner = "; " if variable == "HTTP_COOKIE" else ", "
            headers[variable] = f"{headers[variable]}{joiner}{value}"
        else:
            headers[variable] = value
    env.update(headers)
    return env


def _split_head(output: bytes) -> tuple[bytes, bytes] | None:
    """Headers and body, split at the first blank line (LF or CRLF line ends)."""
    lf = output.find(b"\n\n")
    crlf = output.find(b"\r\n\r\n")
    if lf == -1 and crlf == -1:
        # The blank line may be the very first line: no headers at all.
        if output.startswith(b"\r\n"):
            return b"", output[2:]
        if output.startswith(b"\n"):
            return b"", output[1:]
        return None
    if crlf != -1 and (lf == -1 or crlf < lf):
        return output[:crlf], output[crlf + 4 :]
    return output[:lf], output[lf + 2 :]


def parse_cgi_output(output: bytes, *, workload: str = "") -> HttpResponse:
    """Turn what a WAGI module wrote to stdout into a response.

    Raises ``MalformedResponse`` when there is no header block, a header line is not
    ``Name: value``, or ``Status`` is not a number between 100 and 599.
    """
    label = f'workload "{workload}"' if workload else "the workload"
    if not output:
        raise MalformedResponse(f"{label} wrote nothing to stdout", workload=workload)
    split = _split_head(output)
    if split is None:
        raise MalformedResponse(
            f"{label} wrote no blank line after its headers (WAGI: headers, a blank line, "
            "then the body)",
            workload=workload,
        )
    head, body = split
    if len(head) > MAX_RESPONSE_HEADER_BYTES:
        raise MalformedResponse(f"{label} wrote more than 64 KiB of headers", workload=workload)
    status: int | None = None
    headers: list[tuple[str, str]] = []
    for raw in head.split(b"\n"):
        line = raw.rstrip(b"\r").decode("latin-1")
        if not line:
            continue
        name, sep, value = line.partition(":")
        name = name.strip()
        if not sep or not _HEADER_NAME_RE.match(name.replace("_", "-")):
            raise MalformedResponse(
                f"{label} wrote a header line that is not 'Name: value': {line[:80]!r}",
                workload=workload,
            )
        value = value.strip()
        if name.lower() == "status":
            code = value.split(" ", 1)[0]
            if not code.isdigit() or not 100 <= int(code) <= 599:
                raise MalformedResponse(
                    f"{label} wrote a Status header that is not an HTTP status: {value[:40]!r}",
                    workload=workload,
                )
            status = int(code)
            continue
        if name.lower() in _SKIPPED_RESPONSE_HEADERS:
            continue
        headers.append((name, value))
        if len(headers) > MAX_RESPONSE_HEADERS:
            raise MalformedResponse(
                f"{label} wrote more than {MAX_RESPONSE_HEADERS} headers", workload=workload
            )
    if status is None:
        status = 302 if any(name.lower() == "location" for name, _ in headers) else 200
    return HttpResponse(status=status, headers=tuple(headers), body=body)
