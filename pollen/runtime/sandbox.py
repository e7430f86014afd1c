"""Run one instance of a compiled module, with limits, and turn every failure into a type.

A ``Sandbox`` is a module linked and pre-instantiated once (``InstancePre``); ``run()`` makes a
fresh ``Store`` and instance for every invocation, so nothing leaks from one request to the
next. Each store gets:

- a memory limit (``Store.set_limits``): ``memory.grow`` past it fails, as ``malloc`` does;
- an epoch deadline: the wall-clock timeout, checked by compiled code at every loop edge;
- optional fuel: an instruction budget, when the engine counts fuel;
- WASI with no ambient authority: no preopened directory, no inherited environment, argv,
  stdin or socket; only the ``args`` and ``env`` the Workload declares. Stdin, stdout and
  stderr are Pollen's own (``abi.define_stdio``): bytes in memory, on the calling thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import wasmtime

from pollen.resources.models import ResourceRequirements
from pollen.runtime import abi, capi
from pollen.runtime.engine import Engine, _first_line
from pollen.runtime.errors import (
    FuelExhausted,
    InstanceTrapped,
    InvalidModule,
    LinkError,
    MemoryLimitExceeded,
    MissingExport,
    MissingImport,
    Overloaded,
    SandboxError,
    Timeout,
)

WASI_MODULES = frozenset({"wasi_snapshot_preview1"})
MIB = 1024 * 1024
#: A failure with linear memory within this much of the limit counts as out of memory:
#: the allocation that failed was at most this large (see ``_near_limit``).
OOM_MARGIN_FRACTION = 0.125
OOM_MARGIN_MIN = 2 * MIB

OutputSink = Callable[[bytes], None]
_NO_ENV = capi.Environ(capi.Strings(), capi.Strings())


@dataclass(frozen=True)
class Limits:
    """What one invocation may use."""

    memory_bytes: int = 64 * MIB
    timeout_ms: int = 30_000
    #: Instruction budget; only enforced when the engine was made with ``fuel=True``.
    fuel: int | None = None
    #: Most stdout kept when it is captured (HTTP responses); more fails the write.
    max_output_bytes: int = 16 * MIB

    @classmethod
    def from_resources(cls, resources: ResourceRequirements, **overrides: int) -> Limits:
        """Limits from a Workload's ``resources`` (``memoryMB``, ``timeoutMs``)."""
        values: dict[str, int | None] = {
            "memory_bytes": resources.memory_mb * MIB,
            "timeout_ms": resources.timeout_ms,
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class RunResult:
    """How one invocation ended when it ended by itself (or by ``proc_exit``)."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    #: Linear memory at the end, in bytes: the peak, since wasm memory never shrinks.
    memory_bytes: int
    cpu_seconds: float
    wall_seconds: float
    stdout_truncated: bool = False


class _Capture:
    """Where fd 1 or fd 2 goes: kept (up to ``limit`` bytes) or forwarded to a sink.

    Returns how many bytes it took: once the limit is reached a write is refused, so the
    module sees a failed write rather than the runtime buffering without bound.
    """

    __slots__ = ("buffer", "limit", "sink", "truncated")

    def __init__(self, limit: int, sink: OutputSink | None = None) -> None:
        self.buffer = bytearray()
        self.limit = limit
        self.sink = sink
        self.truncated = False

    def __call__(self, data: bytes) -> int:
        if self.sink is not None:
            self.sink(data)
            return len(data)
        room = self.limit - len(self.buffer)
        if len(data) <= room:
            self.buffer += data
            return len(data)
        self.truncated = True
        self.buffer += data[: max(room, 0)]
        return max(room, 0)


def _near_limit(used: int, limit: int) -> bool:
    """Whether an instance that failed with ``used`` bytes of memory most likely failed
    because ``memory.grow`` was refused.

    The C API gives no signal when the limiter refuses a grow; the allocator just sees
    failure and the program aborts (a trap) or exits. An allocation of up to the margin
    could have been the one refused, so a failure that close to the limit is reported as
    running out of memory, with the trap kept in the message.
    """
    margin = max(OOM_MARGIN_MIN, int(limit * OOM_MARGIN_FRACTION))
    return used + margin >= limit


class Sandbox:
    """A compiled module, checked and linked, ready for fresh instances on any thread."""

    def __init__(self, engine: Engine, module: wasmtime.Module, *, name: str) -> None:
        self.engine = engine
        self.module = module
        self.name = name
        self._label = f'workload "{name}"'
        self._check_exports()
        self._pre = self._link()
        # Raw addresses for ``capi``; ``self._pre`` and the engine keep them alive.
        self._pre_address = capi.address(self._pre.ptr())
        self._engine_address = capi.address(engine.wasmtime.ptr())
        self._argv_cache: dict[tuple[str, ...], capi.Strings] = {}

    def _check_exports(self) -> None:
        exports = {export.name: export.type for export in self.module.exports}
        start = exports.get("_start")
        if not isinstance(start, wasmtime.FuncType):
            raise MissingExport(
                f"{self._label} exports no _start function: Pollen runs WASI command "
                "modules (a C or Zig program with a main function)",
                workload=self.name,
            )
        if start.params or start.results:
            raise MissingExport(
                f"{self._label} exports _start with the wrong type: it must take and "
                "return nothing",
                workload=self.name,
            )
        uses_host = any(imp.module == abi.MODULE for imp in self.module.imports)
        if uses_host and not isinstance(exports.get("memory"), wasmtime.MemoryType):
            raise MissingExport(
                f"{self._label} imports from pollen but exports no memory for the host to "
                "read and write",
                workload=self.name,
            )

    def _link(self) -> wasmtime.InstancePre:
        missing = []
        for imp in self.module.imports:
            module, field = imp.module, imp.name or ""
            known = (module in WASI_MODULES) or (
                module == abi.MODULE and field in abi.HOST_FUNCTIONS
            )
            if not known:
                missing.append(f"{module}.{field}")
        if missing:
            listed = ", ".join(missing[:5]) + (" and more" if len(missing) > 5 else "")
            raise MissingImport(
                f"{self._label} imports {listed}, which Pollen does not provide (it offers "
                "wasi_snapshot_preview1 and pollen.log/call/call_status)",
                missing=tuple(missing),
                workload=self.name,
            )
        try:
            return self.engine.linker.instantiate_pre(self.module)
        except wasmtime.WasmtimeError as exc:
            text = _first_line(str(exc))
            if "unknown import" in text:
                raise MissingImport(
                    f"{self._label} has an import that Pollen does not provide: {text}",
                    workload=self.name,
                ) from None
            raise LinkError(f"{self._label} cannot be linked: {text}", workload=self.name) from None

    def run(
        self,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | capi.Environ | None = None,
        stdin: bytes = b"",
        limits: Limits | None = None,
        stdout: OutputSink | None = None,
        stderr: OutputSink | None = None,
        host: abi.HostContext | None = None,
    ) -> RunResult:
        """Instantiate the module in a fresh store and run ``_start`` to the end.

        ``env`` is a mapping, or one encoded ahead (``capi.Environ``, what the http
        executor passes). ``stdout``/``stderr`` given: output is streamed there (on this
        thread, as the module writes it); otherwise it is captured (stdout up to
        ``limits.max_output_bytes``, stderr up to 1 MiB). Returns a ``RunResult`` for a
        module that returned or called ``proc_exit``; raises ``Timeout``,
        ``MemoryLimitExceeded``, ``InstanceTrapped`` or ``FuelExhausted`` otherwise.
        """
        limits = limits or Limits()
        engine = self.engine
        out = _Capture(limits.max_output_bytes, stdout)
        err = _Capture(MIB, stderr)
        context = host or abi.HostContext(workload=self.name)
        context.stdout, context.stderr = out, err
        context.stdin, context.stdin_offset = bytes(stdin), 0
        argv = self._argv(tuple(args))
        if not isinstance(env, capi.Environ):
            env = capi.Environ.of(env) if env else _NO_ENV
        fuel = None
        if engine.config.fuel:
            fuel = limits.fuel if limits.fuel is not None else (1 << 63) - 1
        started = time.perf_counter()
        cpu_started = time.thread_time()
        store = capi.Store(self._engine_address)
        memory_bytes = 0
        try:
            store.limit(limits.memory_bytes, engine.deadline_ticks(limits.timeout_ms), fuel)
            store.set_wasi(argv, env)
            try:
                with abi.active(context):
                    store.instantiate(self._pre_address)
                    context.memory = store.memory
                    store.call_start()
                exit_code = 0
            except wasmtime.ExitTrap as exc:
                exit_code = exc.code
            except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
                memory_bytes = store.memory_bytes()
                error = self._classify(exc, store.instantiated, memory_bytes, limits)
                error.memory_bytes = memory_bytes
                error.cpu_seconds = time.thread_time() - cpu_started
                raise error from None
            finally:
                context.memory = None
            memory_bytes = store.memory_bytes()
        finally:
            # Close now, on this thread: it frees the instance's memory (or returns its slot
            # to the pool) at once rather than whenever the garbage collector gets to it.
            store.close()
        return RunResult(
            exit_code=exit_code,
            stdout=bytes(out.buffer),
            stderr=bytes(err.buffer),
            memory_bytes=memory_bytes,
            cpu_seconds=time.thread_time() - cpu_started,
            wall_seconds=time.perf_counter() - started,
            stdout_truncated=out.truncated,
        )

    def _argv(self, args: tuple[str, ...]) -> capi.Strings:
        """``argv`` for these arguments, encoded once: executors pass the same each time."""
        cached = self._argv_cache.get(args)
        if cached is None:
            cached = capi.Strings([self.name, *args])
            if len(self._argv_cache) < 64:
                self._argv_cache[args] = cached
        return cached

    def _classify(
        self,
        exc: Exception,
        instantiated: bool,
        memory_bytes: int,
        limits: Limits,
    ) -> SandboxError:
        label = self._label
        detail = _first_line(str(exc))
        if not instantiated and "concurrent limit" in detail:
            # The pooling allocator's slots are all taken (engine.pooling_instances).
            return Overloaded(
                f"{label} cannot start another instance: the node runs as many as it may "
                f"at once ({detail})",
                workload=self.name,
            )
        code = exc.trap_code if isinstance(exc, wasmtime.Trap) else None
        if code is wasmtime.TrapCode.INTERRUPT:
            return Timeout(
                f"{label} ran past its {limits.timeout_ms} ms timeout and was stopped",
                workload=self.name,
            )
        if code is wasmtime.TrapCode.OUT_OF_FUEL:
            return FuelExhausted(
                f"{label} used up its fuel of {limits.fuel} and was stopped", workload=self.name
            )
        limit_mb = limits.memory_bytes / MIB
        if not instantiated and "exceeds memory limits" in detail:
            return MemoryLimitExceeded(
                f"{label} needs more memory at start than its limit of {limit_mb:g} MiB ({detail})",
                limit=limits.memory_bytes,
                workload=self.name,
            )
        reason = _trap_reason(exc, detail)
        if instantiated and _near_limit(memory_bytes, limits.memory_bytes):
            return MemoryLimitExceeded(
                f"{label} ran out of memory at its limit of {limit_mb:g} MiB "
                f"(it had {memory_bytes / MIB:.1f} MiB, then {reason})",
                limit=limits.memory_bytes,
                used=memory_bytes,
                workload=self.name,
            )
        if not instantiated and not isinstance(exc, wasmtime.Trap):
            return InvalidModule(f"{label} could not be instantiated: {detail}", workload=self.name)
        return InstanceTrapped(
            f"{label} trapped: {reason}",
            trap_code=code.name.lower() if code is not None else None,
            workload=self.name,
        )


def _trap_reason(exc: Exception, detail: str) -> str:
    """The trap's own words ("wasm `unreachable` instruction executed"), without backtrace."""
    text = str(exc)
    marker = "wasm trap: "
    if marker in text:
        return text.split(marker, 1)[1].strip().splitlines()[0]
    return detail
