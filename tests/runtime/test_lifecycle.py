"""Instance lifecycle: the phase state machine, health, usage and node telemetry."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pollen.resources.models import ConditionStatus, ReplicaPhase, WorkloadSpec
from pollen.runtime.executors import Backoff, RestartPolicy
from pollen.runtime.lifecycle import (
    TRANSITIONS,
    IllegalTransition,
    InstanceLifecycle,
    PhaseChange,
    WorkloadInstance,
)
from pollen.runtime.runtime import Runtime
from pollen.runtime.telemetry import UsageCounters, node_telemetry
from pollen.runtime.wagi import HttpRequest
from tests.helpers import wait_for
from tests.runtime import modules

P = ReplicaPhase


def test_happy_path_and_condition() -> None:
    seen: list[PhaseChange] = []
    life = InstanceLifecycle(on_change=seen.append, clock=lambda: 1_700_000_000.0)
    assert life.phase is P.PENDING
    for phase in (P.FETCHING, P.STARTING, P.READY):
        life.to(phase)
    condition = life.ready_condition(observed_generation=3)
    assert condition.status is ConditionStatus.TRUE
    assert condition.observed_generation == 3
    assert condition.last_transition_time == "2023-11-14T22:13:20Z"
    life.to(P.DRAINING)
    life.to(P.STOPPED, "Stopped", "bye")
    assert [c.phase for c in seen] == [P.FETCHING, P.STARTING, P.READY, P.DRAINING, P.STOPPED]
    assert life.ready_condition().status is ConditionStatus.FALSE
    assert life.ready_condition().message == "bye"


@pytest.mark.parametrize(
    ("start", "target"),
    [(P.STOPPED, P.READY), (P.PENDING, P.READY), (P.READY, P.STARTING), (P.DRAINING, P.READY)],
)
def test_illegal_transitions(start: ReplicaPhase, target: ReplicaPhase) -> None:
    life = InstanceLifecycle()
    path = {
        P.PENDING: [],
        P.READY: [P.STARTING, P.READY],
        P.DRAINING: [P.STARTING, P.READY, P.DRAINING],
        P.STOPPED: [P.STOPPED],
    }[start]
    for phase in path:
        life.to(phase)
    with pytest.raises(IllegalTransition):
        life.to(target)


def test_every_phase_can_fail_or_stop_except_the_end() -> None:
    for phase, allowed in TRANSITIONS.items():
        if phase is P.STOPPED:
            assert not allowed
        else:
            assert P.STOPPED in allowed or P.FAILED in allowed
    assert TRANSITIONS[P.FAILED] == {P.PENDING, P.STOPPED}


def test_usage_counters() -> None:
    usage = UsageCounters()
    usage.instance_started()
    usage.request()
    snap = usage.snapshot()
    assert snap.instances == 1 and snap.requests == 1
    usage.instance_ended(memory_bytes=2 << 20, cpu_seconds=0.5)
    usage.instance_started()
    assert usage.snapshot().memory_bytes == 2 << 20  # counted at the last instance's size
    usage.instance_ended(memory_bytes=3 << 20, cpu_seconds=0.25)
    usage.error("Timeout")
    snap = usage.snapshot()
    assert snap.instances == 0
    assert snap.instances_total == 2
    assert snap.memory_bytes == 0
    assert snap.memory_peak_bytes == 3 << 20
    assert snap.cpu_seconds == pytest.approx(0.75)
    assert snap.errors_by_reason == {"Timeout": 1}


def test_node_telemetry() -> None:
    first = node_telemetry()
    assert first.cpu_percent is None
    assert first.cpu_count >= 1
    assert 0 < first.memory_available_bytes <= first.memory_total_bytes
    assert 0 <= first.memory_used_percent <= 100
    assert first.process_rss_bytes > 0
    total = sum(range(200_000))  # some CPU time between the samples
    second = node_telemetry(first)
    assert total > 0
    assert second.cpu_percent is None or 0 <= second.cpu_percent <= 100


async def test_http_instance(runtime: Runtime, examples: dict[str, Path]) -> None:
    phases: list[ReplicaPhase] = []
    instance = WorkloadInstance(
        runtime,
        "hello",
        WorkloadSpec(artifact="hello", health_path="/healthz"),
        on_change=lambda change: phases.append(change.phase),
    )
    instance.fetching()
    assert await instance.start(examples["hello"].read_bytes()) is P.READY
    assert (await instance.probe()).healthy
    response = await instance.handle(HttpRequest())
    assert response.body == b"Hello from Pollen!\n"
    assert instance.usage.snapshot().requests >= 2  # the health probe, then the request
    await instance.stop()
    assert phases == [P.FETCHING, P.STARTING, P.READY, P.DRAINING, P.STOPPED]
    refused = await instance.handle(HttpRequest())
    assert refused.status == 503
    assert "hello" not in runtime.local.names()


async def test_invalid_module_fails_the_instance(runtime: Runtime) -> None:
    instance = WorkloadInstance(runtime, "junk", WorkloadSpec(artifact="junk"))
    assert await instance.start(b"\x00asm\x01\x00\x00\x00\xff") is P.FAILED
    condition = instance.lifecycle.ready_condition()
    assert condition.reason == "InvalidModule"
    assert "junk" in condition.message


async def test_unhealthy_instance_fails(runtime: Runtime) -> None:
    instance = WorkloadInstance(
        runtime,
        "sad",
        WorkloadSpec(artifact="sad", health_path="/healthz"),
        health_timeout=0.2,
        health_interval=0.01,
    )
    wasm = modules.writes(b"Status: 500\n\nnot well")
    assert await instance.start(wasm) is P.FAILED
    assert instance.lifecycle.current.reason == "HealthCheckFailed"
    assert "500" in instance.lifecycle.current.message


async def test_command_instance_completes(runtime: Runtime, examples: dict[str, Path]) -> None:
    spec = WorkloadSpec(artifact="cpu", executor="command", args=["--iterations", "1000"])
    instance = WorkloadInstance(runtime, "cpu", spec)
    assert await instance.start(examples["cpu"].read_bytes()) is P.READY
    await asyncio.to_thread(wait_for, lambda: instance.phase is P.STOPPED, 20.0, "completion")
    assert instance.lifecycle.current.reason == "Completed"
    assert instance.logs.text("stdout") == "primes below 1000: 168"


async def test_failing_command_instance(runtime: Runtime, examples: dict[str, Path]) -> None:
    spec = WorkloadSpec(artifact="trap", executor="command")
    instance = WorkloadInstance(
        runtime, "trap", spec, restart=RestartPolicy.NEVER, backoff=Backoff(initial=0.01)
    )
    await instance.start(examples["trap"].read_bytes())
    await asyncio.to_thread(wait_for, lambda: instance.phase is P.FAILED, 20.0, "failure")
    assert instance.lifecycle.current.reason == "Trapped"
    assert instance.usage.snapshot().errors_by_reason == {"Trapped": 1}


async def test_stopping_a_restarting_job(runtime: Runtime, examples: dict[str, Path]) -> None:
    spec = WorkloadSpec(artifact="cpu", executor="command", args=["--exit", "1"])
    instance = WorkloadInstance(runtime, "cpu", spec, backoff=Backoff(initial=3600))
    await instance.start(examples["cpu"].read_bytes())
    await asyncio.to_thread(
        wait_for, lambda: instance.logs.text("system").count("restarting") == 1, 20.0, "backoff"
    )
    await instance.stop()
    assert instance.phase is P.STOPPED
