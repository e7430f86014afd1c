"""The module cache: warm starts across restarts, and corrupt entries never trusted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pollen.runtime.cache import ModuleCache, digest_of
from pollen.runtime.engine import Engine, EngineConfig
from pollen.runtime.errors import InvalidModule
from pollen.runtime.sandbox import Sandbox


def _hello(examples: dict[str, Path]) -> bytes:
    return examples["hello"].read_bytes()


def _run(engine: Engine, cache: ModuleCache, wasm: bytes) -> bytes:
    cached = cache.get(wasm, name="hello")
    return Sandbox(engine, cached.module, name="hello").run().stdout


def test_restart_starts_warm(tmp_path: Path, examples: dict[str, Path]) -> None:
    wasm = _hello(examples)
    with Engine() as engine:
        cache = ModuleCache(engine, tmp_path)
        first = cache.get(wasm)
        assert first.source == "compiled"
        assert first.digest == digest_of(wasm)
        assert cache.get(wasm).source == "memory"
        code, summary = cache.paths(first.digest)
        assert code.exists() and summary.exists()
        assert code.parent.name == engine.fingerprint
    # A new engine and cache over the same directory: what a restarted node has.
    with Engine() as engine:
        cache = ModuleCache(engine, tmp_path)
        assert cache.get(wasm).source == "disk"
        assert b"Hello from Pollen" in _run(engine, cache, wasm)
        assert cache.stats.disk_hits == 1
        assert cache.stats.compiled == 0


def _corrupt_flip(code: Path, summary: Path) -> None:
    data = bytearray(code.read_bytes())
    data[len(data) // 2] ^= 0xFF
    code.write_bytes(bytes(data))


def _corrupt_truncate(code: Path, summary: Path) -> None:
    code.write_bytes(code.read_bytes()[:100])


def _corrupt_truncate_both(code: Path, summary: Path) -> None:
    """Consistent checksum of a truncated file: size and hash match, wasmtime must refuse."""
    import hashlib

    data = code.read_bytes()[:4096]
    code.write_bytes(data)
    meta = json.loads(summary.read_text())
    meta.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    summary.write_text(json.dumps(meta))


def _corrupt_summary(code: Path, summary: Path) -> None:
    summary.write_text("{not json")


def _missing_summary(code: Path, summary: Path) -> None:
    summary.unlink()


def _garbage_code(code: Path, summary: Path) -> None:
    code.write_bytes(b"\x00" * code.stat().st_size)


@pytest.mark.parametrize(
    "damage",
    [
        _corrupt_flip,
        _corrupt_truncate,
        _corrupt_truncate_both,
        _corrupt_summary,
        _missing_summary,
        _garbage_code,
    ],
)
def test_damaged_entry_is_recompiled(
    tmp_path: Path, examples: dict[str, Path], damage: object
) -> None:
    wasm = _hello(examples)
    with Engine() as engine:
        digest = ModuleCache(engine, tmp_path).get(wasm).digest
        code, summary = ModuleCache(engine, tmp_path).paths(digest)
        damage(code, summary)  # type: ignore[operator]
        cache = ModuleCache(engine, tmp_path)
        cached = cache.get(wasm)
        assert cached.source == "compiled"
        assert b"Hello from Pollen" in _run(engine, cache, wasm)
        # The entry was rewritten whole, and the next start is warm again.
        assert ModuleCache(engine, tmp_path).get(wasm).source == "disk"


def test_corruption_is_counted(tmp_path: Path, examples: dict[str, Path]) -> None:
    wasm = _hello(examples)
    with Engine() as engine:
        digest = ModuleCache(engine, tmp_path).get(wasm).digest
        code, summary = ModuleCache(engine, tmp_path).paths(digest)
        _corrupt_flip(code, summary)
        cache = ModuleCache(engine, tmp_path)
        cache.get(wasm)
        assert cache.stats.corrupt == 1
        assert cache.stats.corrupt_paths == [str(code)]


def test_digest_must_match(tmp_path: Path, examples: dict[str, Path]) -> None:
    wasm = _hello(examples)
    with Engine() as engine:
        cache = ModuleCache(engine, tmp_path)
        with pytest.raises(InvalidModule, match="do not match the digest"):
            cache.get(wasm, digest="sha256:" + "0" * 64, name="hello")
        assert cache.get(wasm, digest=digest_of(wasm)).source == "compiled"


def test_engine_options_separate_entries(tmp_path: Path) -> None:
    assert EngineConfig().fingerprint() != EngineConfig(fuel=True).fingerprint()
    # The epoch tick only drives the ticker: compiled code is the same.
    assert EngineConfig().fingerprint() == EngineConfig(epoch_tick_ms=5).fingerprint()


def test_memory_only_cache(examples: dict[str, Path]) -> None:
    wasm = _hello(examples)
    with Engine() as engine:
        cache = ModuleCache(engine, None)
        assert cache.get(wasm).source == "compiled"
        assert cache.get(wasm).source == "memory"


def test_unwritable_directory_still_works(tmp_path: Path, examples: dict[str, Path]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with Engine() as engine:
        cache = ModuleCache(engine, blocker)
        assert cache.get(_hello(examples)).source == "compiled"
        assert cache.stats.write_errors == 1


CONCURRENT_WRITER = """
import sys
from pathlib import Path
from pollen.runtime.cache import ModuleCache, digest_of
from pollen.runtime.engine import Engine
from pollen.runtime.sandbox import Sandbox

wasm = Path(sys.argv[1]).read_bytes()
digest = digest_of(wasm)
with Engine() as engine:
    cache = ModuleCache(engine, Path(sys.argv[2]))
    module = engine.compile(wasm, name="hello")
    loaded = 0
    for _ in range(int(sys.argv[3])):
        # What a worker does on a miss (write the entry) and on a start (read it), at the
        # same time as the other processes.
        cache._store(digest, module)
        found = cache._load(digest)
        if found is not None:
            assert b"Hello" in Sandbox(engine, found, name="hello").run().stdout
            loaded += 1
    print(loaded, cache.stats.corrupt, flush=True)
"""


def test_concurrent_writers_in_several_processes_never_corrupt_an_entry(
    tmp_path: Path, examples: dict[str, Path]
) -> None:
    """``pollen run --workers`` shares the disk cache between processes: entries written
    at once by several of them are whole, or fail verification and are compiled again."""
    script = tmp_path / "writer.py"
    script.write_text(CONCURRENT_WRITER)
    directory = tmp_path / "cache"
    writers = [
        subprocess.Popen(
            [sys.executable, str(script), str(examples["hello"]), str(directory), "40"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[2],
        )
        for _ in range(3)
    ]
    for writer in writers:
        out, err = writer.communicate(timeout=300)
        assert writer.returncode == 0, err.decode()
        loaded, _corrupt = (int(part) for part in out.split())
        assert loaded > 0
    with Engine() as engine:
        cache = ModuleCache(engine, directory)
        assert b"Hello from Pollen!" in _run(engine, cache, _hello(examples))
        assert cache.stats.disk_hits == 1
        leftovers = [path.name for path in directory.rglob("*.tmp")]
        assert leftovers == []
