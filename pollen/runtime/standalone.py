"""``pollen run``: one module in the node's sandbox, with no cluster. The author's loop.

``--executor http`` serves the module on ``127.0.0.1:PORT`` with the runtime's HTTP front end
(``httpserver``), one fresh instance per request, exactly as a node's gateway would.
``--executor command`` runs it once, passes its stdout and stderr through, and exits with its
exit status.

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

from pollen.resources.models import Executor, ResourceRequirements, WorkloadSpec
from pollen.runtime.errors import MemoryLimitExceeded, SandboxError, Timeout
from pollen.runtime.executors import HttpExecutor, RestartPolicy
from pollen.runtime.httpserver import HttpServer, ServerLimits
from pollen.runtime.logs import LogBuffer, LogLine
from pollen.runtime.runtime import Runtime

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


async def serve_http(
    executor: HttpExecutor,
    host: str,
    port: int,
    *,
    announce: Announce = _stderr,
    stop: asyncio.Event | None = None,
    limits: ServerLimits | None = None,
    reuse_port: bool = False,
) -> None:
    """Serve ``executor`` on ``host:port`` until ``stop`` is set (or SIGINT/SIGTERM).

    ``reuse_port``: listen with ``SO_REUSEPORT``, beside the other worker processes of
    ``pollen run --workers``.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    # Every path and method goes to the one workload: no router in the way.
    server = HttpServer(executor.dispatch, limits=limits)
    try:
        bound = await server.start(host, port, reuse_port=reuse_port)
        announce(f'Serving workload "{executor.name}" at http://{host}:{bound}/ (Ctrl-C to stop)')
        await stop.wait()
    finally:
        await server.close()
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
    workers: int = 1,
) -> int:
    """Serve ``path`` as an http workload until interrupted; return the exit status.

    ``workers`` above 1 serves from that many worker processes on one port, supervised by
    this one (``pollen.runtime.workers``); 1 serves from this process.
    """
    spec = make_spec(
        path, Executor.HTTP, env=env or {}, args=args, memory_mb=memory_mb, timeout_ms=timeout_ms
    )
    name = _workload_name(path)
    if workers > 1:
        # Imported here: the supervisor never loads wasmtime, and the single-process path
        # does not need it.
        from pollen.runtime.workers import WorkerConfig, supervise

        config = WorkerConfig(
            path=str(path),
            name=name,
            host=host,
            port=port,
            env=dict(spec.env),
            args=list(spec.args),
            memory_mb=memory_mb,
            timeout_ms=timeout_ms,
            cache_dir=str(cache_dir) if cache_dir is not None else None,
            queue_size=queue_size,
        )
        return supervise(config, workers, announce=announce)
    return serve_one(
        path,
        name,
        spec,
        host=host,
        port=port,
        cache_dir=cache_dir,
        queue_size=queue_size,
        announce=announce,
    )


def serve_one(
    path: Path,
    name: str,
    spec: WorkloadSpec,
    *,
    host: str,
    port: int,
    cache_dir: Path | None,
    queue_size: int,
    announce: Announce = _stderr,
    digest: str | None = None,
    reuse_port: bool = False,
    on_stop: Callable[[asyncio.Event], None] | None = None,
) -> int:
    """Load ``path`` and serve it from this process until interrupted (``pollen run`` with
    one worker, and each worker process of several); return the exit status.

    ``digest``, when given, must match the file (it changed on disk otherwise): every worker
    serves the bytes the first one loaded. ``on_stop`` is called with the stop event from
    the running loop, for a caller to set it (a worker watching its supervisor).
    """
    with Runtime(cache_dir=cache_dir, queue_size=queue_size) as runtime:
        try:
            sandbox = runtime.load(path.read_bytes(), name=name, digest=digest)
        except SandboxError as exc:
            return _load_error(exc)
        except OSError as exc:
            _stderr(f"error: cannot read {path}: {exc.strerror or exc}")
            return EXIT_LOAD_FAILED
        logs = LogBuffer(on_line=_print_line(name))
        # This process serves one workload and other processes use the other cores: fast
        # requests run on the loop's thread rather than through a pool thread (ADR 0018).
        executor = runtime.http_executor(name, sandbox, spec, logs=logs, inline=True)

        async def serve() -> None:
            event = asyncio.Event()
            if on_stop is not None:
                on_stop(event)
            await serve_http(
                executor, host, port, announce=announce, stop=event, reuse_port=reuse_port
            )

        try:
            asyncio.run(serve())
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
