"""The sandbox: every rogue module ends as a clear, typed error, and the engine keeps serving."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pollen.runtime.engine import EngineConfig
from pollen.runtime.errors import (
    FuelExhausted,
    InstanceTrapped,
    InvalidModule,
    MemoryLimitExceeded,
    MissingExport,
    MissingImport,
    SandboxError,
    Timeout,
)
from pollen.runtime.runtime import Runtime
from pollen.runtime.sandbox import MIB, Limits
from tests.runtime import modules

LIMITS = Limits(memory_bytes=16 * MIB, timeout_ms=200)


def _one_sentence(error: SandboxError) -> None:
    text = str(error)
    assert "\n" not in text
    assert len(text) < 300
    assert error.workload in text


def _hello_still_serves(runtime: Runtime, examples: dict[str, Path]) -> None:
    hello = runtime.load(examples["hello"].read_bytes(), name="hello")
    result = hello.run(limits=LIMITS)
    assert result.exit_code == 0
    assert b"Hello from Pollen" in result.stdout


def test_spin_times_out(runtime: Runtime, examples: dict[str, Path]) -> None:
    spin = runtime.load(examples["spin"].read_bytes(), name="spin")
    started = time.monotonic()
    with pytest.raises(Timeout) as caught:
        spin.run(limits=LIMITS)
    elapsed = time.monotonic() - started
    # Never before the timeout; the upper bound only guards against "never stopped".
    assert elapsed >= 0.2
    assert elapsed < 10
    assert caught.value.reason == "Timeout"
    assert "200 ms timeout" in str(caught.value)
    _one_sentence(caught.value)
    _hello_still_serves(runtime, examples)


def test_interrupt_all_stops_a_long_run(runtime: Runtime, examples: dict[str, Path]) -> None:
    """At shutdown the node advances the epoch to stop instances with long timeouts."""
    import threading

    spin = runtime.load(examples["spin"].read_bytes(), name="spin")
    limits = Limits(timeout_ms=600_000)
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            spin.run(limits=limits)
        except SandboxError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 20
    while worker.is_alive() and time.monotonic() < deadline:
        runtime.engine.interrupt_all(runtime.engine.deadline_ticks(limits.timeout_ms))
        worker.join(timeout=0.05)
    assert not worker.is_alive()
    assert isinstance(outcome[0], Timeout)


def test_membomb_hits_the_memory_limit(runtime: Runtime, examples: dict[str, Path]) -> None:
    bomb = runtime.load(examples["membomb"].read_bytes(), name="membomb")
    with pytest.raises(MemoryLimitExceeded) as caught:
        bomb.run(limits=LIMITS)
    error = caught.value
    assert error.limit == 16 * MIB
    assert 0 < error.used <= 16 * MIB
    assert "16 MiB" in str(error)
    _one_sentence(error)
    _hello_still_serves(runtime, examples)


def test_membomb_respects_a_larger_limit(runtime: Runtime, examples: dict[str, Path]) -> None:
    bomb = runtime.load(examples["membomb"].read_bytes(), name="membomb")
    with pytest.raises(MemoryLimitExceeded) as caught:
        bomb.run(limits=Limits(memory_bytes=48 * MIB, timeout_ms=5000))
    assert 32 * MIB < caught.value.used <= 48 * MIB


def test_trap_is_reported(runtime: Runtime, examples: dict[str, Path]) -> None:
    trap = runtime.load(examples["trap"].read_bytes(), name="trap")
    with pytest.raises(InstanceTrapped) as caught:
        trap.run(limits=LIMITS)
    assert caught.value.trap_code == "unreachable"
    assert "unreachable" in str(caught.value)
    _one_sentence(caught.value)
    _hello_still_serves(runtime, examples)


def test_missing_import_is_named(runtime: Runtime, examples: dict[str, Path]) -> None:
    with pytest.raises(MissingImport) as caught:
        runtime.load(examples["missing-import"].read_bytes(), name="missing-import")
    assert caught.value.missing == ("env.launch_missiles",)
    assert "env.launch_missiles" in str(caught.value)
    _one_sentence(caught.value)
    _hello_still_serves(runtime, examples)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not wasm at all",
        b"(module)",  # WAT text: wasmtime-py would compile it; hostile input must not be
        b"\x00asm\x0d\x00\x01\x00",  # a component
        b"\x00asm\x01\x00\x00\x00\x01\xff\xff",  # a truncated section
        b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 64,
    ],
)
def test_bytes_that_are_not_a_module(
    runtime: Runtime, examples: dict[str, Path], data: bytes
) -> None:
    with pytest.raises(InvalidModule) as caught:
        runtime.load(data, name="junk")
    _one_sentence(caught.value)
    _hello_still_serves(runtime, examples)


def test_module_without_start(runtime: Runtime) -> None:
    with pytest.raises(MissingExport) as caught:
        runtime.load(modules.no_start(), name="reactor")
    assert "_start" in str(caught.value)


def test_memory_too_large_at_start(runtime: Runtime) -> None:
    big = runtime.load(modules.big_memory(pages=100), name="big")  # 6.25 MiB up front
    with pytest.raises(MemoryLimitExceeded) as caught:
        big.run(limits=Limits(memory_bytes=4 * MIB))
    assert "at start" in str(caught.value)
    assert big.run(limits=Limits(memory_bytes=8 * MIB)).exit_code == 0


def test_fuel_limits_instructions(examples: dict[str, Path]) -> None:
    with Runtime(engine_config=EngineConfig(fuel=True)) as runtime:
        cpu = runtime.load(examples["cpu"].read_bytes(), name="cpu")
        with pytest.raises(FuelExhausted):
            cpu.run(args=["--iterations", "1000000"], limits=Limits(fuel=100_000))
        result = cpu.run(args=["--iterations", "1000"], limits=Limits(fuel=50_000_000))
        assert result.stdout == b"primes below 1000: 168\n"


def test_no_ambient_authority(runtime: Runtime, examples: dict[str, Path]) -> None:
    """No preopened directory, and only the declared environment and arguments."""
    probe = runtime.load(modules.preopen_probe(), name="probe")
    assert probe.run().exit_code == 8  # EBADF: fd 3 is not a preopened directory

    echo = runtime.load(examples["echo"].read_bytes(), name="echo")
    result = echo.run(args=["one", "two"], env={"ONLY": "this"})
    body = json.loads(result.stdout.split(b"\n\n", 1)[1])
    assert body["env"] == {"ONLY": "this"}
    assert body["args"] == ["echo", "one", "two"]
    assert body["bodyLength"] == 0  # stdin is empty, not the host's


def test_instances_do_not_share_state(runtime: Runtime, examples: dict[str, Path]) -> None:
    echo = runtime.load(examples["echo"].read_bytes(), name="echo")
    first = echo.run(stdin=b"first body")
    second = echo.run()
    assert b"first body" in first.stdout
    assert b"first body" not in second.stdout


def test_output_is_bounded(runtime: Runtime, examples: dict[str, Path]) -> None:
    echo = runtime.load(examples["echo"].read_bytes(), name="echo")
    result = echo.run(stdin=b"x" * 10_000, limits=Limits(max_output_bytes=1000))
    assert result.stdout_truncated
    assert len(result.stdout) == 1000


def test_results_report_usage(runtime: Runtime, examples: dict[str, Path]) -> None:
    cpu = runtime.load(examples["cpu"].read_bytes(), name="cpu")
    result = cpu.run(args=["--iterations", "300000"])
    assert result.exit_code == 0
    assert result.memory_bytes > 0
    assert result.cpu_seconds > 0
    assert result.wall_seconds >= result.cpu_seconds * 0.5


def test_host_functions_refuse_bad_pointers(runtime: Runtime) -> None:
    module = runtime.load(modules.bad_pointers(), name="bad")
    assert module.run().exit_code == 105  # 100 - POLLEN_ERR_INVALID, and no trap
