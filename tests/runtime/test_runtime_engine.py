"""The runtime's engine is made on first use, once, even when first uses race on threads."""

from __future__ import annotations

import threading
from pathlib import Path

from pollen.runtime.runtime import Runtime


def test_racing_first_loads_share_one_engine(examples: dict[str, Path], tmp_path: Path) -> None:
    wasm = examples["hello"].read_bytes()
    runtime = Runtime(cache_dir=tmp_path / "modules")
    try:
        start = threading.Barrier(8)
        engines: list[object] = []
        errors: list[BaseException] = []

        def load() -> None:
            start.wait()
            try:
                sandbox = runtime.load(wasm, name="hello")
                sandbox.run(args=["hello"], env={})
                engines.append(sandbox.engine)
            except BaseException as exc:  # collected, asserted below
                errors.append(exc)

        threads = [threading.Thread(target=load) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        assert len(engines) == 8 and len({id(e) for e in engines}) == 1
    finally:
        runtime.close()


def test_a_runtime_that_ran_nothing_closes_without_an_engine() -> None:
    runtime = Runtime()
    runtime.close()
    runtime.close()
