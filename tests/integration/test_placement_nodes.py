"""Placement by claims across real node processes: apply, spread, why-not, kill -9."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pollen.api.errors import ApiError
from tests.helpers import wait_for
from tests.integration.test_mesh_nodes import Swarm, running_swarm

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["n1", "n2", "n3"]


def workload(name: str, artifact: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "pollen.dev/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": name},
        "spec": {"artifact": artifact, "executor": "http", **spec},
    }


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    """Three nodes, every one Ready everywhere, with ``hello`` pushed to n1 as Artifact hello."""
    with running_swarm(tmp_path_factory.mktemp("placement"), NAMES, push=["hello"]) as swarm:
        yield swarm


def replicas_of(swarm: Swarm, observer: str, name: str) -> list[dict[str, Any]]:
    try:
        items = swarm.client(observer).list("replicas")
    except ApiError:
        return []
    return [r for r in items if r["spec"]["workload"] == name]


def condition(swarm: Swarm, observer: str, name: str, kind: str) -> dict[str, Any] | None:
    try:
        obj = swarm.client(observer).get("workloads", name)
    except ApiError:
        return None
    found = [c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind]
    return found[0] if found else None


def ready_on(swarm: Swarm, observer: str, name: str, count: int, avoid: str = "") -> bool:
    ready = [
        r
        for r in replicas_of(swarm, observer, name)
        if r.get("status", {}).get("phase") == "Ready" and r["spec"]["node"] != avoid
    ]
    return len(ready) == count


def changes_within(swarm: Swarm, observer: str, name: str, seconds: float) -> list[Any]:
    """Changes to ``name``'s Replicas that ``observer`` streams over ``seconds`` from now."""
    listed = False
    changes = []
    try:
        for event in swarm.client(observer).watch("replicas", timeout=seconds):
            if event["type"] == "BOOKMARK":
                listed = True
            elif listed and event["object"]["spec"]["workload"] == name:
                changes.append(event)
    except TimeoutError:
        pass
    return changes


def test_replicas_are_placed_on_distinct_nodes_and_become_ready(trio: Swarm) -> None:
    trio.client("n2").apply([workload("hello", "hello", replicas=2)])
    wait_for(
        lambda: (
            (c := condition(trio, "n3", "hello", "Ready")) is not None and c["status"] == "True"
        ),
        timeout=60,
        what="Workload hello Ready as n3 sees it",
    )
    placed = replicas_of(trio, "n3", "hello")
    assert len(placed) == 2
    assert len({r["spec"]["node"] for r in placed}) == 2, "preferred spread: distinct nodes"
    for replica in placed:
        assert replica["status"]["phase"] == "Ready"
        assert replica["spec"]["score"] > 0
        assert replica["spec"]["artifact"].startswith("sha256:")
    status = trio.client("n1").get("workloads", "hello")["status"]
    assert (status["replicas"], status["readyReplicas"]) == (2, 2)
    # Scaling is not a new version: the two replicas stay, a third one joins them.
    before = {r["metadata"]["name"] for r in placed}
    trio.client("n1").apply([workload("hello", "hello", replicas=3)])
    wait_for(lambda: ready_on(trio, "n2", "hello", 3), timeout=60, what="hello scaled to 3")
    after = {r["metadata"]["name"] for r in replicas_of(trio, "n2", "hello")}
    assert before < after, "scaling restarted replicas"
    trio.client("n1").apply([workload("hello", "hello", replicas=2)])
    wait_for(lambda: ready_on(trio, "n2", "hello", 2), timeout=60, what="hello back to 2")


@pytest.mark.parametrize(
    ("name", "spec", "reason", "placed"),
    [
        ("too-big", {"replicas": 1, "resources": {"memoryMB": 1048576}}, "InsufficientCapacity", 0),
        ("too-spread", {"replicas": 5, "placement": {"spread": "strict"}},
         "SpreadUnsatisfiable", 3),
        ("nowhere", {"replicas": 1, "placement": {"nodeSelector": {"zone": "mars"}}},
         "NoMatchingNode", 0),
        ("capped", {"replicas": 3, "budget": {"maxInstances": 1}}, "BudgetExceeded", 1),
        ("ghost", {"replicas": 1, "artifact": "no-such-artifact"}, "ArtifactNotFound", 0),
    ],
)  # fmt: skip
def test_what_cannot_be_placed_says_why_and_nothing_oscillates(
    trio: Swarm, name: str, spec: dict[str, Any], reason: str, placed: int
) -> None:
    artifact = spec.pop("artifact", "hello")
    trio.client("n1").apply([workload(name, artifact, **spec)])
    wait_for(
        lambda: (
            (c := condition(trio, "n2", name, "Scheduled")) is not None
            and c["status"] == "False"
            and c["reason"] == reason
            and ready_on(trio, "n2", name, placed)
        ),
        timeout=60,
        what=f"{name}: Scheduled=False {reason} with {placed} replicas Ready",
    )
    message = condition(trio, "n2", name, "Scheduled")["message"]  # type: ignore[index]
    assert message.strip(), "the condition says why in a sentence"
    # Concurrent claims may still be settling (a node that claimed on a stale view withdraws);
    # once a quiet stretch is seen, nothing moves any more.
    wait_for(
        lambda: changes_within(trio, "n3", name, seconds=3.0) == [],
        timeout=30,
        what=f"{name}: a quiet stretch",
    )
    assert changes_within(trio, "n3", name, seconds=3.0) == [], f"{name}: replicas kept moving"
    assert ready_on(trio, "n3", name, placed)
    trio.client("n1").delete("workloads", name)


def test_a_killed_holders_replicas_are_ready_elsewhere(trio: Swarm) -> None:
    wait_for(lambda: ready_on(trio, "n1", "hello", 2), timeout=60, what="hello placed")
    holders = {r["spec"]["node"] for r in replicas_of(trio, "n1", "hello")}
    victim = sorted(holders - {"n1"})[0] if holders - {"n1"} else sorted(holders)[-1]
    observer = next(n for n in NAMES if n != victim)
    trio.nodes[victim].kill()
    started = time.monotonic()
    wait_for(
        lambda: ready_on(trio, observer, "hello", 2, avoid=victim),
        timeout=30,
        what=f"hello's replicas Ready on the nodes other than {victim}",
    )
    print(f"\nreplicas of {victim} Ready elsewhere after {time.monotonic() - started:.1f}s")
