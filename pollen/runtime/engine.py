"""One wasmtime ``Engine`` per node, with an epoch ticker for wall-clock timeouts.

wasmtime checks a store's *epoch deadline* at function entries and loop back-edges, so an
endless loop traps within one tick of its deadline without any cost per instruction (fuel
would cost ~10-30% of throughput). A daemon thread increments the engine's epoch every
``epoch_tick_ms``; a store that may run for ``timeout_ms`` gets a deadline of
``ceil(timeout_ms / tick) + 1`` ticks, so it is stopped after at least ``timeout_ms`` and at
most one tick more.

The engine also owns the one ``Linker`` every module is linked with: WASI (with nothing
inherited from the host, and Pollen's own stdio functions over WASI's) and the ``pollen``
host functions (see ``abi.py``). Host functions
defined with ``Linker.define_func`` are not tied to a store, so one linker serves every
instance on every thread.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import math
import platform
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Literal

import wasmtime

from pollen.runtime import abi, capi
from pollen.runtime.errors import InvalidModule

log = logging.getLogger(__name__)

WASMTIME_VERSION = importlib.metadata.version("wasmtime")

# The first 8 bytes of a core WebAssembly module, version 1. Components (version 0x0d) and
# anything else are refused before wasmtime sees them: wasmtime-py's ``Module()`` parses any
# bytes that do not start with NUL as WAT *text*, which must never happen to hostile input.
WASM_MAGIC = b"\x00asm\x01\x00\x00\x00"
MAX_MODULE_BYTES = 256 * 1024 * 1024
#: A pooled memory slot holds the largest memory a 32-bit module can have, so the pool
#: never caps a Workload below its ``memoryMB`` (the store's limit does that).
POOLED_MEMORY_BYTES = 4 * 1024 * 1024 * 1024
#: Memory of a freed slot kept mapped and zeroed rather than returned to the kernel: the
#: next instance's first pages then cost no page faults. Bounded by the warm slots below.
POOL_KEEP_RESIDENT_BYTES = 1024 * 1024
#: Freed slots kept warm (with their module's image) for reuse; at most this many times
#: ``POOL_KEEP_RESIDENT_BYTES`` stays resident while idle.
POOL_WARM_SLOTS = 16


@dataclass(frozen=True)
class EngineConfig:
    """How modules are compiled and interrupted. Part of the module cache key."""

    #: How often the epoch advances: the resolution of every timeout.
    epoch_tick_ms: float = 10.0
    #: Count instructions as well (``Limits.fuel``); slower, off by default.
    fuel: bool = False
    #: Largest wasm stack per instance, in bytes; deeper recursion traps.
    max_wasm_stack: int = 1 << 20
    #: Cranelift optimisation level.
    opt_level: Literal["none", "speed", "speed_and_size"] = "speed"
    #: Instances that may exist at once, allocated from wasmtime's pooling allocator
    #: (memory slots reserved once and reset for each fresh instance, ADR 0010); past it an
    #: invocation fails with ``Overloaded``. 0 allocates every instance on demand.
    pooling_instances: int = 1000

    def fingerprint(self) -> str:
        """A short hash of everything that makes compiled code differ: these options, the
        wasmtime version and the machine. Compiled modules are only reused under the same
        fingerprint (wasmtime refuses others anyway; keying by it avoids the churn)."""
        parts = asdict(self)
        parts.pop("epoch_tick_ms")  # affects only the ticker, not compiled code
        # The pool's size does not change code; whether memories are pooled might.
        parts["pooling_instances"] = self.pooling_instances > 0
        text = f"{sorted(parts.items())}|wasmtime={WASMTIME_VERSION}|{platform.machine()}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class Engine:
    """The node's wasmtime engine, its epoch ticker and its shared linker.

    Thread-safe: compile and instantiate from any thread. Call ``close()`` (or use it as a
    context manager) to stop the ticker.
    """

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        if self.config.epoch_tick_ms <= 0:
            raise ValueError("epoch_tick_ms must be positive")
        try:
            self.wasmtime = _make_engine(self.config)
        except wasmtime.WasmtimeError as exc:
            if self.config.pooling_instances <= 0:
                raise
            # The pool reserves address space up front (about 4 GiB a slot); where that is
            # refused (a low ``ulimit -v``), instances are allocated one by one instead.
            log.warning("pooling allocator unavailable, allocating on demand: %s", exc)
            self.config = replace(self.config, pooling_instances=0)
            self.wasmtime = _make_engine(self.config)
        self.fingerprint = self.config.fingerprint()
        self.linker = wasmtime.Linker(self.wasmtime)
        self.linker.define_wasi()
        capi.define_stdio(self.linker)
        abi.define_host_functions(self.linker)
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="pollen-epoch", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        # Ticks follow the monotonic clock, not a chain of sleeps: each wait overshoots a
        # little (and more on a busy machine), which would stretch every timeout by that
        # much per tick. A late wake-up catches up with as many increments as were due.
        interval = self.config.epoch_tick_ms / 1000
        start = time.monotonic()
        ticks = 0
        while True:
            due = int((time.monotonic() - start) / interval)
            while ticks < due:
                self.wasmtime.increment_epoch()
                ticks += 1
            if self._stop.wait(max(0.0, start + (ticks + 1) * interval - time.monotonic())):
                return

    def deadline_ticks(self, timeout_ms: float) -> int:
        """Epoch ticks to allow for ``timeout_ms``: the current tick may be nearly over, so
        one more, which makes the real timeout fall between ``timeout_ms`` and one tick more."""
        return max(1, math.ceil(timeout_ms / self.config.epoch_tick_ms)) + 1

    def interrupt_all(self, ticks: int) -> None:
        """Advance the epoch by ``ticks`` at once: every running instance whose deadline is
        at most that far away traps. Used at shutdown, when everything must stop."""
        for _ in range(ticks):
            self.wasmtime.increment_epoch()

    def compile(self, wasm: bytes, *, name: str = "") -> wasmtime.Module:
        """Validate and compile ``wasm`` (a binary module, never text).

        Raises ``InvalidModule`` with a one-sentence reason.
        """
        label = f'workload "{name}"' if name else "the module"
        check_binary(wasm, label=label, workload=name)
        try:
            return wasmtime.Module(self.wasmtime, bytes(wasm))
        except wasmtime.WasmtimeError as exc:
            reason = _first_line(str(exc))
            raise InvalidModule(
                f"{label} is not valid WebAssembly: {reason}", workload=name
            ) from None

    @property
    def running(self) -> bool:
        """Whether the epoch ticker runs (timeouts are only enforced while it does)."""
        return self._ticker.is_alive()

    def close(self) -> None:
        """Stop the epoch ticker. Instances still running then can no longer time out, so
        stop them first (executors' ``close``), or call ``interrupt_all``."""
        self._stop.set()
        if self._ticker.is_alive() and threading.current_thread() is not self._ticker:
            self._ticker.join(timeout=1.0)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _make_engine(config: EngineConfig) -> wasmtime.Engine:
    wt_config = wasmtime.Config()
    wt_config.epoch_interruption = True
    wt_config.consume_fuel = config.fuel
    wt_config.max_wasm_stack = config.max_wasm_stack
    wt_config.cranelift_opt_level = config.opt_level
    if config.pooling_instances > 0:
        capi.use_pooling_allocator(
            wt_config,
            instances=config.pooling_instances,
            max_memory_bytes=POOLED_MEMORY_BYTES,
            keep_resident_bytes=POOL_KEEP_RESIDENT_BYTES,
            warm_slots=POOL_WARM_SLOTS,
        )
    return wasmtime.Engine(wt_config)


def check_binary(wasm: bytes, *, label: str = "the module", workload: str = "") -> None:
    """Refuse anything that is not a core WebAssembly binary, with a clear reason."""
    if not isinstance(wasm, bytes | bytearray | memoryview):
        raise TypeError("expected the module's bytes")
    if len(wasm) > MAX_MODULE_BYTES:
        raise InvalidModule(
            f"{label} is {len(wasm)} bytes, more than the {MAX_MODULE_BYTES} allowed",
            workload=workload,
        )
    head = bytes(wasm[:8])
    if head[:4] != WASM_MAGIC[:4]:
        raise InvalidModule(
            f"{label} is not a WebAssembly binary (it does not start with \\0asm)",
            workload=workload,
        )
    if head != WASM_MAGIC:
        raise InvalidModule(
            f"{label} is not a core WebAssembly module of version 1 "
            "(components and other versions are not supported)",
            workload=workload,
        )


def _first_line(text: str) -> str:
    """wasmtime's messages span lines (backtraces, context); a condition wants one."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    # "failed to parse WebAssembly module\n\nCaused by:\n    <detail>": keep the detail too.
    if len(lines) > 2 and lines[1].lower().startswith("caused by"):
        return f"{lines[0]}: {lines[2]}"
    return lines[0]
