"""Eviction under memory pressure, on a real store and the real reconciler framework.

The memory probe is the one input given by the test (as a clock would be): the rest is the
node's own code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pollen.reconcilers.eviction import MEMORY_PRESSURE, MemoryPressureEvictor
from pollen.reconcilers.manager import ControllerSettings, ReconcilerManager
from pollen.resources.models import ConditionStatus, Node, ObjectMeta, from_dict
from pollen.state import ResourceStore
from pollen.state.events import EventLog
from tests.helpers import wait_until

ME = "node-1"
FAST = ControllerSettings(workers=1, timeout=5, resync_period=3600, base_delay=0.02, max_delay=0.1)


def objects() -> list[Any]:
    made = [Node(metadata=ObjectMeta(name=ME)), Node(metadata=ObjectMeta(name="node-2"))]
    for name, priority in (("batch", -10), ("web", 100), ("api", 0)):
        made.append(from_dict({
            "apiVersion": "pollen.dev/v1alpha1", "kind": "Workload", "metadata": {"name": name},
            "spec": {"artifact": "sha256:" + "a" * 64, "priority": priority},
        }))  # fmt: skip
        for node in (ME, "node-2"):
            made.append(from_dict({
                "apiVersion": "pollen.dev/v1alpha1", "kind": "Replica",
                "metadata": {"name": f"{name}-{node}"},
                "spec": {"workload": name, "node": node, "score": 1.0},
            }))  # fmt: skip
    return made


class Memory:
    def __init__(self) -> None:
        self.available = 8000

    def __call__(self) -> int:
        return self.available


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[ResourceStore, EventLog, Memory]]:
    store = ResourceStore.open(tmp_path / "state")
    store.apply(objects())
    events = EventLog(ME, clock=__import__("datetime").datetime.now)
    memory = Memory()
    manager = ReconcilerManager(store, events, node_name=ME, settings=FAST)
    manager.add(MemoryPressureEvictor(memory, reserve_mb=500, margin_mb=100, interval=0.05))
    await manager.start()
    try:
        yield store, events, memory
    finally:
        await manager.stop()
        store.close()


def own(store: ResourceStore) -> list[str]:
    return sorted(r.name for r in store.list("Replica") if r.spec.node == ME)  # type: ignore[attr-defined]


def pressure(store: ResourceStore) -> ConditionStatus | None:
    condition = store.get("Node", ME).condition(MEMORY_PRESSURE)  # type: ignore[union-attr]
    return None if condition is None else condition.status


async def test_replicas_are_evicted_lowest_priority_first_until_memory_is_back(
    setup: tuple[ResourceStore, EventLog, Memory],
) -> None:
    store, events, memory = setup
    await wait_until(lambda: pressure(store) is ConditionStatus.FALSE, 5, "MemoryPressure False")
    assert len(own(store)) == 3
    memory.available = 300
    await wait_until(lambda: own(store) == ["web-node-1"], 5, "batch and api evicted, not web")
    evicted = [e.name for e in events.list("Replica") if e.reason == "Evicted"]
    assert evicted[:2] == ["batch-node-1", "api-node-1"], "lowest priority first"
    assert pressure(store) is ConditionStatus.TRUE
    assert all(r.spec.node == "node-2" for r in store.list("Replica") if r.name.endswith("2"))  # type: ignore[attr-defined]
    assert [e.name for e in events.list("Workload") if e.reason == "Evicted"][:1] == ["batch"]
    # Above the reserve but within the margin: still under pressure (no flapping) ...
    memory.available = 550
    await wait_until(lambda: own(store) == [], 5, "the last replica evicted too")
    assert pressure(store) is ConditionStatus.TRUE
    # ... and clear above reserve + margin.
    memory.available = 700
    await wait_until(lambda: pressure(store) is ConditionStatus.FALSE, 5, "MemoryPressure False")
    assert len([r for r in store.list("Replica") if r.spec.node == "node-2"]) == 3  # type: ignore[attr-defined]
