"""Small purpose-made modules for tests, written as WAT and assembled on the fly."""

from __future__ import annotations

import wasmtime

FD_WRITE = (
    '(import "wasi_snapshot_preview1" "fd_write" '
    "(func $fd_write (param i32 i32 i32 i32) (result i32)))"
)


def _data(data: bytes) -> str:
    return "".join(f"\\{byte:02x}" for byte in data)


def writes(output: bytes, exit_code: int = 0) -> bytes:
    """A command module that writes ``output`` to stdout and exits with ``exit_code``."""
    assert len(output) < 60_000
    exit_call = f"(call $proc_exit (i32.const {exit_code}))" if exit_code else ""
    return bytes(
        wasmtime.wat2wasm(
            f"""
            (module
              {FD_WRITE}
              (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
              (memory (export "memory") 1)
              (data (i32.const 64) "{_data(output)}")
              (func (export "_start")
                (i32.store (i32.const 0) (i32.const 64))
                (i32.store (i32.const 4) (i32.const {len(output)}))
                (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
                {exit_call}))
            """
        )
    )


def call_loop(name: str = "loop") -> bytes:
    """An http module that calls workload ``name`` (itself) through ``pollen.call``.

    The innermost instance, refused with a negative code, answers ``deep``; every instance
    above it answers its callee's body plus ``+``. So the outermost body is ``deep`` followed
    by one ``+`` per nested call that succeeded. (Each piece is its own ``fd_write``: WASI may
    write only the first buffer of a vector, and real programs loop; this one need not.)
    """
    header = b"Content-Type: text/plain\n\n"
    return bytes(
        wasmtime.wat2wasm(
            f"""
            (module
              (import "pollen" "call"
                (func $call (param i32 i32 i32 i32 i32 i32) (result i32)))
              {FD_WRITE}
              (memory (export "memory") 1)
              (data (i32.const 0) "{_data(name.encode())}")
              (data (i32.const 16) "{_data(header)}")
              (data (i32.const 48) "deep+")
              (func $out (param $ptr i32) (param $len i32)
                (i32.store (i32.const 512) (local.get $ptr))
                (i32.store (i32.const 516) (local.get $len))
                (drop (call $fd_write (i32.const 1) (i32.const 512) (i32.const 1)
                                      (i32.const 600))))
              (func (export "_start") (local $n i32)
                (local.set $n (call $call (i32.const 0) (i32.const {len(name)})
                                          (i32.const 0) (i32.const 0)
                                          (i32.const 1024) (i32.const 4096)))
                (call $out (i32.const 16) (i32.const {len(header)}))
                (if (i32.lt_s (local.get $n) (i32.const 0))
                  (then (call $out (i32.const 48) (i32.const 4)))
                  (else
                    (call $out (i32.const 1024) (local.get $n))
                    (call $out (i32.const 52) (i32.const 1))))))
            """
        )
    )


def preopen_probe() -> bytes:
    """A command module that exits with ``fd_prestat_get(3)``'s errno: 8 (EBADF) when no
    directory is preopened, 0 when one is."""
    return bytes(
        wasmtime.wat2wasm(
            """
            (module
              (import "wasi_snapshot_preview1" "fd_prestat_get"
                (func $prestat (param i32 i32) (result i32)))
              (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
              (memory (export "memory") 1)
              (func (export "_start")
                (call $proc_exit (call $prestat (i32.const 3) (i32.const 16)))))
            """
        )
    )


def bad_pointers() -> bytes:
    """A module that hands ``pollen.log`` and ``pollen.call`` out-of-bounds pointers and
    exits with 100 + the negated result of the call (105 for ``POLLEN_ERR_INVALID``)."""
    return bytes(
        wasmtime.wat2wasm(
            """
            (module
              (import "pollen" "log" (func $log (param i32 i32 i32)))
              (import "pollen" "call"
                (func $call (param i32 i32 i32 i32 i32 i32) (result i32)))
              (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
              (memory (export "memory") 1)
              (func (export "_start")
                (call $log (i32.const 1) (i32.const -16) (i32.const 64))
                (call $log (i32.const 1) (i32.const 65530) (i32.const 100))
                (call $proc_exit
                  (i32.sub (i32.const 100)
                    (call $call (i32.const 65000) (i32.const 1000) (i32.const 0)
                                (i32.const 0) (i32.const 0) (i32.const 16))))))
            """
        )
    )


def big_memory(pages: int) -> bytes:
    """A module that declares ``pages`` pages of memory up front."""
    return bytes(
        wasmtime.wat2wasm(f'(module (memory (export "memory") {pages}) (func (export "_start")))')
    )


def no_start() -> bytes:
    """A reactor-style module: it exports a function, but no ``_start``."""
    return bytes(
        wasmtime.wat2wasm('(module (memory (export "memory") 1) (func (export "handle")))')
    )


def stdio_probe() -> bytes:
    """A command module that checks Pollen's ``fd_write``/``fd_read`` against bad input.

    It exits with a bit per check that answered as WASI says: 1 an unknown fd is EBADF; 2 an
    iovec array out of bounds, 4 a buffer out of bounds and 8 ``nwritten`` out of bounds are
    EFAULT; 16 a good write of 3 bytes reports 3. Then it reads stdin in two reads (5 bytes,
    then up to 100) and writes what it read after ``hi\\n``: 31 and the echo mean all is well.
    """
    fd_read = (
        '(import "wasi_snapshot_preview1" "fd_read" '
        "(func $fd_read (param i32 i32 i32 i32) (result i32)))"
    )
    return bytes(
        wasmtime.wat2wasm(
            f"""
            (module
              {FD_WRITE}
              {fd_read}
              (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
              (memory (export "memory") 1)
              (data (i32.const 64) "hi\\n")
              (func (export "_start") (local $bits i32) (local $got i32)
                ;; iovec at 0: the 3 bytes at 64; iovec at 16: 100 bytes at 65530
                (i32.store (i32.const 0) (i32.const 64))
                (i32.store (i32.const 4) (i32.const 3))
                (i32.store (i32.const 16) (i32.const 65530))
                (i32.store (i32.const 20) (i32.const 100))
                (if (i32.eq (call $fd_write (i32.const 5) (i32.const 0) (i32.const 1)
                                            (i32.const 8)) (i32.const 8))
                  (then (local.set $bits (i32.or (local.get $bits) (i32.const 1)))))
                (if (i32.eq (call $fd_write (i32.const 1) (i32.const 65532) (i32.const 1)
                                            (i32.const 8)) (i32.const 21))
                  (then (local.set $bits (i32.or (local.get $bits) (i32.const 2)))))
                (if (i32.eq (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1)
                                            (i32.const 8)) (i32.const 21))
                  (then (local.set $bits (i32.or (local.get $bits) (i32.const 4)))))
                (if (i32.eq (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1)
                                            (i32.const 65534)) (i32.const 21))
                  (then (local.set $bits (i32.or (local.get $bits) (i32.const 8)))))
                (if (i32.eqz (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1)
                                             (i32.const 8)))
                  (then (if (i32.eq (i32.load (i32.const 8)) (i32.const 3))
                    (then (local.set $bits (i32.or (local.get $bits) (i32.const 16)))))))
                ;; stdin: 5 bytes into 1000, then up to 100 more after them
                (i32.store (i32.const 32) (i32.const 1000))
                (i32.store (i32.const 36) (i32.const 5))
                (drop (call $fd_read (i32.const 0) (i32.const 32) (i32.const 1) (i32.const 40)))
                (local.set $got (i32.load (i32.const 40)))
                (i32.store (i32.const 32) (i32.add (i32.const 1000) (local.get $got)))
                (i32.store (i32.const 36) (i32.const 100))
                (drop (call $fd_read (i32.const 0) (i32.const 32) (i32.const 1) (i32.const 40)))
                (local.set $got (i32.add (local.get $got) (i32.load (i32.const 40))))
                (i32.store (i32.const 48) (i32.const 1000))
                (i32.store (i32.const 52) (local.get $got))
                (drop (call $fd_write (i32.const 1) (i32.const 48) (i32.const 1) (i32.const 8)))
                (call $proc_exit (local.get $bits))))
            """
        )
    )
