"""The WAGI convention (CGI for WASI): HTTP requests in, CGI responses out. Pure functions.

A request becomes environment variables (``REQUEST_METHOD``, ``PATH_INFO``, ``QUERY_STRING``,
``HTTP_*`` headers, ...) and the body becomes stdin. The module writes header lines, a blank
line and the body to stdout. ``Status: 404 Not Found`` sets the status; a ``Location`` header
without ``Status`` means a 302 redirect.
"""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=512)  # the same few names arrive with every request
def _header_variable(name: str) -> str | None:
    """``X-Forwarded-For`` -> ``HTTP_X_FORWARDED_FOR``; None for names we do not pass on.

    Names with ``_`` are dropped, as nginx does by default: ``X_Foo`` and ``X-Foo`` would map
    to the same variable, letting a client shadow a header that a proxy in front had set.
    """
    if not _HEADER_NAME_RE.match(name) or name.lower() in _SKIPPED_REQUEST_HEADERS:
        return None
    return "HTTP_" + name.upper().replace("-", "_")


#: The CGI variables set from each request, in the order ``request_values`` gives them: the
#: first ``SERVER_VARIABLES`` depend only on where the request arrived (and rarely change),
#: the rest on the request itself.
CGI_VARIABLES = (
    "GATEWAY_INTERFACE",
    "SERVER_SOFTWARE",
    "SERVER_PROTOCOL",
    "SERVER_NAME",
    "SERVER_PORT",
    "SCRIPT_NAME",
    "X_MATCHED_ROUTE",
    "REQUEST_METHOD",
    "PATH_INFO",
    "PATH_TRANSLATED",
    "X_RAW_PATH_INFO",
    "QUERY_STRING",
    "REMOTE_ADDR",
    "REMOTE_HOST",
    "CONTENT_TYPE",
    "CONTENT_LENGTH",
    "X_FULL_URL",
)
SERVER_VARIABLES = 7
_CGI_VARIABLE_SET = frozenset(CGI_VARIABLES)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def request_values(request: HttpRequest) -> list[str]:
    """The values of ``CGI_VARIABLES`` for ``request``, in that order.

    Raises ``BadRequest`` for a path that does not start with ``/`` or decodes to NUL.
    """
    raw_path = request.path
    path_info = unquote(raw_path, errors="replace") if "%" in raw_path else raw_path
    if "\x00" in path_info or not raw_path.startswith("/"):
        raise BadRequest("the request path must start with / and must not contain NUL")
    query = request.query
    server_name = request.server_name
    port = request.server_port
    host_port = (
        server_name if port == _DEFAULT_PORTS.get(request.scheme) else f"{server_name}:{port}"
    )
    script_name = request.script_name
    content_type = request.header("content-type") or ""
    remote = request.remote_addr
    return [
        "CGI/1.1",
        SERVER_SOFTWARE,
        request.protocol,
        server_name,
        str(port),
        script_name,
        script_name or "/",
        request.method.upper(),
        path_info,
        path_info,
        raw_path,
        query,
        remote,
        remote,
        _clean(content_type),
        str(len(request.body)),
        f"{request.scheme}://{host_port}{script_name}{raw_path}{'?' if query else ''}{query}",
    ]


def header_variables(request: HttpRequest) -> dict[str, str]:
    """The ``HTTP_*`` variables for ``request``'s headers (repeated ones joined)."""
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
    return headers


def cgi_environ(
    request: HttpRequest, workload_env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment a WAGI module sees for ``request``: the Workload's own ``env`` first,
    then the CGI variables, then the ``HTTP_*`` ones, each winning where names collide."""
    env = {key: _clean(value) for key, value in (workload_env or {}).items()}
    env.update(zip(CGI_VARIABLES, request_values(request), strict=True))
    env.update(header_variables(request))
    return env


class CgiTemplate:
    """``cgi_environ`` for one workload, split into what never changes and what each request
    sets, so that the first part is prepared once (``capi.Strings.plus`` then encodes only
    the second).

    ``fixed`` is the Workload's ``env`` without the names a request always sets; the CGI
    variables follow in ``CGI_VARIABLES`` order, then the request's ``HTTP_*``. Together they
    hold the same variables as ``cgi_environ``, with no name twice.
    """

    def __init__(self, workload_env: Mapping[str, str] | None = None) -> None:
        env = {key: _clean(value) for key, value in (workload_env or {}).items()}
        self.workload_env = env
        self.fixed = {key: value for key, value in env.items() if key not in _CGI_VARIABLE_SET}

    def shadows(self, headers: Mapping[str, str]) -> bool:
        """Whether any of these ``HTTP_*`` variables also names one of ``fixed`` (rare: then
        the fixed part is not fixed for this request, and ``cgi_environ`` applies)."""
        fixed = self.fixed
        return any(name in fixed for name in headers) if fixed else False


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
    # The usual output, LF line ends: one partition finds the blank line. A CR before it
    # could start an earlier CRLF blank line, so that case takes the general split.
    head, blank, body = output.partition(b"\n\n")
    if not blank or b"\r" in head:
        split = _split_head(output)
        if split is None:
            raise _no_head(output, workload)
        head, body = split
    if len(head) > MAX_RESPONSE_HEADER_BYTES:
        raise MalformedResponse(
            f"{_label(workload)} wrote more than 64 KiB of headers", workload=workload
        )
    status: int | None = None
    headers: list[tuple[str, str]] = []
    for line in head.decode("latin-1").split("\n"):
        name, sep, value = line.partition(":")
        if not sep or name not in _KNOWN_GOOD_NAMES:
            line = line.rstrip("\r")
            if not line:
                continue
            name, sep, value = line.partition(":")
            name = name.strip()
            if not sep or not _HEADER_NAME_RE.match(name.replace("_", "-")):
                raise MalformedResponse(
                    f"{_label(workload)} wrote a header line that is not 'Name: value': "
                    f"{line[:80]!r}",
                    workload=workload,
                )
        lowered = name.lower()
        value = value.strip()
        if lowered == "status":
            code = value.split(" ", 1)[0]
            if not code.isdigit() or not 100 <= int(code) <= 599:
                raise MalformedResponse(
                    f"{_label(workload)} wrote a Status header that is not an HTTP status: "
                    f"{value[:40]!r}",
                    workload=workload,
                )
            status = int(code)
            continue
        if lowered in _SKIPPED_RESPONSE_HEADERS:
            continue
        headers.append((name, value))
        if len(headers) > MAX_RESPONSE_HEADERS:
            raise MalformedResponse(
                f"{_label(workload)} wrote more than {MAX_RESPONSE_HEADERS} headers",
                workload=workload,
            )
    if status is None:
        status = 302 if any(name.lower() == "location" for name, _ in headers) else 200
    return HttpResponse(status=status, headers=tuple(headers), body=body)


#: Header names that need no check (the ones workloads write most); any other is checked
#: against the token grammar.
_KNOWN_GOOD_NAMES = frozenset(
    {"Content-Type", "Status", "Location", "Cache-Control", "Set-Cookie", "Content-Language"}
)


def _label(workload: str) -> str:
    return f'workload "{workload}"' if workload else "the workload"


def _no_head(output: bytes, workload: str) -> MalformedResponse:
    if not output:
        return MalformedResponse(f"{_label(workload)} wrote nothing to stdout", workload=workload)
    return MalformedResponse(
        f"{_label(workload)} wrote no blank line after its headers (WAGI: headers, a blank "
        "line, then the body)",
        workload=workload,
    )
