"""The C API hot path: Pollen's stdio functions, the pooling allocator and its limit."""

from __future__ import annotations

from pathlib import Path

import pytest

from pollen.runtime.engine import EngineConfig
from pollen.runtime.errors import MemoryLimitExceeded
from pollen.runtime.runtime import Runtime
from pollen.runtime.sandbox import MIB, Limits
from pollen.runtime.wagi import HttpRequest
from tests.runtime import modules


def test_stdio_answers_bad_input_with_errno(runtime: Runtime) -> None:
    probe = runtime.load(modules.stdio_probe(), name="probe")
    result = probe.run(stdin=b"hello, stdin")
    assert result.exit_code == 31
    assert result.stdout == b"hi\nhello, stdin"


def test_stdio_with_empty_stdin(runtime: Runtime) -> None:
    result = runtime.load(modules.stdio_probe(), name="probe").run()
    assert (result.exit_code, result.stdout) == (31, b"hi\n")


def test_pool_exhaustion_is_overloaded() -> None:
    """With room for one instance, a nested call cannot start its callee: the callee's
    failure is Overloaded (a 503 for a request), and the caller still answers."""
    with Runtime(engine_config=EngineConfig(pooling_instances=1)) as runtime:
        assert runtime.engine.config.pooling_instances == 1
        loop = runtime.http_executor(
            "loop", runtime.load(modules.call_loop("loop"), name="loop"), limits=Limits()
        )
        response = loop.invoke(HttpRequest())
        assert response.body == b"deep"
        assert loop.usage.snapshot().errors_by_reason.get("Overloaded") == 1
        # The slot is free again once the instance has ended.
        assert loop.invoke(HttpRequest()).body == b"deep"


def test_without_the_pool(examples: dict[str, Path]) -> None:
    with Runtime(engine_config=EngineConfig(pooling_instances=0)) as runtime:
        assert runtime.engine.config.fingerprint() != EngineConfig().fingerprint()
        hello = runtime.load(examples["hello"].read_bytes(), name="hello")
        assert b"Hello from Pollen" in hello.run().stdout
        membomb = runtime.load(examples["membomb"].read_bytes(), name="membomb")
        with pytest.raises(MemoryLimitExceeded):
            membomb.run(limits=Limits(memory_bytes=16 * MIB, timeout_ms=5000))
