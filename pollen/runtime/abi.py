"""The host ABI: functions a workload may import from the module ``pollen``.

    log(level: i32, ptr: i32, len: i32)
    call(name_ptr: i32, name_len: i32, req_ptr: i32, req_len: i32,
         resp_ptr: i32, resp_cap: i32) -> i32
    call_status() -> i32

``docs/abi.md`` is the contract for authors; ``examples/include/pollen.h`` declares it in C.

The functions are defined once on the engine's linker, not per store, so they find the
instance they serve through a thread-local stack of ``HostContext``: an invocation pushes its
context before it enters wasm and pops it after, and a host function runs on the thread that
called into wasm. A nested ``call`` runs the callee on the same thread, which pushes its own
context on top: no thread is ever blocked waiting for a pool that the caller itself fills.

The same mechanism carries the instance's stdio. Pollen defines ``fd_write`` and ``fd_read``
of ``wasi_snapshot_preview1`` itself, over WASI's own (in ``capi``, as raw C callbacks):
stdout and stderr go to the context's sinks and stdin comes from the request body, all on
the calling thread. WASI's versions run
every write through wasmtime's tokio threads, and ``WasiConfig.stdout_custom`` then calls
Python from those threads: a GIL hand-off per write (throughput collapsed with three threads)
and, when wasmtime releases the callback after the interpreter began to exit, a Rust panic.
With no directory preopened, fds 0-2 are the only ones a module can have, so nothing else is
lost.

Host functions never raise. wasmtime-py hands a Python exception raised in a host function
back through one module-global slot (``wasmtime._func.LAST_EXCEPTION``), which another thread
finishing a call at the same moment could pick up; so every failure is a return code here.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import wasmtime

from pollen.runtime.errors import (
    CallDepthExceeded,
    SandboxError,
    Unavailable,
    UnknownWorkload,
)
from pollen.runtime.wagi import HttpRequest, HttpResponse

log = logging.getLogger(__name__)

MODULE = "pollen"
WASI_MODULE = "wasi_snapshot_preview1"

LOG_DEBUG = 0
LOG_INFO = 1
LOG_WARN = 2
LOG_ERROR = 3
LOG_LEVEL_NAMES = {LOG_DEBUG: "debug", LOG_INFO: "info", LOG_WARN: "warn", LOG_ERROR: "error"}

ERR_NOT_FOUND = -1
ERR_UNAVAILABLE = -2
ERR_FAILED = -3
ERR_TOO_DEEP = -4
ERR_INVALID = -5

#: Nested calls allowed below the first instance; A -> B -> A -> ... stops here.
MAX_CALL_DEPTH = 8
MAX_NAME_BYTES = 1024
MAX_REQUEST_BYTES = 16 * 1024 * 1024
MAX_LOG_BYTES = 4096

_U32 = 0xFFFFFFFF
_I32_MAX = 0x7FFFFFFF
_WORKLOAD_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

LogSink = Callable[[int, str], None]
StdioSink = Callable[[bytes], int]

# wasi_snapshot_preview1 errno values.
WASI_ESUCCESS = 0
WASI_EBADF = 8
WASI_EFAULT = 21
WASI_EFBIG = 22
WASI_EIO = 29


class CallTarget(Protocol):
    """Something that serves a request synchronously on the calling thread."""

    def invoke(self, request: HttpRequest, *, depth: int = 0) -> HttpResponse:
        """Serve ``request``; raise ``SandboxError`` when the workload fails."""
        ...


class CallRouter(Protocol):
    """Where ``pollen.call`` goes: the node implements it (locally now, over the mesh later).

    ``route_call`` runs on a worker thread, inside the calling instance's host call, and
    blocks until the answer is there. It raises ``UnknownWorkload`` for a name it cannot
    reach, ``Unavailable`` when the callee cannot take the request now, and any other
    ``SandboxError`` when the callee failed.
    """

    def route_call(self, target: str, request: HttpRequest, *, depth: int) -> HttpResponse:
        """Serve ``request`` with workload ``target``; ``depth`` counts nested calls."""
        ...


class LocalCallRouter:
    """A ``CallRouter`` over the workloads of this node, by name. Thread-safe."""

    def __init__(self) -> None:
        self._targets: dict[str, CallTarget] = {}
        self._lock = threading.Lock()

    def register(self, name: str, target: CallTarget) -> None:
        """Make ``name`` reachable; a later registration under the same name replaces it."""
        with self._lock:
            self._targets[name] = target

    def unregister(self, name: str, target: CallTarget | None = None) -> None:
        """Forget ``name`` (only if it still maps to ``target``, when given)."""
        with self._lock:
            if target is None or self._targets.get(name) is target:
                self._targets.pop(name, None)

    def names(self) -> list[str]:
        """The workloads this router reaches."""
        with self._lock:
            return sorted(self._targets)

    def route_call(self, target: str, request: HttpRequest, *, depth: int) -> HttpResponse:
        """Run ``request`` on the registered workload, inline on this thread."""
        with self._lock:
            found = self._targets.get(target)
        if found is None:
            raise UnknownWorkload(f'no workload named "{target}" runs on this node')
        return found.invoke(request, depth=depth)


@dataclass
class HostContext:
    """What the host functions need to know about the instance they serve."""

    workload: str
    depth: int = 0
    router: CallRouter | None = None
    log: LogSink | None = None
    #: HTTP status of the last successful ``call``, for ``call_status``.
    last_status: int = 0
    #: Where fd 1 and fd 2 go: each returns how many of the bytes it took.
    stdout: StdioSink | None = None
    stderr: StdioSink | None = None
    #: What fd 0 reads, and how far it has been read.
    stdin: bytes = b""
    stdin_offset: int = 0
    #: The instance's exported memory as ``capi.Store.memory`` gives it, once known:
    #: looking it up through the caller costs calls into wasmtime per host call.
    memory: Any = None


_local = threading.local()


def current() -> HostContext | None:
    """The context of the instance running on this thread, if any."""
    stack: list[HostContext] | None = getattr(_local, "stack", None)
    return stack[-1] if stack else None


@contextmanager
def active(context: HostContext) -> Iterator[HostContext]:
    """Make ``context`` the current one on this thread for the duration of the block."""
    stack: list[HostContext] | None = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(context)
    try:
        yield context
    finally:
        stack.pop()


def _memory(caller: wasmtime.Caller) -> wasmtime.Memory | None:
    item = caller.get("memory")
    return item if isinstance(item, wasmtime.Memory) else None


def _read(caller: wasmtime.Caller, ptr: int, length: int) -> bytes | None:
    """``length`` bytes of the caller's memory at ``ptr``, or None when out of bounds.

    i32 arguments arrive as signed Python ints: an address above 2 GiB is negative until
    masked. ``Memory.read`` takes slice bounds and would silently clamp (or count from the
    end for a negative start), so bounds are checked here first.
    """
    memory = _memory(caller)
    if memory is None:
        return None
    ptr &= _U32
    length &= _U32
    if ptr + length > memory.data_len(caller):
        return None
    return bytes(memory.read(caller, ptr, ptr + length))


def _host_log(caller: wasmtime.Caller, level: int, ptr: int, length: int) -> None:
    try:
        context = current()
        data = _read(caller, ptr, min(length & _U32, MAX_LOG_BYTES))
        if context is None or data is None:
            return
        text = data.decode("utf-8", errors="replace").rstrip("\n")
        level = min(max(level, LOG_DEBUG), LOG_ERROR)
        if context.log is not None:
            context.log(level, text)
        else:
            log.log(_PY_LEVELS[level], "[%s] %s", context.workload, text)
    except Exception:  # a host function must never raise: see the module docstring
        log.exception("pollen.log failed")


_PY_LEVELS = {
    LOG_DEBUG: logging.DEBUG,
    LOG_INFO: logging.INFO,
    LOG_WARN: logging.WARNING,
    LOG_ERROR: logging.ERROR,
}


def parse_call_name(name: str) -> tuple[str, str, str] | None:
    """``"echo/a/b?x=1"`` -> ``("echo", "/a/b", "x=1")``; None when the workload name is bad."""
    target_path, _, query = name.partition("?")
    target, slash, rest = target_path.partition("/")
    if not target or len(target) > 253 or not _WORKLOAD_RE.match(target):
        return None
    return target, "/" + rest if slash else "/", query


def _host_call(
    caller: wasmtime.Caller,
    name_ptr: int,
    name_len: int,
    req_ptr: int,
    req_len: int,
    resp_ptr: int,
    resp_cap: int,
) -> int:
    try:
        return _call(caller, name_ptr, name_len, req_ptr, req_len, resp_ptr, resp_cap)
    except Exception:  # a host function must never raise: see the module docstring
        log.exception("pollen.call failed")
        return ERR_FAILED


def _call(
    caller: wasmtime.Caller,
    name_ptr: int,
    name_len: int,
    req_ptr: int,
    req_len: int,
    resp_ptr: int,
    resp_cap: int,
) -> int:
    context = current()
    if context is None:
        return ERR_INVALID
    name_len &= _U32
    req_len &= _U32
    resp_ptr &= _U32
    resp_cap &= _U32
    if name_len > MAX_NAME_BYTES or req_len > MAX_REQUEST_BYTES:
        return ERR_INVALID
    memory = _memory(caller)
    if memory is None or resp_ptr + resp_cap > memory.data_len(caller):
        return ERR_INVALID
    raw_name = _read(caller, name_ptr, name_len)
    body = _read(caller, req_ptr, req_len)
    if raw_name is None or body is None:
        return ERR_INVALID
    try:
        parsed = parse_call_name(raw_name.decode("utf-8"))
    except UnicodeDecodeError:
        return ERR_INVALID
    if parsed is None:
        return ERR_INVALID
    if context.depth >= MAX_CALL_DEPTH:
        return ERR_TOO_DEEP
    if context.router is None:
        return ERR_NOT_FOUND
    target, path, query = parsed
    request = HttpRequest(
        method="POST",
        path=path,
        query=query,
        headers=(
            ("Content-Type", "application/octet-stream"),
            ("X-Pollen-Caller", context.workload),
        ),
        body=body,
        server_name=target,
        script_name=f"/{target}",
    )
    try:
        response = context.router.route_call(target, request, depth=context.depth + 1)
    except UnknownWorkload:
        return ERR_NOT_FOUND
    except CallDepthExceeded:
        return ERR_TOO_DEEP
    except Unavailable:
        return ERR_UNAVAILABLE
    except SandboxError as exc:
        log.debug("call from %s to %s failed: %s", context.workload, target, exc)
        return ERR_FAILED
    # Runtime-written failures (504 for a callee's timeout, ...) are failures of the call.
    if response.error is not None:
        return ERR_UNAVAILABLE if response.status == 503 else ERR_FAILED
    data = response.body
    if data and resp_cap:
        memory.write(caller, data[:resp_cap], resp_ptr)
    context.last_status = response.status
    return min(len(data), _I32_MAX)


def _host_call_status(caller: wasmtime.Caller) -> int:
    context = current()
    return context.last_status if context is not None else 0


def define_host_functions(linker: wasmtime.Linker) -> None:
    """Define ``pollen.log``, ``pollen.call`` and ``pollen.call_status`` on ``linker``."""
    i32 = wasmtime.ValType.i32()
    linker.define_func(
        MODULE, "log", wasmtime.FuncType([i32, i32, i32], []), _host_log, access_caller=True
    )
    linker.define_func(
        MODULE, "call", wasmtime.FuncType([i32] * 6, [i32]), _host_call, access_caller=True
    )
    linker.define_func(
        MODULE, "call_status", wasmtime.FuncType([], [i32]), _host_call_status, access_caller=True
    )


HOST_FUNCTIONS = frozenset({"log", "call", "call_status"})
