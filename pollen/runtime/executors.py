"""The two executors: ``http`` (WAGI, a fresh instance per request) and ``command`` (a job).

``HttpExecutor.invoke`` serves one request on the calling thread and raises a typed error when
the workload fails; ``handle`` is the asyncio entry point: it queues the request on the
executor's worker pool (503 at once when the queue is full) and turns every failure into an
HTTP answer, so the server in front never sees an exception from a workload.

``CommandExecutor`` runs a WASI program to completion on a thread of its own, keeps its exit
code and its output as logs, and restarts it by policy with exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from enum import StrEnum

from pollen.runtime import abi, capi
from pollen.runtime.errors import (
    ExitedWithError,
    MalformedResponse,
    SandboxError,
    Unavailable,
)
from pollen.runtime.inline import InlineRunner
from pollen.runtime.logs import LogBuffer
from pollen.runtime.pool import WorkerPool
from pollen.runtime.sandbox import Limits, OutputSink, RunResult, Sandbox
from pollen.runtime.telemetry import UsageCounters
from pollen.runtime.wagi import (
    CGI_VARIABLES,
    SERVER_VARIABLES,
    CgiTemplate,
    HttpRequest,
    HttpResponse,
    cgi_environ,
    header_variables,
    parse_cgi_output,
    request_values,
)

log = logging.getLogger(__name__)


def failure_response(error: SandboxError) -> HttpResponse:
    """The HTTP answer for a request that ended with ``error``."""
    extra: tuple[tuple[str, str], ...] = ()
    if isinstance(error, Unavailable):
        extra = (("Retry-After", "1"),)
    return HttpResponse.failure(error.http_status, str(error), extra)


#: Encoded parts of CGI environments kept per executor (``HttpExecutor.environ``).
_ENVIRON_CACHE_ENTRIES = 64


def _remember(
    cache: dict[tuple[str, ...], capi.Strings], key: tuple[str, ...], value: capi.Strings
) -> None:
    # Clients choose header names: a bounded cache, emptied when full, cannot be grown by them.
    if len(cache) >= _ENVIRON_CACHE_ENTRIES:
        cache.clear()
    cache[key] = value


class _InFlight:
    """Counts requests being served, so that draining can wait for them."""

    def __init__(self) -> None:
        self._count = 0
        self._cond = threading.Condition()

    def __enter__(self) -> None:
        with self._cond:
            self._count += 1

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._count -= 1
            if self._count == 0:
                self._cond.notify_all()

    @property
    def count(self) -> int:
        with self._cond:
            return self._count

    def wait_idle(self, timeout: float | None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._count == 0, timeout)


class HttpExecutor:
    """Serve HTTP requests with a WAGI module: a fresh instance for each.

    ``pool`` defaults to one of its own, sized to the cores: a workload that spins can only
    occupy its own workers, and the OS shares the cores between pools, so one rogue workload
    cannot take every worker of the node.
    """

    def __init__(
        self,
        name: str,
        sandbox: Sandbox,
        *,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        limits: Limits | None = None,
        pool: WorkerPool | None = None,
        router: abi.CallRouter | None = None,
        usage: UsageCounters | None = None,
        logs: LogBuffer | None = None,
        inline: bool = False,
    ) -> None:
        self.name = name
        self.sandbox = sandbox
        self.env = dict(env or {})
        self.args = tuple(args)
        self.limits = limits or Limits()
        self._own_pool = pool is None
        self.pool = pool or WorkerPool(name=f"http-{name}")
        self.router = router
        self.usage = usage or UsageCounters()
        self.logs = logs or LogBuffer()
        self.accepting = True
        self.last_error: SandboxError | None = None
        self._inflight = _InFlight()
        #: With ``inline``, requests run on the event loop's thread while the module proves
        #: fast (``pollen run``'s processes, ADR 0018); the pool serves the rest.
        self.inline: InlineRunner[HttpResponse] | None = None
        if inline:
            self.inline = InlineRunner(
                self.pool, self._refused, capacity=self.pool.queue_size + self.pool.workers
            )
        # The CGI environment is encoded in parts (``capi.Strings.plus``): the Workload's env
        # once; the names, and the values that depend only on where a request arrived, once
        # per combination seen; a request encodes only its own values. That is a few µs
        # rather than the 45 of encoding every variable for every request.
        self._cgi = CgiTemplate(self.env)
        self._names: dict[tuple[str, ...], capi.Strings] = {}
        self._server_values: dict[tuple[str, ...], capi.Strings] = {}

    def environ(self, request: HttpRequest) -> capi.Environ:
        """The CGI environment of ``request``, encoded for the sandbox: the same variables
        as ``cgi_environ(request, self.env)``. Raises ``BadRequest`` for a bad path."""
        headers = header_variables(request)
        if self._cgi.shadows(headers):
            return capi.Environ.of(cgi_environ(request, self.env))
        values = request_values(request)
        header_names = tuple(headers)
        names = self._names.get(header_names)
        if names is None:
            names = capi.Strings([*self._cgi.fixed, *CGI_VARIABLES, *header_names])
            _remember(self._names, header_names, names)
        server = tuple(values[:SERVER_VARIABLES])
        prefix = self._server_values.get(server)
        if prefix is None:
            prefix = capi.Strings([*self._cgi.fixed.values(), *server])
            _remember(self._server_values, server, prefix)
        own = values[SERVER_VARIABLES:]
        if headers:
            own += headers.values()
        return capi.Environ(names, prefix.plus(own))

    def _log(self, level: int, text: str) -> None:
        self.logs.log(abi.LOG_LEVEL_NAMES.get(level, "info"), text)

    def invoke(self, request: HttpRequest, *, depth: int = 0) -> HttpResponse:
        """Serve ``request`` on this thread. Raises ``SandboxError`` when the workload fails.

        ``depth`` counts nested ``pollen.call``s (0 for a request from outside).
        """
        if not self.accepting:
            raise Unavailable(f'workload "{self.name}" is not taking requests', workload=self.name)
        with self._inflight:
            self.usage.request()
            try:
                return self._invoke(request, depth)
            except SandboxError as exc:
                self.usage.error(exc.reason)
                self.last_error = exc
                raise

    def _invoke(self, request: HttpRequest, depth: int) -> HttpResponse:
        env = self.environ(request)
        host = abi.HostContext(workload=self.name, depth=depth, router=self.router, log=self._log)
        self.usage.instance_started()
        result: RunResult | None = None
        try:
            result = self.sandbox.run(
                args=self.args, env=env, stdin=request.body, limits=self.limits, host=host
            )
        except SandboxError as exc:
            self.usage.instance_ended(exc.memory_bytes, exc.cpu_seconds)
            raise
        self.usage.instance_ended(result.memory_bytes, result.cpu_seconds)
        if result.stderr:
            self.logs.write("stderr", result.stderr)
            self.logs.flush()
        if result.stdout_truncated:
            raise MalformedResponse(
                f'workload "{self.name}" wrote a response larger than '
                f"{self.limits.max_output_bytes} bytes",
                workload=self.name,
            )
        try:
            response = parse_cgi_output(result.stdout, workload=self.name)
        except MalformedResponse:
            if result.exit_code != 0:
                raise ExitedWithError(
                    f'workload "{self.name}" exited with status {result.exit_code} before '
                    "writing a whole response",
                    exit_code=result.exit_code,
                    workload=self.name,
                ) from None
            raise
        if result.exit_code != 0:
            # The response stands (the module chose it), but the exit status is noted.
            self.usage.error(ExitedWithError.reason)
        return response

    def respond(self, request: HttpRequest) -> HttpResponse:
        """``invoke``, with failures turned into HTTP answers (503, 504, 500, ...)."""
        try:
            return self.invoke(request)
        except SandboxError as exc:
            return failure_response(exc)

    def submit(self, request: HttpRequest) -> Future[HttpResponse]:
        """Queue ``request`` on the pool; raises ``Overloaded`` at once when it is full."""
        if not self.accepting:
            raise Unavailable(f'workload "{self.name}" is not taking requests', workload=self.name)
        return self.pool.submit(lambda: self.respond(request))

    def dispatch(self, request: HttpRequest) -> asyncio.Future[HttpResponse]:
        """Queue ``request`` from the running event loop; the future always ends with a
        response (503 at once when the queue is full). No task per request, and results
        reach the loop in batches (``WorkerPool.submit_async``): what the HTTP front end
        (``httpserver``) calls."""
        try:
            if not self.accepting:
                raise Unavailable(
                    f'workload "{self.name}" is not taking requests', workload=self.name
                )
            if self.inline is not None:
                return self.inline.submit(lambda: self.respond(request))
            return self.pool.submit_async(lambda: self.respond(request))
        except SandboxError as exc:
            future: asyncio.Future[HttpResponse] = asyncio.get_running_loop().create_future()
            future.set_result(self._refused(exc))
            return future

    def _refused(self, error: SandboxError) -> HttpResponse:
        """The answer to a request refused before it ran (a full queue, a draining
        executor), counted as an error of the workload."""
        self.usage.error(error.reason)
        return failure_response(error)

    async def handle(self, request: HttpRequest) -> HttpResponse:
        """Serve ``request`` from asyncio; always returns a response."""
        return await self.dispatch(request)

    @property
    def in_flight(self) -> int:
        """Requests being served now."""
        return self._inflight.count

    def drain(self, timeout: float | None = None) -> bool:
        """Take no new requests and wait for the ones in flight; True if they all finished.

        Every request ends within its ``timeoutMs`` (plus one epoch tick), so a timeout of
        ``limits.timeout_ms`` and a little more always suffices.
        """
        self.accepting = False
        return self._inflight.wait_idle(timeout)

    def close(self) -> None:
        """Drain and stop the executor's own worker threads."""
        self.drain(self.limits.timeout_ms / 1000 + 1)
        if self._own_pool:
            self.pool.close()


class RestartPolicy(StrEnum):
    """When a finished command job runs again (as in a Kubernetes Pod's ``restartPolicy``)."""

    NEVER = "Never"
    ON_FAILURE = "OnFailure"
    ALWAYS = "Always"


@dataclass(frozen=True)
class Backoff:
    """Delay before restart number ``n`` of a job that keeps ending quickly:
    ``initial * factor ** (n - 1)``, at most ``maximum``. A run that lasted ``reset_after``
    seconds or more starts the count again."""

    initial: float = 1.0
    factor: float = 2.0
    maximum: float = 60.0
    reset_after: float = 60.0

    def delay(self, restarts: int) -> float:
        """Seconds to wait before the ``restarts``-th quick restart in a row (1-based)."""
        if restarts <= 0:
            return 0.0
        return float(min(self.maximum, self.initial * self.factor ** (restarts - 1)))


class JobState(StrEnum):
    """Where a command job is."""

    IDLE = "Idle"
    RUNNING = "Running"
    BACKOFF = "BackOff"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    STOPPED = "Stopped"


@dataclass(frozen=True)
class CommandResult:
    """How one run of a command job ended."""

    exit_code: int | None
    error: SandboxError | None
    started: float
    ended: float
    memory_bytes: int = 0
    cpu_seconds: float = 0.0

    @property
    def succeeded(self) -> bool:
        """Exited with status 0."""
        return self.error is None and self.exit_code == 0

    @property
    def duration(self) -> float:
        """Wall-clock seconds of the run."""
        return self.ended - self.started

    def describe(self) -> str:
        """One sentence on how the run ended."""
        if self.error is not None:
            return str(self.error)
        return f"exited with status {self.exit_code} after {self.duration:.3f} s"


class CommandExecutor:
    """Run a WASI program to completion, keep its exit code and logs, restart it by policy."""

    def __init__(
        self,
        name: str,
        sandbox: Sandbox,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        limits: Limits | None = None,
        restart: RestartPolicy = RestartPolicy.ON_FAILURE,
        backoff: Backoff | None = None,
        max_restarts: int | None = None,
        router: abi.CallRouter | None = None,
        usage: UsageCounters | None = None,
        logs: LogBuffer | None = None,
        stdout: OutputSink | None = None,
        stderr: OutputSink | None = None,
    ) -> None:
        self.name = name
        self.sandbox = sandbox
        self.args = tuple(args)
        self.env = dict(env or {})
        self.limits = limits or Limits()
        self.restart = restart
        self.backoff = backoff or Backoff()
        self.max_restarts = max_restarts
        self.router = router
        self.usage = usage or UsageCounters()
        self.logs = logs or LogBuffer()
        self._extra_stdout = stdout
        self._extra_stderr = stderr
        self.state = JobState.IDLE
        self.runs = 0
        self.restarts = 0
        self.last_result: CommandResult | None = None
        self.results: list[CommandResult] = []
        # One thread for the job: a long run must not hold a worker that requests need.
        self._pool = WorkerPool(workers=1, queue_size=0, name=f"job-{name}")
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def _sink(self, stream: str, extra: OutputSink | None) -> OutputSink:
        write = self.logs.writer(stream)
        if extra is None:
            return write

        def both(data: bytes) -> None:
            write(data)
            extra(data)

        return both

    def _log(self, level: int, text: str) -> None:
        self.logs.log(abi.LOG_LEVEL_NAMES.get(level, "info"), text)

    def run_once(self) -> CommandResult:
        """Run the program once on this thread and return how it ended (never raises for a
        workload failure: the error is in the result)."""
        started = time.time()
        self.runs += 1
        self.usage.request()
        self.usage.instance_started()
        host = abi.HostContext(workload=self.name, router=self.router, log=self._log)
        try:
            result = self.sandbox.run(
                args=self.args,
                env=self.env,
                limits=self.limits,
                stdout=self._sink("stdout", self._extra_stdout),
                stderr=self._sink("stderr", self._extra_stderr),
                host=host,
            )
        except SandboxError as exc:
            self.usage.instance_ended(exc.memory_bytes, exc.cpu_seconds)
            self.usage.error(exc.reason)
            outcome = CommandResult(
                None, exc, started, time.time(), exc.memory_bytes, exc.cpu_seconds
            )
        else:
            self.usage.instance_ended(result.memory_bytes, result.cpu_seconds)
            if result.exit_code != 0:
                self.usage.error("ExitStatus")
            outcome = CommandResult(
                result.exit_code,
                None,
                started,
                time.time(),
                result.memory_bytes,
                result.cpu_seconds,
            )
        self.logs.flush()
        self.logs.log("info", f"run {self.runs} {outcome.describe()}", stream="system")
        self.last_result = outcome
        self.results = [*self.results[-99:], outcome]
        return outcome

    def _should_restart(self, result: CommandResult) -> bool:
        if self._stop.is_set():
            return False
        if self.max_restarts is not None and self.restarts >= self.max_restarts:
            return False
        if self.restart is RestartPolicy.ALWAYS:
            return True
        return self.restart is RestartPolicy.ON_FAILURE and not result.succeeded

    async def run(self) -> CommandResult:
        """Run the job, restarting it by policy, until it is done or ``stop()`` is called.

        Returns the last run's result. The state ends as ``Succeeded``, ``Failed`` or
        ``Stopped``.
        """
        self._loop = asyncio.get_running_loop()
        quick_restarts = 0
        while True:
            self.state = JobState.RUNNING
            result = await asyncio.wrap_future(self._pool.submit(self.run_once))
            if not self._should_restart(result):
                break
            quick_restarts = 0 if result.duration >= self.backoff.reset_after else quick_restarts
            quick_restarts += 1
            delay = self.backoff.delay(quick_restarts)
            self.state = JobState.BACKOFF
            self.logs.log("info", f"restarting in {delay:.1f} s", stream="system")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            if self._stop.is_set():
                break
            self.restarts += 1
        if self._stop.is_set():
            self.state = JobState.STOPPED
        else:
            self.state = JobState.SUCCEEDED if result.succeeded else JobState.FAILED
        return result

    def stop(self) -> None:
        """No more restarts. A run in progress still ends by itself or by its timeout.

        Safe from any thread: an ``asyncio.Event`` is only set from its loop's thread.
        """
        loop = self._loop
        if loop is None or loop.is_closed():
            self._stop.set()
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._stop.set()
        else:
            loop.call_soon_threadsafe(self._stop.set)

    @property
    def stopping(self) -> bool:
        """Whether ``stop`` was called."""
        return self._stop.is_set()

    def close(self) -> None:
        """Stop, and release the job's thread once the current run has ended."""
        self.stop()
        self._pool.close(wait=True, timeout=self.limits.timeout_ms / 1000 + 1)
