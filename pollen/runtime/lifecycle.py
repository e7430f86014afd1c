"""An instance's life on a node: Pending, Fetching, Starting, Ready, Draining, Stopped, Failed.

``InstanceLifecycle`` is the state machine alone (pure, no I/O): it refuses transitions that
make no sense and keeps the reason and message of the last one, which become the Replica's
``Ready`` condition. ``WorkloadInstance`` drives it: compile and link through the runtime,
start the executor, probe the health path, serve, drain, stop; every failure on the way lands
as ``Failed`` with the error's reason and one-sentence message.

Usage counters and node telemetry live in ``telemetry.py`` and are re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from pollen.resources.models import (
    Condition,
    ConditionStatus,
    Executor,
    ReplicaPhase,
    WorkloadSpec,
)
from pollen.runtime.errors import SandboxError
from pollen.runtime.executors import (
    Backoff,
    CommandExecutor,
    CommandResult,
    HttpExecutor,
    RestartPolicy,
)
from pollen.runtime.logs import LogBuffer
from pollen.runtime.runtime import Runtime
from pollen.runtime.telemetry import (
    NodeTelemetry,
    UsageCounters,
    UsageSnapshot,
    node_telemetry,
)
from pollen.runtime.wagi import HttpRequest, HttpResponse

__all__ = [
    "TRANSITIONS",
    "HealthResult",
    "IllegalTransition",
    "InstanceLifecycle",
    "NodeTelemetry",
    "PhaseChange",
    "UsageCounters",
    "UsageSnapshot",
    "WorkloadInstance",
    "check_health",
    "node_telemetry",
]

log = logging.getLogger(__name__)

Phase = ReplicaPhase

#: Allowed moves. Failed may go back to Pending (a retry); Stopped is final.
TRANSITIONS: dict[ReplicaPhase, frozenset[ReplicaPhase]] = {
    Phase.PENDING: frozenset({Phase.FETCHING, Phase.STARTING, Phase.FAILED, Phase.STOPPED}),
    Phase.FETCHING: frozenset({Phase.STARTING, Phase.FAILED, Phase.STOPPED}),
    Phase.STARTING: frozenset({Phase.READY, Phase.DRAINING, Phase.FAILED, Phase.STOPPED}),
    Phase.READY: frozenset({Phase.DRAINING, Phase.FAILED, Phase.STOPPED}),
    Phase.DRAINING: frozenset({Phase.STOPPED, Phase.FAILED}),
    Phase.FAILED: frozenset({Phase.PENDING, Phase.STOPPED}),
    Phase.STOPPED: frozenset(),
}


class IllegalTransition(ValueError):
    """A phase change the state machine does not allow (Stopped -> Ready, say)."""


@dataclass(frozen=True)
class PhaseChange:
    """One move of the state machine."""

    phase: ReplicaPhase
    previous: ReplicaPhase | None
    reason: str
    message: str
    at: float

    def timestamp(self) -> str:
        """``at`` as an RFC 3339 timestamp, as conditions carry it."""
        return datetime.fromtimestamp(self.at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class InstanceLifecycle:
    """The phase of one instance slot, with its history. Not thread-safe: drive it from one
    thread (the node's event loop)."""

    def __init__(
        self,
        on_change: Callable[[PhaseChange], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self.on_change = on_change
        self.current = PhaseChange(Phase.PENDING, None, "Created", "", clock())
        self.history: deque[PhaseChange] = deque([self.current], maxlen=32)

    @property
    def phase(self) -> ReplicaPhase:
        """The phase now."""
        return self.current.phase

    def can(self, phase: ReplicaPhase) -> bool:
        """Whether moving to ``phase`` is allowed now."""
        return phase in TRANSITIONS[self.phase]

    def to(self, phase: ReplicaPhase, reason: str = "", message: str = "") -> PhaseChange:
        """Move to ``phase``; raises ``IllegalTransition`` when it is not allowed."""
        if not self.can(phase):
            raise IllegalTransition(f"an instance cannot go from {self.phase} to {phase}")
        change = PhaseChange(phase, self.phase, reason or str(phase), message, self._clock())
        self.current = change
        self.history.append(change)
        if self.on_change is not None:
            self.on_change(change)
        return change

    def ready_condition(self, observed_generation: int | None = None) -> Condition:
        """The Replica's ``Ready`` condition for the phase now."""
        ready = self.phase is Phase.READY
        return Condition(
            type="Ready",
            status=ConditionStatus.TRUE if ready else ConditionStatus.FALSE,
            reason=self.current.reason,
            message=self.current.message,
            last_transition_time=self.current.timestamp(),
            observed_generation=observed_generation,
        )


@dataclass(frozen=True)
class HealthResult:
    """The outcome of one health probe."""

    healthy: bool
    status: int
    message: str


async def check_health(executor: HttpExecutor, path: str) -> HealthResult:
    """GET ``path`` through ``executor``; any 2xx or 3xx answer is healthy."""
    target, _, query = path.partition("?")
    response = await executor.handle(
        HttpRequest(method="GET", path=target, query=query, headers=(("User-Agent", "pollen"),))
    )
    healthy = 200 <= response.status < 400
    message = (
        f"health check GET {path} answered {response.status}"
        if response.error is None
        else response.error
    )
    return HealthResult(healthy, response.status, message)


class WorkloadInstance:
    """One instance slot of a Workload on this node: its executor, phase, usage and logs.

    Drive it from the node's event loop: ``fetching()`` while the artifact comes,
    ``await start(wasm)``, then ``await handle(request)`` (http) while it is Ready, and
    ``await stop()`` to drain it. ``on_change`` hears every phase change.
    """

    def __init__(
        self,
        runtime: Runtime,
        name: str,
        spec: WorkloadSpec,
        *,
        on_change: Callable[[PhaseChange], None] | None = None,
        restart: RestartPolicy = RestartPolicy.ON_FAILURE,
        backoff: Backoff | None = None,
        health_timeout: float = 10.0,
        health_interval: float = 0.1,
    ) -> None:
        self.runtime = runtime
        self.name = name
        self.spec = spec
        self.lifecycle = InstanceLifecycle(on_change)
        self.usage = UsageCounters()
        self.logs = LogBuffer()
        self.restart = restart
        self.backoff = backoff
        self.health_timeout = health_timeout
        self.health_interval = health_interval
        self.executor: HttpExecutor | CommandExecutor | None = None
        self._job: asyncio.Task[CommandResult] | None = None

    @property
    def phase(self) -> ReplicaPhase:
        """The phase now."""
        return self.lifecycle.phase

    def fetching(self) -> None:
        """The artifact is being fetched."""
        self.lifecycle.to(Phase.FETCHING, "Fetching", "fetching the artifact")

    def _fail(self, reason: str, message: str) -> None:
        if self.lifecycle.can(Phase.FAILED):
            self.lifecycle.to(Phase.FAILED, reason, message)

    async def start(self, wasm: bytes, *, digest: str | None = None) -> ReplicaPhase:
        """Compile, link and start; return the phase reached (Ready, or Failed)."""
        self.lifecycle.to(Phase.STARTING, "Starting", "compiling and linking the module")
        try:
            # Compiling takes milliseconds to seconds: keep it off the event loop.
            sandbox = await asyncio.to_thread(
                self.runtime.load, wasm, name=self.name, digest=digest
            )
        except SandboxError as exc:
            self._fail(exc.reason, str(exc))
            return self.phase
        if self.spec.executor is Executor.HTTP:
            http = self.runtime.http_executor(
                self.name, sandbox, self.spec, usage=self.usage, logs=self.logs
            )
            self.executor = http
            if self.spec.health_path and not await self._wait_healthy(http, self.spec.health_path):
                return self.phase
            if self.lifecycle.can(Phase.READY):
                self.lifecycle.to(Phase.READY, "Ready", "serving requests")
        else:
            job = self.runtime.command_executor(
                self.name,
                sandbox,
                self.spec,
                restart=self.restart,
                backoff=self.backoff,
                usage=self.usage,
                logs=self.logs,
            )
            self.executor = job
            self.lifecycle.to(Phase.READY, "Running", "the job is running")
            self._job = asyncio.create_task(self._supervise(job))
        return self.phase

    async def _wait_healthy(self, executor: HttpExecutor, path: str) -> bool:
        deadline = time.monotonic() + self.health_timeout
        while True:
            result = await check_health(executor, path)
            if result.healthy:
                return True
            if time.monotonic() >= deadline:
                self._fail("HealthCheckFailed", result.message)
                await asyncio.to_thread(executor.close)
                self.runtime.forget(executor)
                return False
            await asyncio.sleep(self.health_interval)

    async def _supervise(self, job: CommandExecutor) -> CommandResult:
        result = await job.run()
        if self.phase in (Phase.DRAINING, Phase.STOPPED):
            return result
        if result.succeeded:
            self.lifecycle.to(Phase.STOPPED, "Completed", result.describe())
        else:
            reason = result.error.reason if result.error is not None else "ExitStatus"
            self._fail(reason, result.describe())
        return result

    async def probe(self) -> HealthResult:
        """Probe the health path now (http with ``healthPath`` only; otherwise healthy while
        Ready)."""
        executor = self.executor
        if isinstance(executor, HttpExecutor) and self.spec.health_path:
            return await check_health(executor, self.spec.health_path)
        ready = self.phase is Phase.READY
        return HealthResult(ready, 200 if ready else 503, f"the instance is {self.phase}")

    async def handle(self, request: HttpRequest) -> HttpResponse:
        """Serve an HTTP request; 503 unless Ready."""
        executor = self.executor
        if self.phase is not Phase.READY or not isinstance(executor, HttpExecutor):
            return HttpResponse.failure(
                503, f'workload "{self.name}" is {self.phase}, not Ready', (("Retry-After", "1"),)
            )
        return await executor.handle(request)

    async def stop(self, grace: float | None = None) -> None:
        """Drain (no new requests, in-flight ones finish) and stop. A command job gets
        ``grace`` seconds (default: its timeout) to end its current run."""
        if self.phase is Phase.STOPPED:
            return
        if self.lifecycle.can(Phase.DRAINING):
            self.lifecycle.to(Phase.DRAINING, "Draining", "finishing requests in flight")
        executor = self.executor
        if isinstance(executor, HttpExecutor):
            await asyncio.to_thread(executor.close)
            self.runtime.forget(executor)
        elif isinstance(executor, CommandExecutor):
            executor.stop()
            if self._job is not None:
                wait = grace if grace is not None else executor.limits.timeout_ms / 1000 + 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._job), wait)
            await asyncio.to_thread(executor.close)
            self.runtime.forget(executor)
        if self.lifecycle.can(Phase.STOPPED):
            self.lifecycle.to(Phase.STOPPED, "Stopped", "stopped on request")
