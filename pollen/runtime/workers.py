"""``pollen run --workers N``: one module served by N worker processes on one port.

A request's Python (the HTTP front end, the CGI environment, the WAGI response, the host
functions) runs under its process's GIL, while wasm itself releases it. One process therefore
tops out at about one core of Python however many threads it has (ADR 0010); N processes,
each with its own GIL, use N cores, as gunicorn's or nginx's worker processes do.

- **Workers are fresh interpreters** (``python -m pollen.runtime.workers``, started by
  ``subprocess``, which forks and at once execs): each makes its own wasmtime engine, epoch
  ticker thread, module cache and HTTP server. Nothing that has threads is ever forked, and
  this supervisor never makes an engine.
- **One port, ``SO_REUSEPORT``**: every worker listens on the port with its own socket, and
  the kernel spreads new connections over their accept queues by a hash of the connection.
  One listening socket inherited by every worker balances worse on Linux: each waiting
  worker is woken for a new connection, and asyncio's accept loop takes every connection
  that is queued at that moment, so one worker took all 16 of wrk's keep-alive connections
  and the other none (ADR 0013). The supervisor first checks that the port is free (so that
  it never joins another program's group) and then holds it, bound but not listening, so
  that it stays ours while a worker restarts; a socket that does not listen gets no
  connections.
- **Startup**: worker 0 starts first and compiles the module (writing the on-disk cache
  entry); the others then start from that entry. A worker that cannot load the module exits
  with status 2 before it is ready; the supervisor then stops the others and exits 2 itself,
  with the worker's one-sentence error on stderr: no restart loop. Every worker checks the
  file's digest against the one the supervisor read, so all serve the same bytes.
- **Supervision**: a worker that dies is restarted after a delay that doubles with each
  quick death (0.25 s up to 30 s, reset after 30 s of life). SIGINT and SIGTERM stop
  everything: each worker gets SIGTERM (it may still be importing, and the default action
  of SIGTERM ends it quietly where SIGINT would print a traceback), finishes the answers in
  flight and exits; stragglers are killed after a grace period.
- **Lifeline**: each worker holds one end of a socket pair whose other end only the
  supervisor has. If the supervisor dies (even by SIGKILL), the worker reads end-of-file and
  stops: no orphans keep the port.
- **Logs**: workers inherit stdout and stderr, so the workload's stderr and ``pollen.log``
  lines from every worker reach the terminal, a line at a time.

Memory: each worker is a whole runtime (interpreter, engine, compiled module, pooled
instance slots): about 60 MB resident each for the examples here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_LOAD_FAILED = 2

#: Restart delays: ``RESTART_INITIAL * 2 ** (n - 1)`` for the n-th quick death in a row, at
#: most ``RESTART_MAX``; a worker that lived ``RESTART_RESET_AFTER`` seconds starts over.
RESTART_INITIAL = 0.25
RESTART_MAX = 30.0
RESTART_RESET_AFTER = 30.0
#: How long workers get to finish the answers in flight after SIGTERM, beyond the
#: workload's own timeout, before they are killed.
STOP_GRACE = 10.0

_READY = b"ready\n"

Announce = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker needs to serve the module: passed to it as JSON."""

    path: str
    name: str
    host: str
    port: int
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    memory_mb: int | None = None
    timeout_ms: int | None = None
    cache_dir: str | None = None
    queue_size: int = 64
    #: ``sha256:<hex>`` of the file as the supervisor read it; every worker checks it.
    digest: str = ""

    def to_json(self) -> str:
        """The config as one JSON argument."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        """The config a supervisor passed."""
        return cls(**json.loads(text))


def restart_delay(quick_deaths: int) -> float:
    """Seconds before restarting a worker after its ``quick_deaths``-th quick death in a row."""
    if quick_deaths <= 0:
        return 0.0
    return float(min(RESTART_MAX, RESTART_INITIAL * 2 ** (quick_deaths - 1)))


def describe_exit(code: int) -> str:
    """``exited with status 3`` or ``was killed by SIGKILL``, from a return code."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with status {code}"


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) to ``host:port`` with ``SO_REUSEPORT``, for the
    workers to join; port 0 picks a free port. Raises ``OSError`` when the port is taken.

    The port is first bound without ``SO_REUSEPORT``: that fails if anything listens there,
    even another program's ``SO_REUSEPORT`` group, which would otherwise be joined silently
    and share its connections with us.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        chosen = int(probe.getsockname()[1])
    holder = socket.socket(family, kind, proto)
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((address[0], chosen, *address[2:]))
    except BaseException:
        holder.close()
        raise
    return holder


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process
    control: asyncio.StreamReader
    lifeline: asyncio.StreamWriter

    @property
    def pid(self) -> int:
        return int(self.process.pid)


class Supervisor:
    """Start ``count`` workers for ``config``, keep them running, stop them on a signal."""

    def __init__(self, config: WorkerConfig, count: int, *, announce: Announce = _stderr) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        self.config = config
        self.count = count
        self.announce = announce
        self.status = EXIT_OK
        self._live: dict[int, _Worker] = {}
        self._ready: set[int] = set()
        self._announced = False
        self._stopping = asyncio.Event()
        self._first_ready = asyncio.Event()
        self._forced = False

    async def run(self) -> int:
        """Serve until SIGINT/SIGTERM or a fatal worker failure; return the exit status."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stopping.set)
        slots = [asyncio.create_task(self._slot(0), name="pollen-worker-0")]
        try:
            # The others start once worker 0 has compiled the module and cached it on disk.
            await _first_of(self._first_ready, self._stopping)
            if not self._stopping.is_set():
                slots += [
                    asyncio.create_task(self._slot(index), name=f"pollen-worker-{index}")
                    for index in range(1, self.count)
                ]
            await self._stopping.wait()
            await self._stop_workers()
            await asyncio.gather(*slots, return_exceptions=True)
        finally:
            for slot in slots:
                slot.cancel()
            for worker in self._live.values():  # only if something above failed
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        if self._forced and self.status == EXIT_OK:
            self.status = EXIT_FAILED
        return self.status

    def _fail(self, status: int) -> None:
        if not self._stopping.is_set():
            self.status = status
            self._stopping.set()

    async def _spawn(self, index: int) -> _Worker:
        ours, theirs = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "pollen.runtime.workers",
                self.config.to_json(),
                str(theirs.fileno()),
                str(index),
                stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                # Its own process group: Ctrl-C at the terminal reaches the supervisor only,
                # which stops the workers in order (see ``_stop_workers``).
                process_group=0,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the worker's copy is the only one: EOF when it dies
        reader, writer = await asyncio.open_connection(sock=ours)
        return _Worker(index, process, reader, writer)

    async def _slot(self, index: int) -> None:
        """Keep worker ``index`` running until the supervisor stops."""
        loop = asyncio.get_running_loop()
        quick_deaths = 0
        while not self._stopping.is_set():
            worker = await self._spawn(index)
            self._live[index] = worker
            if self._stopping.is_set():  # the stop came while it was being started
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGTERM)
            started = loop.time()
            ready = await worker.control.readline() == _READY  # b"" when it died first
            if ready:
                self._became_ready(index)
            code = await worker.process.wait()
            del self._live[index]
            worker.lifeline.close()
            if self._stopping.is_set():
                return
            if not ready and (code == EXIT_LOAD_FAILED or not self._first_ready.is_set()):
                # It cannot load the module (its error is on stderr), or the very first
                # worker never got going: another start would only fail the same way.
                self._fail(code if code > 0 else EXIT_FAILED)
                return
            if loop.time() - started >= RESTART_RESET_AFTER:
                quick_deaths = 0
            quick_deaths += 1
            delay = restart_delay(quick_deaths)
            _stderr(
                f"pollen run: worker {index} (pid {worker.pid}) {describe_exit(code)}; "
                f"restarting it in {delay:g} s"
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    def _became_ready(self, index: int) -> None:
        self._ready.add(index)
        if index == 0:
            self._first_ready.set()
        if not self._announced and len(self._ready) == self.count:
            self._announced = True
            config = self.config
            self.announce(
                f'Serving workload "{config.name}" at http://{config.host}:{config.port}/ '
                "(Ctrl-C to stop)"
            )

    async def _stop_workers(self) -> None:
        """SIGTERM to every worker; SIGKILL to those still there after the grace period."""
        for worker in list(self._live.values()):
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        grace = STOP_GRACE + (self.config.timeout_ms or 30_000) / 1000
        waiting = [worker.process.wait() for worker in self._live.values()]
        if not waiting:
            return
        _, pending = await asyncio.wait(
            [asyncio.ensure_future(wait) for wait in waiting], timeout=grace
        )
        if pending:
            self._forced = True
            for worker in list(self._live.values()):
                if worker.process.returncode is None:
                    _stderr(
                        f"pollen run: worker {worker.index} (pid {worker.pid}) did not stop "
                        f"within {grace:g} s; killing it"
                    )
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.kill()
            await asyncio.wait(pending)


async def _first_of(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of the file at ``path``."""
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def supervise(config: WorkerConfig, count: int, *, announce: Announce = _stderr) -> int:
    """Serve ``config`` from ``count`` worker processes until SIGINT/SIGTERM; return the exit
    status: 0 after a requested stop, 2 when the module cannot be loaded, 1 when the port
    cannot be had or a worker had to be killed."""
    path = Path(config.path)
    try:
        digest = file_digest(path)
    except OSError as exc:
        _stderr(f"error: cannot read {path}: {exc.strerror or exc}")
        return EXIT_LOAD_FAILED
    try:
        holder = reserve_port(config.host, config.port)
    except OSError as exc:
        _stderr(f"error: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}")
        return EXIT_FAILED
    with holder:
        port = int(holder.getsockname()[1])
        bound = WorkerConfig(**{**asdict(config), "port": port, "digest": digest})
        return asyncio.run(Supervisor(bound, count, announce=announce).run())


def worker_main(argv: list[str]) -> int:
    """One worker: ``CONFIG_JSON LIFELINE_FD INDEX``; serve until SIGTERM or the lifeline
    closes; return the exit status (2 when the module cannot be loaded)."""
    config = WorkerConfig.from_json(argv[0])
    lifeline = socket.socket(fileno=int(argv[1]))
    # Imported here, in the worker only: this is where wasmtime's engine is made.
    from pollen.resources.models import Executor
    from pollen.runtime.standalone import make_spec, serve_one

    path = Path(config.path)
    spec = make_spec(
        path,
        Executor.HTTP,
        env=config.env,
        args=config.args,
        memory_mb=config.memory_mb,
        timeout_ms=config.timeout_ms,
    )

    def ready(_line: str) -> None:
        lifeline.sendall(_READY)

    def watch(stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()

        def readable() -> None:
            # The supervisor never writes: readable means it is gone.
            with contextlib.suppress(OSError):
                if lifeline.recv(64):
                    return
            loop.remove_reader(lifeline.fileno())
            stop.set()

        loop.add_reader(lifeline.fileno(), readable)

    try:
        return serve_one(
            path,
            config.name,
            spec,
            host=config.host,
            port=config.port,
            cache_dir=Path(config.cache_dir) if config.cache_dir else None,
            queue_size=config.queue_size,
            announce=ready,
            digest=config.digest or None,
            reuse_port=True,
            on_stop=watch,
        )
    finally:
        lifeline.close()


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
