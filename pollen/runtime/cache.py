"""Compiled modules, kept in memory and on disk, so that a restarted node starts warm.

Compiling a module with Cranelift takes milliseconds to seconds; loading its serialized
machine code takes well under a millisecond per 100 KB. Entries live at

    DIR/<engine fingerprint>/<sha256 of the wasm>.cwasm       Module.serialize() output
    DIR/<engine fingerprint>/<sha256 of the wasm>.cwasm.sum   {"sha256", "size", ...}

The fingerprint covers the wasmtime version, the engine options that change generated code
and the machine, so a node that upgrades wasmtime simply misses and recompiles.

wasmtime's ``Module.deserialize`` trusts its input: bytes that are not exactly what
``serialize`` wrote can crash the process or worse. So an entry is only ever deserialized from
bytes that were read into memory and matched against the checksum written beside them; a
missing, short or altered entry is deleted and the module compiled again. Both files are
written to a temporary name and renamed into place, and the checksum is written last, so a
crash at any point leaves either a whole entry or one that fails verification. Nothing is
fsync'd: verification, not durability, is what makes an entry trustworthy, and a lost entry
only costs a compile.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import wasmtime

from pollen.runtime.engine import WASMTIME_VERSION, Engine
from pollen.runtime.errors import InvalidModule

log = logging.getLogger(__name__)

MAX_SUM_BYTES = 4096

Source = Literal["memory", "disk", "compiled"]


def digest_of(wasm: bytes) -> str:
    """The content address of a module: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(wasm).hexdigest()


@dataclass(frozen=True)
class CachedModule:
    """A compiled module, its digest, and where it came from this time."""

    module: wasmtime.Module
    digest: str
    source: Source


@dataclass
class CacheStats:
    """Counters since the cache was made."""

    memory_hits: int = 0
    disk_hits: int = 0
    compiled: int = 0
    corrupt: int = 0
    write_errors: int = 0
    corrupt_paths: list[str] = field(default_factory=list)


class ModuleCache:
    """Compile-once module store: memory (LRU of ``memory_entries``), then disk, then compile.

    ``directory`` None keeps modules in memory only. Thread-safe; two threads asking for the
    same module at once compile it once.
    """

    def __init__(
        self, engine: Engine, directory: Path | None = None, *, memory_entries: int = 64
    ) -> None:
        self.engine = engine
        self.directory = directory / engine.fingerprint if directory is not None else None
        self.memory_entries = memory_entries
        self.stats = CacheStats()
        self._memory: OrderedDict[str, wasmtime.Module] = OrderedDict()
        self._lock = threading.Lock()
        self._digest_locks: dict[str, threading.Lock] = {}

    def paths(self, digest: str) -> tuple[Path, Path]:
        """Where the entry for ``digest`` lives: the machine code and its checksum."""
        if self.directory is None:
            raise ValueError("this cache has no directory")
        hex_digest = digest.removeprefix("sha256:")
        code = self.directory / f"{hex_digest}.cwasm"
        return code, code.with_name(code.name + ".sum")

    def get(self, wasm: bytes, *, name: str = "", digest: str | None = None) -> CachedModule:
        """The compiled form of ``wasm``.

        ``digest``, when given, must match the bytes (``InvalidModule`` otherwise): the
        content address is always computed here, never taken on trust. Raises
        ``InvalidModule`` for bytes that do not compile.
        """
        actual = digest_of(bytes(wasm))
        if digest is not None and digest != actual:
            label = f'workload "{name}"' if name else "the module"
            raise InvalidModule(
                f"{label}'s bytes do not match the digest {digest} (they hash to {actual})",
                workload=name,
            )
        with self._lock:
            module = self._memory.get(actual)
            if module is not None:
                self._memory.move_to_end(actual)
                self.stats.memory_hits += 1
                return CachedModule(module, actual, "memory")
            digest_lock = self._digest_locks.setdefault(actual, threading.Lock())
        try:
            with digest_lock:
                return self._get_locked(wasm, actual, name)
        finally:
            with self._lock:
                if self._digest_locks.get(actual) is digest_lock:
                    del self._digest_locks[actual]

    def _get_locked(self, wasm: bytes, digest: str, name: str) -> CachedModule:
        # Another thread may have finished the same module while this one waited.
        with self._lock:
            module = self._memory.get(digest)
            if module is not None:
                self.stats.memory_hits += 1
                return CachedModule(module, digest, "memory")
        source: Source = "disk"
        module = self._load(digest)
        if module is None:
            source = "compiled"
            module = self.engine.compile(wasm, name=name)
            self._store(digest, module)
        with self._lock:
            if source == "disk":
                self.stats.disk_hits += 1
            else:
                self.stats.compiled += 1
            self._remember(digest, module)
        return CachedModule(module, digest, source)

    def _remember(self, digest: str, module: wasmtime.Module) -> None:
        self._memory[digest] = module
        self._memory.move_to_end(digest)
        while len(self._memory) > self.memory_entries:
            self._memory.popitem(last=False)

    def forget(self, digest: str) -> None:
        """Drop ``digest`` from memory (the disk entry stays)."""
        with self._lock:
            self._memory.pop(digest, None)

    def _load(self, digest: str) -> wasmtime.Module | None:
        if self.directory is None:
            return None
        code_path, sum_path = self.paths(digest)
        try:
            with open(sum_path, "rb") as f:
                raw_sum = f.read(MAX_SUM_BYTES + 1)
            data = code_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("module cache: cannot read %s: %s", code_path, exc)
            return None
        problem = _verify(raw_sum, data, digest)
        if problem is None:
            try:
                # Only bytes that matched the checksum reach deserialize: see the module doc.
                return wasmtime.Module.deserialize(self.engine.wasmtime, data)
            except wasmtime.WasmtimeError as exc:
                problem = f"wasmtime refused it ({str(exc).splitlines()[0]})"
        log.warning("module cache: discarding %s: %s; compiling again", code_path.name, problem)
        with self._lock:
            self.stats.corrupt += 1
            self.stats.corrupt_paths.append(str(code_path))
        for path in (sum_path, code_path):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        return None

    def _store(self, digest: str, module: wasmtime.Module) -> None:
        if self.directory is None:
            return
        code_path, sum_path = self.paths(digest)
        try:
            data = bytes(module.serialize())
            summary = {
                "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data),
                "digest": digest,
                "wasmtime": WASMTIME_VERSION,
            }
            self.directory.mkdir(parents=True, exist_ok=True)
            _write_atomic(code_path, data)
            _write_atomic(sum_path, json.dumps(summary).encode())
        except (OSError, wasmtime.WasmtimeError) as exc:
            with self._lock:
                self.stats.write_errors += 1
            log.warning("module cache: cannot write %s: %s", code_path, exc)


def _verify(raw_sum: bytes, data: bytes, digest: str) -> str | None:
    """Why ``data`` cannot be trusted as the entry for ``digest``, or None if it can."""
    if len(raw_sum) > MAX_SUM_BYTES:
        return "its checksum file is too large"
    try:
        summary = json.loads(raw_sum)
    except ValueError:
        return "its checksum file is not JSON"
    if not isinstance(summary, dict):
        return "its checksum file is not an object"
    if summary.get("digest") != digest:
        return "its checksum file names another module"
    if summary.get("size") != len(data):
        return f"it is {len(data)} bytes, the checksum says {summary.get('size')}"
    if summary.get("sha256") != hashlib.sha256(data).hexdigest():
        return "its bytes do not match the checksum"
    return None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
