"""The HTTP/1.1 front end: real sockets on 127.0.0.1, real modules behind it, hostile input."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pollen.runtime.executors import HttpExecutor
from pollen.runtime.httpserver import HttpServer, ServerLimits
from pollen.runtime.runtime import Runtime
from pollen.runtime.sandbox import MIB, Limits
from pollen.runtime.wagi import HttpRequest, HttpResponse
from tests.helpers import wait_for

Handler = Callable[[HttpRequest], object]


class Served:
    """An ``HttpServer`` on its own event loop thread, for blocking clients in tests."""

    def __init__(self, handler: Handler, limits: ServerLimits | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = HttpServer(handler, limits=limits)  # type: ignore[arg-type]
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.port = self.call(self.server.start("127.0.0.1", 0))

    def call(self, coroutine: object) -> int:
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)  # type: ignore[arg-type]
        result: int = future.result(timeout=30)
        return result

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(grace=1), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        self.loop.close()


def _echo(request: HttpRequest) -> HttpResponse:
    body = f"{request.method} {request.path}?{request.query} {len(request.body)}\n".encode()
    return HttpResponse(
        status=200,
        headers=(("Content-Type", "text/plain"), ("X-Host", request.server_name)),
        body=body + request.body,
    )


@pytest.fixture
def echo_server() -> Iterator[Served]:
    served = Served(_echo, ServerLimits(max_body_bytes=1000))
    try:
        yield served
    finally:
        served.close()


class Reader:
    """Reads HTTP/1.1 responses (Content-Length framed, as the server sends) off a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def response(self, head: bool = False) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise EOFError(f"connection closed; got {self.buffer!r}")
        raw_head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = raw_head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if head else int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            if not self._fill():
                raise EOFError("connection closed in a body")
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return status, headers, body

    def closed(self) -> bool:
        """Whether the server closed the connection (after what is buffered)."""
        try:
            return not self._fill()
        except ConnectionResetError:
            return True


def _get(path: str = "/", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: example.test:8080\r\n{extra}\r\n".encode()


def test_keep_alive_serves_many_on_one_connection(echo_server: Served) -> None:
    with echo_server.connect() as sock:
        reader = Reader(sock)
        for k in range(3):
            sock.sendall(_get(f"/a%20b/{k}?x=1&y"))
            status, headers, body = reader.response()
            assert status == 200
            assert body == f"GET /a%20b/{k}?x=1&y 0\n".encode()
            assert headers["x-host"] == "example.test"
            assert "connection" not in headers
            assert "date" in headers


def test_http10_closes_unless_asked(echo_server: Served) -> None:
    with echo_server.connect() as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        reader = Reader(sock)
        status, headers, _ = reader.response()
        assert status == 200
        assert headers["connection"] == "close"
        assert reader.closed()
    with echo_server.connect() as sock:
        sock.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" * 2)
        reader = Reader(sock)
        assert reader.response()[1]["connection"] == "keep-alive"
        assert reader.response()[0] == 200


def test_bodies_by_length_and_chunked(echo_server: Served) -> None:
    with echo_server.connect() as sock:
        reader = Reader(sock)
        sock.sendall(b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello")
        assert reader.response()[2] == b"POST /p? 5\nhello"
        sock.sendall(
            b"PUT /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
        )
        assert reader.response()[2] == b"PUT /c? 7\nabcdefg"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1001\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"200\r\n"
        + b"x" * 512
        + b"\r\n"
        + b"200\r\n"
        + b"x" * 512
        + b"\r\n0\r\n\r\n",
    ],
    ids=["content-length", "chunked"],
)
def test_body_cap_is_413_and_close(echo_server: Served, request_bytes: bytes) -> None:
    with echo_server.connect() as sock:
        sock.sendall(request_bytes)
        reader = Reader(sock)
        status, headers, _ = reader.response()
        assert status == 413
        assert headers["connection"] == "close"
        assert reader.closed()


def test_expect_continue(echo_server: Served) -> None:
    with echo_server.connect() as sock:
        sock.sendall(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
        )
        reader = Reader(sock)
        assert reader.response(head=True)[0] == 100
        sock.sendall(b"abc")
        status, _, body = reader.response()
        assert (status, body) == (200, b"POST /? 3\nabc")


def test_head_has_length_but_no_body(echo_server: Served) -> None:
    with echo_server.connect() as sock:
        sock.sendall(b"HEAD /x HTTP/1.1\r\nHost: h\r\n\r\n" + _get("/after"))
        reader = Reader(sock)
        status, headers, body = reader.response(head=True)
        assert status == 200
        assert headers["content-length"] == str(len(b"HEAD /x? 0\n"))
        assert body == b""
        assert reader.response()[2] == b"GET /after? 0\n"


def test_pipelined_answers_keep_their_order() -> None:
    """The first request is answered last by the handler; the wire order stays."""
    loop_futures: list[asyncio.Future[HttpResponse]] = []

    def handler(request: HttpRequest) -> asyncio.Future[HttpResponse]:
        future: asyncio.Future[HttpResponse] = asyncio.get_running_loop().create_future()
        loop_futures.append(future)
        if len(loop_futures) == 2:
            for k, pending in reversed(list(enumerate(loop_futures))):
                pending.set_result(HttpResponse(body=f"{k}".encode()))
        return future

    served = Served(handler)
    try:
        with served.connect() as sock:
            sock.sendall(_get("/0") + _get("/1"))
            reader = Reader(sock)
            assert reader.response()[2] == b"0"
            assert reader.response()[2] == b"1"
    finally:
        served.close()


def test_handler_failures_are_500_and_serving_goes_on() -> None:
    def handler(request: HttpRequest) -> object:
        if request.path == "/sync":
            raise RuntimeError("boom")
        if request.path == "/async":

            async def fail() -> HttpResponse:
                raise RuntimeError("boom")

            return fail()
        return HttpResponse(body=b"fine")

    served = Served(handler)
    try:
        with served.connect() as sock:
            reader = Reader(sock)
            for path in ("/sync", "/async"):
                sock.sendall(_get(path))
                assert reader.response()[0] == 500
            sock.sendall(_get("/"))
            assert reader.response()[2] == b"fine"
    finally:
        served.close()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431),
    ],
    ids=["garbage", "no-colon", "two-lengths", "long-url", "many-headers"],
)
def test_bad_requests(echo_server: Served, request_bytes: bytes, status: int) -> None:
    with echo_server.connect() as sock:
        sock.sendall(request_bytes)
        reader = Reader(sock)
        assert reader.response()[0] == status
        assert reader.closed()
    with echo_server.connect() as sock:
        sock.sendall(_get())
        assert Reader(sock).response()[0] == 200


_TOKENS = st.sampled_from(
    (
        *(b"GET", b"POST", b"HEAD", b"G\x00T", b"", b" ", b"/", b"/x?y", b"*", b"http://h/p"),
        *(b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9.9", b"HTTP/1.1x", b"\r", b"\n", b"\r\n", b":"),
        *(b"Host", b"\xff", b"Content-Length", b"Transfer-Encoding", b"chunked", b"-1"),
        b"99999999999999999999",
    )
)
_LINES = st.lists(st.lists(_TOKENS, max_size=6).map(b" ".join), max_size=6).map(b"\r\n".join)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(head=_LINES | st.binary(max_size=200))
def test_fuzzed_heads_never_break_the_server(echo_server: Served, head: bytes) -> None:
    with echo_server.connect() as sock:
        sock.sendall(head + b"\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        reader = Reader(sock)
        try:
            while True:
                status = reader.response()[0]
                assert 100 <= status < 600
                if status >= 400:
                    assert status < 500
        except (EOFError, ConnectionResetError):
            pass  # every answer read, or none owed (an incomplete request at EOF)
    with echo_server.connect() as sock:
        sock.sendall(_get())
        assert Reader(sock).response()[0] == 200


def test_idle_connections_are_closed() -> None:
    served = Served(_echo, ServerLimits(keep_alive_timeout=0.2))
    try:
        with served.connect() as sock:
            sock.sendall(_get())
            reader = Reader(sock)
            assert reader.response()[0] == 200
            sock.settimeout(10)
            assert reader.closed()
        # A request trickled in too slowly is dropped too, and the server goes on.
        with served.connect() as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n")
            sock.settimeout(10)
            assert Reader(sock).closed()
    finally:
        served.close()


# --- with a real workload behind it -----------------------------------------------------------


def _serve_executor(executor: HttpExecutor) -> Served:
    return Served(executor.dispatch)


def test_serves_hello_and_echo(runtime: Runtime, examples: dict[str, Path]) -> None:
    hello = runtime.http_executor("hello", runtime.load_file(examples["hello"], name="hello"))
    echo = runtime.http_executor("echo", runtime.load_file(examples["echo"], name="echo"))
    for executor, check in (
        (hello, lambda body: body == b"Hello from Pollen!\n"),
        (echo, lambda body: b'"body": "payload"' in body or b'"body":"payload"' in body),
    ):
        served = _serve_executor(executor)
        try:
            with served.connect() as sock:
                reader = Reader(sock)
                for _ in range(20):
                    sock.sendall(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 7\r\n\r\npayload")
                    status, _, body = reader.response()
                    assert status == 200
                    assert check(body), body
        finally:
            served.close()


def test_half_closed_client_still_gets_its_answers(
    runtime: Runtime, examples: dict[str, Path]
) -> None:
    hello = runtime.http_executor("hello", runtime.load_file(examples["hello"], name="hello"))
    served = _serve_executor(hello)
    try:
        with served.connect() as sock:
            sock.sendall(_get() + _get())
            sock.shutdown(socket.SHUT_WR)
            reader = Reader(sock)
            assert reader.response()[2] == b"Hello from Pollen!\n"
            assert reader.response()[2] == b"Hello from Pollen!\n"
            assert reader.closed()
    finally:
        served.close()


def test_full_queue_is_503_at_once(tmp_path: Path, examples: dict[str, Path]) -> None:
    with Runtime(cache_dir=tmp_path / "cache", workers=1, queue_size=0) as runtime:
        spin = runtime.http_executor(
            "spin",
            runtime.load_file(examples["spin"], name="spin"),
            limits=Limits(memory_bytes=16 * MIB, timeout_ms=3000),
        )
        served = _serve_executor(spin)
        try:
            with served.connect() as first, served.connect() as second:
                first.sendall(_get())
                wait_for(lambda: spin.in_flight == 1, what="the spinning request to run")
                second.sendall(_get())
                second.settimeout(2.0)  # far below the 3 s the first request takes
                status, headers, _ = Reader(second).response()
                assert status == 503
                assert headers["retry-after"] == "1"
                first.settimeout(30)
                assert Reader(first).response()[0] == 504
        finally:
            served.close()


SERVE_AND_EXIT = textwrap.dedent(
    """
    import asyncio, socket, sys
    from pathlib import Path
    from pollen.runtime import Runtime
    from pollen.runtime.httpserver import HttpServer

    runtime = Runtime()
    hello = runtime.http_executor("hello", runtime.load_file(Path(sys.argv[1])))

    def client(port):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            data = b""
            for _ in range(200):
                sock.sendall(b"GET / HTTP/1.1\\r\\nHost: h\\r\\n\\r\\n")
                while data.count(b"Hello from Pollen!") < 1:
                    data += sock.recv(65536)
                data = data.split(b"Hello from Pollen!\\n", 1)[1]

    async def main():
        server = HttpServer(hello.dispatch)
        port = await server.start("127.0.0.1", 0)
        await asyncio.to_thread(client, port)
        if sys.argv[2] == "close":
            await server.close()

    asyncio.run(main())
    if sys.argv[2] == "close":
        runtime.close()
    print("done", flush=True)
    """
)


@pytest.mark.parametrize("how", ["close", "atexit"])
def test_interpreter_exits_cleanly_after_serving(
    examples: dict[str, Path], tmp_path: Path, how: str
) -> None:
    """SPEC 9 saw a Rust panic at interpreter shutdown after stdout callbacks. Serve a few
    hundred requests through the C API path, then exit with and without closing."""
    script = tmp_path / "serve_and_exit.py"
    script.write_text(SERVE_AND_EXIT)
    for _ in range(3):
        result = subprocess.run(
            [sys.executable, str(script), str(examples["hello"]), how],
            capture_output=True,
            timeout=120,
            check=False,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout == b"done\n"
        assert b"panic" not in result.stderr, result.stderr.decode()


def test_concurrent_futures_are_not_handlers() -> None:
    """Only asyncio futures and awaitables are accepted besides a response: a handler that
    returns something else is a 500, not a hang."""
    served = Served(lambda request: Future())
    try:
        with served.connect() as sock:
            sock.sendall(_get())
            assert Reader(sock).response()[0] == 500
    finally:
        served.close()
