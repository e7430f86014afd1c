"""A small synchronous client for the node's HTTP API (``docs/api.md``).

Built on ``http.client`` rather than aiohttp because pctl is a short-lived process: importing an
async HTTP stack would cost more than most commands take in total. One keep-alive connection
serves the plain requests; each watch gets a connection of its own, since a stream holds it.
"""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import orjson

from pollen import API_VERSION
from pollen.api.errors import ApiError

PREFIX = "/apis/pollen.dev/v1alpha1"

# ``list`` is also a method name below, so annotations inside the class use this alias.
Items = list[dict[str, Any]]

# A watch line larger than this is not a resource the node would send; stop rather than buffer.
_MAX_LINE = 64 << 20


@dataclass(frozen=True)
class RawResponse:
    """An HTTP answer as it came: status, reason, headers (last value per name) and body."""

    status: int
    reason: str
    headers: dict[str, str]
    body: bytes


class ApiClient:
    """Calls one node's API with a bearer token.

    Usable as a context manager; :meth:`close` drops the kept-alive connection.
    """

    def __init__(self, server: str, token: str, timeout: float = 30) -> None:
        parts = urlsplit(server)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ApiError(0, "BadServer", f"server {server!r} is not an http:// or https:// URL")
        self.server = server.rstrip("/")
        self.timeout = timeout
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._base = parts.path.rstrip("/")
        self._headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/json",
            "User-Agent": "pctl",
        }
        self._conn: http.client.HTTPConnection | None = None

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def clone(self) -> ApiClient:
        """A client for the same node and token with a connection of its own (for a thread)."""
        token = self._headers["Authorization"].removeprefix("Bearer ")
        return ApiClient(self.server, token, self.timeout)

    def close(self) -> None:
        """Close the kept-alive connection, if any."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # --- the API ------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: ``{"status": "ok", "node": NAME}``."""
        return self._dict(self._request("GET", "/healthz"))

    def list(self, kind_plural: str, label_selector: str | None = None) -> Items:
        """The objects of one kind, sorted by name, optionally filtered by ``k=v,k2=v2``."""
        query = {"labelSelector": label_selector} if label_selector else None
        return self._items(self._request("GET", self._path(kind_plural), query))

    def get(self, kind_plural: str, name: str) -> dict[str, Any]:
        """One object; ``ApiError`` with code 404 when it does not exist."""
        return self._dict(self._request("GET", self._path(kind_plural, name)))

    def apply(self, items: Items, dry_run: bool = False) -> Items:
        """Create or update ``items`` in one all-or-nothing request.

        Returns the ApplyResult items: ``{"kind", "name", "action", "object"}`` each, ``action``
        being ``created``, ``configured`` or ``unchanged``.
        """
        body = {"apiVersion": API_VERSION, "kind": "List", "items": items}
        query = {"dryRun": "true"} if dry_run else None
        return self._items(self._request("POST", f"{PREFIX}/apply", query, body))

    def delete(self, kind_plural: str, name: str) -> dict[str, Any]:
        """Delete one object; returns it as deleted (or as marked, while finalizers remain)."""
        return self._dict(self._request("DELETE", self._path(kind_plural, name)))

    def events(self, kind: str | None = None, name: str | None = None) -> Items:
        """Recent events, optionally only those about one kind (``Workload``) or object."""
        return self._items(self._request("GET", f"{PREFIX}/events", _event_query(kind, name)))

    def watch(
        self,
        kind_plural: str,
        name: str | None = None,
        *,
        label_selector: str | None = None,
        timeout: float | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Stream changes to one kind, or to one object, as watch events.

        Yields ``{"type": "ADDED"|"MODIFIED"|"DELETED", "object": {...}}`` and the
        ``{"type": "BOOKMARK"}`` lines too: the first bookmark marks the end of the initial
        listing. The iterator ends when the node closes the stream. With ``timeout``, it raises
        ``TimeoutError`` once that many seconds have passed in total.
        """
        query: dict[str, str] = {"watch": "true"}
        if label_selector:
            query["labelSelector"] = label_selector
        return self._stream(self._path(kind_plural, name), query, timeout)

    def watch_events(
        self, kind: str | None = None, name: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """Stream events as they are recorded, after the recent ones (see :meth:`watch`)."""
        query = {**_event_query(kind, name), "watch": "true"}
        return self._stream(f"{PREFIX}/events", query, None)

    # --- logs and usage (pctl logs, pctl top) ---------------------------------------------

    def logs(
        self,
        workload: str,
        *,
        follow: bool = False,
        tail: int | None = None,
        local: bool = False,
    ) -> Iterator[dict[str, Any]]:
        """Stream the log lines of ``workload``'s replicas, swarm-wide (or this node's only).

        Yields ``{"time", "replica", "node", "stream", "level"?, "text"}`` lines, oldest
        first, then ``{"type": "BOOKMARK"}``; with ``follow``, new lines as they come, and
        bookmarks while it is quiet. ``{"type": "WARNING", "message", "node"?}`` says what
        could not be shown (an unreachable node). The iterator ends when the stream does.
        """
        query: dict[str, str] = {}
        if local:
            query["local"] = "true"
        if follow:
            query["follow"] = "true"
        if tail is not None:
            query["tail"] = str(tail)
        return self._stream(f"{self._path('workloads', workload)}/logs", query, None)

    def workload_usage(self, workload: str, *, local: bool = False) -> dict[str, Any]:
        """``WorkloadMetrics``: each replica's usage (swarm-wide, or this node's only)."""
        query = {"local": "true"} if local else None
        return self._dict(self._request("GET", f"{self._path('workloads', workload)}/usage", query))

    def node_usage(self, node: str) -> dict[str, Any]:
        """``NodeMetrics``: node ``node``'s CPU, memory, instances and artifacts now."""
        return self._dict(self._request("GET", f"{self._path('nodes', node)}/usage"))

    # --- blobs: artifacts' bytes ----------------------------------------------------------

    def put_blob(self, digest: str, data: bytes) -> dict[str, Any]:
        """Upload ``data`` to the node's artifact store under ``digest`` (which it must hash
        to); returns ``{"digest", "size"}``."""
        target = self._target(self._blob_path(digest), None)
        headers = {"Content-Type": "application/octet-stream"}
        answer = self._exchange("PUT", target, data, headers)
        if answer.status >= 400:
            raise _status_error(answer.status, answer.reason, answer.body, self.server)
        try:
            return self._dict(orjson.loads(answer.body))
        except orjson.JSONDecodeError as exc:
            raise ApiError(
                answer.status, "BadResponse", "the node answered with invalid JSON"
            ) from exc

    def blob_size(self, digest: str) -> int | None:
        """The size of ``digest`` if the node holds it itself, else None (nothing is fetched)."""
        answer = self._exchange("HEAD", self._target(self._blob_path(digest), None), None, {})
        if answer.status == 404:
            return None
        if answer.status >= 400:
            raise _status_error(answer.status, answer.reason, answer.body, self.server)
        length = answer.headers.get("Content-Length")
        return int(length) if length is not None and length.isdigit() else None

    def get_blob(self, digest: str) -> RawResponse:
        """The bytes of ``digest``, which the node fetches from a holder first if it must.

        The answer is returned as it is when it succeeded (``headers`` tell where it was
        fetched from, ``Pollen-Fetched-From``); a failure raises ``ApiError``.
        """
        answer = self._exchange("GET", self._target(self._blob_path(digest), None), None, {})
        if answer.status >= 400:
            raise _status_error(answer.status, answer.reason, answer.body, self.server)
        return answer

    def list_blobs(self) -> Items:
        """The blobs the node holds: ``{"digest", "size"}`` each."""
        return self._items(self._request("GET", f"{PREFIX}/blobs"))

    @staticmethod
    def _blob_path(digest: str) -> str:
        return f"{PREFIX}/blobs/{quote(digest, safe=':')}"

    # --- plumbing ---------------------------------------------------------------------------

    def _path(self, kind_plural: str, name: str | None = None) -> str:
        path = f"{PREFIX}/{quote(kind_plural, safe='')}"
        return path if name is None else f"{path}/{quote(name, safe='')}"

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _target(self, path: str, query: dict[str, str] | None) -> str:
        return self._base + path + (f"?{urlencode(query)}" if query else "")

    def _request(
        self,
        method: str,
        path: str,
        query: dict[str, str] | None = None,
        body: Any = None,
    ) -> Any:
        payload = None if body is None else orjson.dumps(body)
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        answer = self._exchange(method, self._target(path, query), payload, headers)
        if answer.status >= 400:
            raise _status_error(answer.status, answer.reason, answer.body, self.server)
        try:
            return orjson.loads(answer.body)
        except orjson.JSONDecodeError as exc:
            raise ApiError(
                answer.status,
                "BadResponse",
                f"the node at {self.server} answered {method} {path} with invalid JSON",
            ) from exc

    def proxy(
        self, node: str, path: str, *, method: str = "GET", body: bytes | None = None
    ) -> RawResponse:
        """``path`` on node ``node``'s API, reached through this node (the node proxy).

        Returns the answer as it is, error statuses included; ``headers["Via"]`` names the
        nodes it passed through.
        """
        if not path.startswith("/"):
            raise ValueError("a proxied path starts with /")
        target = self._base + f"{self._path('nodes', node)}/proxy{path}"
        return self._exchange(method, target, body, {})

    def _exchange(
        self, method: str, target: str, payload: bytes | None, extra: dict[str, str]
    ) -> RawResponse:
        headers = {**self._headers, **extra}
        for attempt in (1, 2):
            reused = self._conn is not None
            if self._conn is None:
                self._conn = self._connect(self.timeout)
            try:
                self._conn.request(method, target, body=payload, headers=headers)
                response = self._conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                # The node may close a kept-alive connection between two requests; that is
                # not a failure of the request, so try once more on a fresh connection (every
                # call is idempotent, apply included: it declares the state it wants).
                if reused and attempt == 1:
                    continue
                raise self._unreachable(exc) from exc
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise self._unreachable(exc) from exc
            if response.will_close:
                self.close()
            return RawResponse(response.status, response.reason, dict(response.getheaders()), data)
        raise AssertionError("unreachable")  # pragma: no cover

    def _stream(
        self, path: str, query: dict[str, str], timeout: float | None
    ) -> Iterator[dict[str, Any]]:
        deadline = None if timeout is None else time.monotonic() + timeout
        # Idle watches get a bookmark every 15 s, so reading with the client timeout (30 s by
        # default) notices a dead node without cutting off a quiet but healthy stream.
        read_timeout = self.timeout if deadline is None else min(self.timeout, timeout or 0.0)
        conn = self._connect(max(read_timeout, 0.001))
        headers = {**self._headers, "Accept": "application/x-ndjson"}
        try:
            try:
                conn.request("GET", self._target(path, query), headers=headers)
                response = conn.getresponse()
            except TimeoutError as exc:
                if deadline is not None and time.monotonic() >= deadline - 0.001:
                    raise TimeoutError(f"watch on {path} timed out") from exc
                raise self._unreachable(exc) from exc
            except (OSError, http.client.HTTPException) as exc:
                raise self._unreachable(exc) from exc
            if response.status >= 400:
                raise _status_error(response.status, response.reason, response.read(), self.server)
            pending = b""  # the start of a line whose end has not arrived yet
            while True:
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(f"watch on {path} timed out")
                    if conn.sock is not None:
                        conn.sock.settimeout(min(remaining, self.timeout))
                try:
                    chunk = response.read1(65536)
                except TimeoutError as exc:
                    if deadline is not None and time.monotonic() >= deadline - 0.001:
                        raise TimeoutError(f"watch on {path} timed out") from exc
                    raise ApiError(
                        0,
                        "Timeout",
                        f"the watch on {self.server} went silent for {self.timeout:g}s",
                    ) from exc
                except (OSError, http.client.HTTPException) as exc:
                    raise self._unreachable(exc) from exc
                if not chunk:
                    return
                if b"\n" not in chunk:
                    pending += chunk
                    if len(pending) > _MAX_LINE:
                        raise ApiError(
                            0, "BadResponse", f"the node at {self.server} sent a huge watch line"
                        )
                    continue
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    if line.strip():
                        yield _watch_line(line, self.server)
        finally:
            conn.close()

    def _unreachable(self, exc: BaseException) -> ApiError:
        if isinstance(exc, ConnectionRefusedError):
            why = "connection refused"
        elif isinstance(exc, TimeoutError):
            why = f"no answer within {self.timeout:g}s"
        elif isinstance(exc, socket.gaierror):
            why = f"cannot resolve host {self._host!r}"
        elif isinstance(exc, http.client.RemoteDisconnected | ConnectionResetError):
            why = "the connection was closed before an answer"
        elif isinstance(exc, OSError) and exc.strerror:
            why = exc.strerror[0].lower() + exc.strerror[1:]
        else:
            why = str(exc) or type(exc).__name__
        return ApiError(0, "Unreachable", f"cannot reach node at {self.server}: {why}")

    @staticmethod
    def _items(body: Any) -> Items:
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise ApiError(0, "BadResponse", "the node answered without a list of items")
        return items

    @staticmethod
    def _dict(body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ApiError(0, "BadResponse", "the node answered with something not an object")
        return body


def _event_query(kind: str | None, name: str | None) -> dict[str, str]:
    query: dict[str, str] = {}
    if kind is not None:
        query["kind"] = kind
    if name is not None:
        query["name"] = name
    return query


def _watch_line(line: bytes, server: str) -> dict[str, Any]:
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ApiError(
            0, "BadResponse", f"the node at {server} sent a watch line not JSON"
        ) from exc
    if not isinstance(event, dict):
        raise ApiError(0, "BadResponse", f"the node at {server} sent a watch line not an object")
    return event


def _status_error(code: int, reason: str, data: bytes, server: str) -> ApiError:
    """An ``ApiError`` from a failure answer, using its ``Status`` body when it has one."""
    try:
        status = orjson.loads(data) if data else None
    except orjson.JSONDecodeError:
        status = None
    if code == 401:
        # The node says no more than that; say which node and what to check.
        return ApiError(
            401,
            "Unauthorized",
            f"the node at {server} refused the token (401 Unauthorized); "
            "check the token of the context in use",
        )
    if isinstance(status, dict) and isinstance(status.get("message"), str):
        details = status.get("details")
        return ApiError(
            int(status.get("code") or code),
            str(status.get("reason") or reason),
            status["message"],
            details if isinstance(details, dict) else None,
        )
    message = f"the node at {server} answered {code} {reason}"
    return ApiError(code, reason.replace(" ", ""), message)
