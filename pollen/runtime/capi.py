"""The request path through wasmtime's C API, below wasmtime-py's wrappers (ADR 0010).

wasmtime-py wraps every C call in Python objects and goes through a ``ctypes.CDLL``, which
releases the GIL around *every* call, even the ones that return in a microsecond. A request
made about fifty such calls (``Store``, ``WasiConfig``, ``exports``, ``Func.__call__``'s type
checks, the host-function trampolines' ``Val`` objects, ...). On one thread that cost about
250 µs of Python per request; with the event loop and a second worker wanting the GIL too,
each release became a hand-off between threads (a futex wake and a context switch), and two
workers served fewer requests than one.

Here the same shared library is bound twice:

- ``_HOLD`` (``ctypes.PyDLL``) for calls that never run guest code and return at once
  (making a store, setting limits, WASI arguments, export lookups): they keep the GIL, so
  no other thread is woken for nothing;
- ``_FREE`` (``ctypes.CDLL``) for the two calls that run guest code (instantiation, which
  runs a module's start function, and the call of ``_start``) and for deleting a store,
  which unmaps memory: they release the GIL, so wasm on one worker overlaps with Python on
  the others.

Pollen's ``fd_write`` and ``fd_read`` are defined here as *unchecked* host functions: their
arguments arrive as one raw array and their memory is reached through a raw pointer, with
no Python object per argument.

Everything else (compiling, linking, ``InstancePre``, the host functions ``pollen.*``, error
and trap objects) stays with wasmtime-py. The declarations here mirror the ones wasmtime-py
generates for the installed version (``wasmtime._bindings``), with opaque pointers passed as
plain addresses; pyproject pins wasmtime to one major version because this module relies on
those signatures.
"""

from __future__ import annotations

import array
import ctypes
import itertools
import logging
import struct
from collections.abc import Iterator, Mapping, Sequence
from ctypes import (
    POINTER,
    addressof,
    byref,
    c_bool,
    c_char_p,
    c_int32,
    c_size_t,
    c_uint32,
    c_void_p,
)
from typing import Any, NamedTuple, NoReturn, cast

import wasmtime
from wasmtime import _bindings as _b
from wasmtime import _ffi

from pollen.runtime import abi

log = logging.getLogger(__name__)

_LIBRARY = str(_ffi.filename)
#: Calls that keep the GIL: short, never run guest code, never call back into Python.
_HOLD = ctypes.PyDLL(_LIBRARY)
#: Calls that release the GIL: they run guest code (which may call back into Python) or
#: unmap memory.
_FREE = ctypes.CDLL(_LIBRARY)


def _bind(library: ctypes.CDLL, name: str, restype: Any, *argtypes: Any) -> Any:
    function = getattr(library, name)
    function.restype = restype
    function.argtypes = list(argtypes)
    return function


# Opaque pointers travel as plain ints (c_void_p): no pointer objects, no casts per call.
_store_new = _bind(_HOLD, "wasmtime_store_new", c_void_p, c_void_p, c_void_p, c_void_p)
_store_context = _bind(_HOLD, "wasmtime_store_context", c_void_p, c_void_p)
_store_limiter = _bind(
    _HOLD,
    "wasmtime_store_limiter",
    None,
    c_void_p,
    ctypes.c_int64,
    ctypes.c_int64,
    ctypes.c_int64,
    ctypes.c_int64,
    ctypes.c_int64,
)
_store_delete = _bind(_FREE, "wasmtime_store_delete", None, c_void_p)
_set_epoch_deadline = _bind(
    _HOLD, "wasmtime_context_set_epoch_deadline", None, c_void_p, ctypes.c_uint64
)
_set_fuel = _bind(_HOLD, "wasmtime_context_set_fuel", c_void_p, c_void_p, ctypes.c_uint64)
_wasi_new = _bind(_HOLD, "wasi_config_new", c_void_p)
_wasi_argv = _bind(_HOLD, "wasi_config_set_argv", c_bool, c_void_p, c_size_t, c_void_p)
_wasi_env = _bind(_HOLD, "wasi_config_set_env", c_bool, c_void_p, c_size_t, c_void_p, c_void_p)
_wasi_delete = _bind(_HOLD, "wasi_config_delete", None, c_void_p)
_set_wasi = _bind(_HOLD, "wasmtime_context_set_wasi", c_void_p, c_void_p, c_void_p)
_instantiate = _bind(
    _FREE, "wasmtime_instance_pre_instantiate", c_void_p, c_void_p, c_void_p, c_void_p, c_void_p
)
_export_get = _bind(
    _HOLD,
    "wasmtime_instance_export_get",
    c_bool,
    c_void_p,
    c_void_p,
    c_char_p,
    c_size_t,
    c_void_p,
)
_func_call = _bind(
    _FREE,
    "wasmtime_func_call",
    c_void_p,
    c_void_p,
    c_void_p,
    c_void_p,
    c_size_t,
    c_void_p,
    c_size_t,
    c_void_p,
)
_caller_context = _bind(_HOLD, "wasmtime_caller_context", c_void_p, c_void_p)
_caller_export_get = _bind(
    _HOLD, "wasmtime_caller_export_get", c_bool, c_void_p, c_char_p, c_size_t, c_void_p
)
_memory_data = _bind(_HOLD, "wasmtime_memory_data", c_void_p, c_void_p, c_void_p)
_memory_size = _bind(_HOLD, "wasmtime_memory_data_size", c_size_t, c_void_p, c_void_p)

_EXTERN_FUNC = 0
_EXTERN_MEMORY = 3
_NO_FINALIZER = None


def _kind(extern: _b.wasmtime_extern_t) -> int:
    # ctypes reads integer fields as plain ints; the generated declarations say c_uint8.
    return cast(int, extern.kind)


def address(pointer: Any) -> int:
    """The address a wasmtime-py pointer (``engine.ptr()``, ``pre.ptr()``) points to."""
    value = ctypes.cast(pointer, c_void_p).value
    if not value:
        raise ValueError("null pointer")
    return int(value)


def _raise_error(error: int) -> NoReturn:
    """Turn an owned ``wasmtime_error_t*`` into wasmtime-py's exception (``ExitTrap`` for
    ``proc_exit``) and raise it."""
    raise wasmtime.WasmtimeError._from_ptr(ctypes.cast(error, POINTER(_b.wasmtime_error_t)))


def _raise_trap(trap: int) -> NoReturn:
    raise wasmtime.Trap._from_ptr(ctypes.cast(trap, POINTER(_b.wasm_trap_t)))


#: The ``array`` type code of a C pointer.
_POINTER_CODE = "Q" if ctypes.sizeof(c_void_p) == 8 else "I"


class Strings:
    """A list of strings as the ``char**`` the WASI calls take.

    The strings sit NUL-terminated in one buffer, and the array holds pointers into it:
    a ``c_char_p`` array converts every item on its own, which cost about 0.5 µs a string,
    and a request's CGI environment has some forty. The C side copies the strings, so one
    ``Strings`` serves every store, and ``plus`` extends a fixed prefix (a workload's own
    environment) with a request's variables without touching the prefix again. Items are
    UTF-8 without NUL (a C string would end there; NUL is dropped).
    """

    __slots__ = ("_buffers", "_pointers", "count")

    def __init__(self, items: Sequence[str] = ()) -> None:
        buffer, pointers = _pack(items)
        self._buffers: tuple[Any, ...] = (buffer,)
        self._pointers = pointers
        self.count = len(pointers)

    def plus(self, items: Sequence[str]) -> Strings:
        """These strings followed by ``items``."""
        if not items:
            return self
        buffer, pointers = _pack(items)
        joined = Strings.__new__(Strings)
        joined._buffers = (*self._buffers, buffer)  # keeps both buffers alive
        joined._pointers = self._pointers + pointers
        joined.count = len(joined._pointers)
        return joined

    @property
    def pointer(self) -> int:
        """The address of the pointer array, to pass where the C API wants ``char**``; the
        array lives as long as this object."""
        pointers = self._pointers if self._pointers else _EMPTY
        return int(pointers.buffer_info()[0])

    def __iter__(self) -> Iterator[bytes]:
        return (ctypes.string_at(pointer) for pointer in self._pointers)


_EMPTY = array.array(_POINTER_CODE, [0])


class Environ(NamedTuple):
    """An environment ready for WASI: variable names and their values, index for index."""

    names: Strings
    values: Strings

    @classmethod
    def of(cls, env: Mapping[str, str]) -> Environ:
        """The environment ``env``, encoded."""
        return cls(Strings(list(env)), Strings(list(env.values())))


def _pack(items: Sequence[str]) -> tuple[Any, array.array[int]]:
    """One buffer of NUL-terminated UTF-8 strings and the addresses of each in it."""
    if not items:
        return None, array.array(_POINTER_CODE)
    joined = "\0".join(items)
    if joined.count("\0") != len(items) - 1:
        items = [item.replace("\0", "") for item in items]
        joined = "\0".join(items)
    if joined.isascii():  # the common case: one encode, lengths as they are
        data = joined.encode("ascii")
        lengths = [len(item) + 1 for item in items]
    else:
        encoded = [item.encode("utf-8", "replace") for item in items]
        data = b"\0".join(encoded)
        lengths = [len(item) + 1 for item in encoded]
    buffer = ctypes.create_string_buffer(data, len(data) + 1)
    pointers = array.array(_POINTER_CODE, itertools.accumulate(lengths, initial=addressof(buffer)))
    pointers.pop()  # the address just past the end
    return buffer, pointers


class Store:
    """One ``wasmtime_store_t`` with a WASI context, for one invocation; close it at once.

    Not thread-safe, and used only on the thread that made it.
    """

    __slots__ = ("_context", "_instance", "_memory", "_store")

    def __init__(self, engine: int) -> None:
        self._store: int | None = _store_new(engine, None, _NO_FINALIZER)
        self._context: int = _store_context(self._store)
        self._instance: _b.wasmtime_instance_t | None = None
        self._memory: _b.wasmtime_extern_t | None = None

    def limit(self, memory_bytes: int, epoch_ticks: int, fuel: int | None) -> None:
        """Memory limit (``memory.grow`` past it fails), epoch deadline, optional fuel."""
        _store_limiter(self._store, memory_bytes, -1, -1, -1, -1)
        _set_epoch_deadline(self._context, epoch_ticks)
        if fuel is not None:
            error = _set_fuel(self._context, fuel)
            if error:
                _raise_error(error)

    def set_wasi(self, argv: Strings, env: Environ) -> None:
        """WASI with these arguments and environment and nothing else: no preopens, no
        inherited streams (fds 0-2 are Pollen's own functions)."""
        config = _wasi_new()
        try:
            names, values = env
            ok = _wasi_argv(config, argv.count, argv.pointer) and _wasi_env(
                config, names.count, names.pointer, values.pointer
            )
        except BaseException:
            _wasi_delete(config)
            raise
        if not ok:
            _wasi_delete(config)
            raise wasmtime.WasmtimeError("arguments and environment must be valid UTF-8")
        error = _set_wasi(self._context, config)  # takes the config, whatever the outcome
        if error:
            _raise_error(error)

    def instantiate(self, pre: int) -> None:
        """Instantiate a pre-linked module (its start function runs here, without the GIL).

        Raises ``wasmtime.Trap`` or ``wasmtime.WasmtimeError``.
        """
        instance = _b.wasmtime_instance_t()
        trap = c_void_p()
        error = _instantiate(pre, self._context, byref(instance), byref(trap))
        if error:
            _raise_error(error)
        if trap.value:
            _raise_trap(trap.value)
        self._instance = instance
        memory = _b.wasmtime_extern_t()
        if self._get(b"memory", memory) and _kind(memory) == _EXTERN_MEMORY:
            self._memory = memory

    @property
    def instantiated(self) -> bool:
        """Whether ``instantiate`` succeeded."""
        return self._instance is not None

    def _get(self, name: bytes, into: _b.wasmtime_extern_t) -> bool:
        assert self._instance is not None
        return bool(_export_get(self._context, byref(self._instance), name, len(name), byref(into)))

    @property
    def memory(self) -> tuple[int, Any] | None:
        """The instance's exported ``memory``, if it has one, as what ``fd_write`` and
        ``fd_read`` need to reach it: the store context and a reference to the memory."""
        if self._memory is None:
            return None
        return (self._context, byref(self._memory.of.memory))

    def call_start(self) -> None:
        """Call the exported ``_start`` (checked to take and return nothing) without the GIL.

        Returns when it returns; raises ``wasmtime.ExitTrap`` for ``proc_exit``,
        ``wasmtime.Trap`` for a trap (an epoch interrupt included), ``WasmtimeError`` else.
        """
        start = _b.wasmtime_extern_t()
        if not self._get(b"_start", start) or _kind(start) != _EXTERN_FUNC:
            raise wasmtime.WasmtimeError("the instance has no _start function")
        trap = c_void_p()
        error = _func_call(self._context, byref(start.of.func), None, 0, None, 0, byref(trap))
        if error:
            _raise_error(error)
        if trap.value:
            _raise_trap(trap.value)

    def memory_bytes(self) -> int:
        """Current size of the exported memory (0 without one)."""
        if self._memory is None:
            return 0
        return int(_memory_size(self._context, byref(self._memory.of.memory)))

    def close(self) -> None:
        """Free the store and everything in it (idempotent)."""
        store, self._store = self._store, None
        self._instance = None
        self._memory = None
        if store:
            _store_delete(store)


# --- Pollen's fd_write and fd_read ------------------------------------------------------------

# One raw argument or result: a 16-byte ``wasmtime_val_raw_t``; an i32 is its first 4 bytes.
_RAW = 16
_ARGS4 = struct.Struct("<i12xi12xi12xi12x")
_IOVEC = struct.Struct("<II")
_U32 = 0xFFFFFFFF

_Callback = ctypes.CFUNCTYPE(c_void_p, c_void_p, c_void_p, c_void_p, c_size_t)


def _memory_of(caller: int, context: abi.HostContext) -> tuple[int, int] | None:
    """Base address and size of the calling instance's memory.

    Linear memory cannot move or grow while its instance is inside a host call, so both stay
    valid until the call returns.
    """
    known = context.memory  # ``Store.memory``: found once per instance, not per call
    if known is not None:
        store_context, memory = known
    else:
        store_context = _caller_context(caller)
        found = _b.wasmtime_extern_t()
        if not _caller_export_get(caller, b"memory", 6, byref(found)):
            return None
        if _kind(found) != _EXTERN_MEMORY:
            return None
        memory = byref(found.of.memory)
    size = int(_memory_size(store_context, memory))
    base = _memory_data(store_context, memory) if size else 0
    return (int(base or 0), size)


def _iovecs(base: int, size: int, iovs: int, count: int) -> list[tuple[int, int]] | None:
    """The (pointer, length) pairs of a WASI iovec array, or None if any is out of bounds."""
    if iovs + 8 * count > size:
        return None
    if count == 1:  # what a C library's write() usually makes
        ptr, length = _IOVEC.unpack(ctypes.string_at(base + iovs, 8))
        return [(ptr, length)] if ptr + length <= size else None
    raw = ctypes.string_at(base + iovs, 8 * count) if count else b""
    vectors = [_IOVEC.unpack_from(raw, 8 * k) for k in range(count)]
    for ptr, length in vectors:
        if ptr + length > size:
            return None
    return vectors


def _result(args: int, value: int) -> None:
    c_int32.from_address(args).value = value


def _fd_write(_env: int, caller: int, args: int, _count: int) -> int:
    try:
        fd, iovs, count, nwritten = _ARGS4.unpack(ctypes.string_at(args, 4 * _RAW))
        context = abi.current()
        if context is None or fd not in (1, 2):
            _result(args, abi.WASI_EBADF)
            return 0
        sink = context.stdout if fd == 1 else context.stderr
        found = _memory_of(caller, context)
        if found is None:
            _result(args, abi.WASI_EFAULT)
            return 0
        base, size = found
        vectors = _iovecs(base, size, iovs & _U32, count & _U32)
        nwritten &= _U32
        if vectors is None or nwritten + 4 > size:
            _result(args, abi.WASI_EFAULT)
            return 0
        total = 0
        wanted = 0
        for ptr, length in vectors:
            if not length:
                continue
            wanted += length
            taken = length if sink is None else sink(ctypes.string_at(base + ptr, length))
            total += taken
            if taken < length:
                break
        if total == 0 and wanted:
            _result(args, abi.WASI_EFBIG)  # the sink is full: fail the write, do not grow
            return 0
        c_uint32.from_address(base + nwritten).value = total
        _result(args, abi.WASI_ESUCCESS)
    except BaseException:  # a host function must never raise: see abi's docstring
        log.exception("fd_write failed")
        _result(args, abi.WASI_EIO)
    return 0


def _fd_read(_env: int, caller: int, args: int, _count: int) -> int:
    try:
        fd, iovs, count, nread = _ARGS4.unpack(ctypes.string_at(args, 4 * _RAW))
        context = abi.current()
        if context is None or fd != 0:
            _result(args, abi.WASI_EBADF)
            return 0
        found = _memory_of(caller, context)
        if found is None:
            _result(args, abi.WASI_EFAULT)
            return 0
        base, size = found
        vectors = _iovecs(base, size, iovs & _U32, count & _U32)
        nread &= _U32
        if vectors is None or nread + 4 > size:
            _result(args, abi.WASI_EFAULT)
            return 0
        total = 0
        data = context.stdin
        for ptr, length in vectors:
            chunk = data[context.stdin_offset : context.stdin_offset + length]
            if not chunk:
                break
            ctypes.memmove(base + ptr, chunk, len(chunk))
            context.stdin_offset += len(chunk)
            total += len(chunk)
        c_uint32.from_address(base + nread).value = total
        _result(args, abi.WASI_ESUCCESS)
    except BaseException:  # a host function must never raise: see abi's docstring
        log.exception("fd_read failed")
        _result(args, abi.WASI_EIO)
    return 0


# Kept for the life of the process: the linker holds their addresses, and no finalizer is
# given, so wasmtime never calls into Python to release them (not even at shutdown).
_FD_WRITE = _Callback(_fd_write)
_FD_READ = _Callback(_fd_read)

_define_unchecked = _bind(
    _HOLD,
    "wasmtime_linker_define_func_unchecked",
    c_void_p,
    c_void_p,
    c_char_p,
    c_size_t,
    c_char_p,
    c_size_t,
    c_void_p,
    _Callback,
    c_void_p,
    c_void_p,
)


def define_stdio(linker: wasmtime.Linker) -> None:
    """Put Pollen's ``fd_write``/``fd_read`` over WASI's on ``linker`` (after
    ``define_wasi``)."""
    i32 = wasmtime.ValType.i32()
    signature = wasmtime.FuncType([i32] * 4, [i32])
    module = abi.WASI_MODULE.encode()
    linker.allow_shadowing = True
    try:
        for name, callback in ((b"fd_write", _FD_WRITE), (b"fd_read", _FD_READ)):
            error = _define_unchecked(
                address(linker.ptr()),
                module,
                len(module),
                name,
                len(name),
                address(signature.ptr()),
                callback,
                None,
                None,
            )
            if error:
                _raise_error(error)
    finally:
        linker.allow_shadowing = False


# --- The pooling allocator ---------------------------------------------------------------------


def use_pooling_allocator(
    config: wasmtime.Config,
    *,
    instances: int,
    max_memory_bytes: int,
    keep_resident_bytes: int,
    warm_slots: int,
) -> None:
    """Make ``config`` allocate instances from a pool of pre-reserved slots.

    Each fresh instance still gets its own memory, reset to the module's initial image; what
    is saved is the ``mmap``/``munmap`` per instance and, with ``keep_resident_bytes``, the
    page faults on the first pages (they are zeroed instead of returned to the kernel).
    ``instances`` caps how many instances exist at once; past it instantiation fails, which
    the sandbox reports as ``Overloaded``.
    """
    pooling = _b.wasmtime_pooling_allocation_config_new()
    try:
        _b.wasmtime_pooling_allocation_config_total_core_instances_set(pooling, instances)
        _b.wasmtime_pooling_allocation_config_total_memories_set(pooling, instances)
        _b.wasmtime_pooling_allocation_config_total_tables_set(pooling, instances)
        # Stacks are pooled only for async calls, which Pollen does not make.
        _b.wasmtime_pooling_allocation_config_total_stacks_set(pooling, 1)
        _b.wasmtime_pooling_allocation_config_max_memory_size_set(pooling, max_memory_bytes)
        _b.wasmtime_pooling_allocation_config_linear_memory_keep_resident_set(
            pooling, keep_resident_bytes
        )
        _b.wasmtime_pooling_allocation_config_table_keep_resident_set(pooling, keep_resident_bytes)
        _b.wasmtime_pooling_allocation_config_max_unused_warm_slots_set(pooling, warm_slots)
        _b.wasmtime_pooling_allocation_strategy_set(config.ptr(), pooling)
    finally:
        _b.wasmtime_pooling_allocation_config_delete(pooling)
