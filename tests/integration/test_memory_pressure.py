"""A node short of memory (here: one told to keep more than the machine has) says so on its
Node and gets no replicas; placement puts them elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from pollen.api.errors import ApiError
from tests.helpers import wait_for
from tests.integration.test_mesh_nodes import Swarm

pytestmark = pytest.mark.integration

RESERVE_MB = str(1 << 40)  # more than any machine has: always under pressure


def condition(swarm: Swarm, observer: str, node: str, kind: str) -> dict[str, str] | None:
    try:
        obj = swarm.client(observer).get("nodes", node)
    except ApiError:
        return None
    found = [c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind]
    return found[0] if found else None


def test_a_node_under_memory_pressure_holds_no_replicas(
    tmp_path: Path, pollen_env: dict[str, str]
) -> None:
    swarm = Swarm(tmp_path, pollen_env)
    try:
        swarm.first("n1")
        swarm.join("n2", extra=["--memory-reserve", RESERVE_MB])
        wait_for(
            lambda: (
                (c := condition(swarm, "n1", "n2", "MemoryPressure")) is not None
                and c["status"] == "True"
                and c["reason"] == "LowMemory"
            ),
            timeout=60,
            what="n2's MemoryPressure=True as n1 sees it",
        )
        swarm.client("n1").apply(
            [
                {
                    "apiVersion": "pollen.dev/v1alpha1",
                    "kind": "Workload",
                    "metadata": {"name": "spread"},
                    "spec": {
                        "artifact": "sha256:" + "5" * 64,
                        "replicas": 2,
                        "placement": {"spread": "strict"},
                    },
                }
            ]
        )

        def scheduled() -> dict[str, str] | None:
            try:
                obj = swarm.client("n2").get("workloads", "spread")
            except ApiError:
                return None  # not gossiped to n2 yet
            found = [c for c in obj.get("status", {}).get("conditions", [])
                     if c["type"] == "Scheduled"]  # fmt: skip
            return found[0] if found else None

        wait_for(
            lambda: (c := scheduled()) is not None and c["reason"] == "SpreadUnsatisfiable",
            timeout=60,
            what="strict spread unsatisfiable: only n1 may hold a replica",
        )
        holders = {
            r["spec"]["node"]
            for r in swarm.client("n2").list("replicas")
            if r["spec"]["workload"] == "spread"
        }
        assert holders == {"n1"}
    finally:
        for node in swarm.nodes.values():
            node.kill()
