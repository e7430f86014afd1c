"""Fixtures for runtime tests: the example modules, built once per session, and a runtime."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pollen.runtime.runtime import Runtime

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "examples" / "build.py"
EXAMPLES = ("hello", "echo", "caller", "cpu", "spin", "membomb", "trap", "missing-import")


def _build_module() -> object:
    spec = importlib.util.spec_from_file_location("pollen_examples_build", BUILD_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def examples() -> dict[str, Path]:
    """Every example module, built from source into build/examples/ (incrementally)."""
    build = _build_module()
    targets: dict[str, Path] = build.build()  # type: ignore[attr-defined]
    missing = [name for name in EXAMPLES if name not in targets]
    assert not missing, f"examples/build.py did not build {missing}"
    return targets


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    """A runtime with a private on-disk module cache, closed after the test."""
    with Runtime(cache_dir=tmp_path / "cache") as rt:
        yield rt
