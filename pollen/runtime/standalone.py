"""``pollen run``: one module in the node's sandbox, with no cluster. The author's loop.

``--executor http`` serves the module on ``127.0.0.1:PORT`` with aiohttp, one fresh instance
per request, exactly as a node's gateway would. ``--executor command`` runs it once, passes
its stdout and stderr through, and exits with its exit status.

Exit status of ``pollen run`` itself when the module cannot finish normally: 2 when it cannot
be loaded (not WebAssembly, a missing import or export), 124 when it timed out (as
``timeout(1)`` does), 137 when it ran out of memory, 134 for any other trap.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from aiohttp import web
from multidict import CIMultiDict

from pollen.resources.models import Executor, ResourceRequirements, WorkloadSpec
from pollen.runtime.errors import MemoryLimitExceeded, SandboxError, Timeout
from pollen.runtime.executors import HttpExecutor, RestartPolicy
from pollen.runtime.logs import LogBuffer, LogLine
from pollen.runtime.runtime import Runtime
from pollen.runtime.wagi import HttpRequest

EXIT_LOAD_FAILED = 2
EXIT_TIMEOUT = 124
EXIT_TRAPPED = 134
EXIT_OUT_OF_MEMORY = 137

Announce = Callable[[str], None]


def default_cache_dir() -> Path:
    """``$POLLEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/pollen/modules``, else
    ``~/.cache/pollen/modules``."""
    explicit = os.environ.get("POLLEN_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pollen" / "modules"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _print_line(name: str) -> Callable[[LogLine], None]:
    def show(line: LogLine) -> None:
        tag = f"{line.stream}" + (f" {line.level}" if line.level else "")
        _stderr(f"[{name} {tag}] {line.text}")

    return show


def make_spec(
    path: Path,
    executor: Executor,
    *,
    env: Mapping[str, str],
    args: Sequence[str],
    memory_mb: int | None,
    timeout_ms: int | None,
) -> WorkloadSpec:
    """The Workload spec ``pollen run`` uses: validated like one from a manifest."""
    resources: dict[str, int] = {}
    if memory_mb is not None:
        resources["memoryMB"] = memory_mb
    if timeout_ms is not None:
        resources["timeoutMs"] = timeout_ms
    return WorkloadSpec(
        artifact=path.name,
        executor=executor,
        env=dict(env),
        args=list(args),
        resources=ResourceRequirements.model_validate(resources),
    )


def to_request(request: web.BaseRequest, body: bytes, port: int) -> HttpRequest:
    """An aiohttp request as the runtime's ``HttpRequest``."""
    # Both raw: CGI wants QUERY_STRING as sent (aiohttp's ``query_string`` is decoded).
    raw_path, _, raw_query = request.raw_path.partition("?")
    host = request.host.rsplit(":", 1)[0] if request.host else "127.0.0.1"
    return HttpRequest(
        method=request.method,
        path=raw_path or "/",
        query=raw_query,
        headers=tuple(request.headers.items()),
        body=body,
        scheme=request.scheme,
        server_name=host,
        server_port=port,
        remote_addr=request.remote or "",
        protocol=f"HTTP/{request.version.major}.{request.version.minor}",
    )


async def serve_http(
    executor: HttpExecutor,
    host: str,
    port: int,
    *,
    announce: Announce = _stderr,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve ``executor`` on ``host:port`` until ``stop`` is set (or SIGINT/SIGTERM)."""
    bound_port = port

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            return web.Response(status=413, text=f"{exc.text}\n")
        response = await executor.handle(to_request(request, body, bound_port))
        return web.Response(
            status=response.status, headers=CIMultiDict(response.headers), body=response.body
        )

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    # The low-level server: one handler for every path and method, no router in the way.
    runner = web.ServerRunner(web.Server(handle), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        for address in runner.addresses:
            if isinstance(address, tuple):
                bound_port = int(address[1])
                break
        announce(
            f'Serving workload "{executor.name}" at http://{host}:{bound_port}/ (Ctrl-C to stop)'
        )
        await stop.wait()
    finally:
        await runner.cleanup()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


def _load_error(exc: SandboxError) -> int:
    _stderr(f"error: {exc}")
    return EXIT_LOAD_FAILED


def run_http(
    path: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    memory_mb: int | None = None,
    timeout_ms: int | None = None,
    cache_dir: Path | None = None,
    queue_size: int = 64,
    announce: Announce = _stderr,
) -> int:
    """Serve ``path`` as an http workload until interrupted; return the exit status."""
    spec = make_spec(
        path, Executor.HTTP, env=env or {}, args=args, memory_mb=memory_mb, timeout_ms=timeout_ms
    )
    name = _workload_name(path)
    with Runtime(cache_dir=cache_dir, queue_size=queue_size) as runtime:
        try:
            sandbox = runtime.load_file(path, name=name)
        except SandboxError as exc:
            return _load_error(exc)
        logs = LogBuffer(on_line=_print_line(name))
        executor = runtime.http_executor(name, sandbox, spec, logs=logs)
        try:
            asyncio.run(serve_http(executor, host, port, announce=announce))
        except OSError as exc:
            _stderr(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}")
            return 1
    return 0


def run_command(
    path: Path,
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    memory_mb: int | None = None,
    timeout_ms: int | None = None,
    cache_dir: Path | None = None,
) -> int:
    """Run ``path`` once as a command, output passed through; return its exit status."""
    spec = make_spec(
        path,
        Executor.COMMAND,
        env=env or {},
        args=args,
        memory_mb=memory_mb,
        timeout_ms=timeout_ms,
    )
    name = _workload_name(path)
    stdout = sys.stdout.buffer
    stderr = sys.stderr.buffer

    def out(data: bytes) -> None:
        stdout.write(data)
        stdout.flush()

    def err(data: bytes) -> None:
        stderr.write(data)
        stderr.flush()

    def host_log(line: LogLine) -> None:
        if line.stream == "log":
            _stderr(f"[{name} {line.level}] {line.text}")

    with Runtime(cache_dir=cache_dir) as runtime:
        try:
            sandbox = runtime.load_file(path, name=name)
        except SandboxError as exc:
            return _load_error(exc)
        job = runtime.command_executor(
            name,
            sandbox,
            spec,
            restart=RestartPolicy.NEVER,
            logs=LogBuffer(on_line=host_log),
            stdout=out,
            stderr=err,
        )
        result = job.run_once()
    error = result.error
    if error is None:
        code = result.exit_code if result.exit_code is not None else 1
        return code if 0 <= code <= 255 else 1
    _stderr(f"error: {error}")
    if isinstance(error, Timeout):
        return EXIT_TIMEOUT
    if isinstance(error, MemoryLimitExceeded):
        return EXIT_OUT_OF_MEMORY
    return EXIT_TRAPPED


def _workload_name(path: Path) -> str:
    """A workload name from a file name: ``Hello_World.wasm`` -> ``hello-world``."""
    stem = "".join(c if c.isalnum() else "-" for c in path.stem.lower()).strip("-")
    return stem or "module"
