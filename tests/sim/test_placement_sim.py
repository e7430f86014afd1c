"""Placement by claims across simulated swarms: exact counts, no flapping, partitions, seeds."""

from __future__ import annotations

from typing import Any

import pytest

from pollen.sim.simulation import Simulation, placement_swarm

pytestmark = pytest.mark.sim


def workload(name: str, replicas: int, spread: str = "preferred") -> dict[str, Any]:
    return {
        "apiVersion": "pollen.dev/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": name, "generation": 1},
        "spec": {
            "artifact": "sha256:" + "a" * 64,
            "replicas": replicas,
            "placement": {"spread": spread},
        },
    }


def exact(sim: Simulation, name: str, count: int, nodes: list[str] | None = None) -> bool:
    """Every node (of ``nodes``) holds ``count`` claims of ``name``, and the same ones."""
    chosen = nodes or [n.name for n in sim.alive_nodes()]
    views = {tuple(sorted(sim.replicas(n, name).items())) for n in chosen}
    return len(views) == 1 and len(next(iter(views))) == count


def test_replicas_converge_to_exactly_the_count_and_never_flap() -> None:
    sim, log = placement_swarm(100, seed=5)
    sim.write("n000", "Workload", "web", workload("web", 5))
    sim.write("n050", "Workload", "api", workload("api", 12, spread="strict"))
    for name, count in (("web", 5), ("api", 12)):
        took = sim.run_until_condition(lambda n=name, c=count: exact(sim, n, c), 30.0, 0.05)
        assert took is not None, f"{name} never converged to {count} claims"
    converged = sim.now
    placed = sim.replicas("n001", "api")
    assert len(set(placed.values())) == 12, "strict spread: one replica per node"
    sim.run_for(60.0)
    assert log.count("web", converged) == 0 and log.count("api", converged) == 0, "flapping"
    assert exact(sim, "web", 5) and exact(sim, "api", 12)
    # With views agreeing, claims are nearly free of conflict.
    assert log.count("web") <= 5 + 2 and log.count("api") <= 12 + 4


def test_a_killed_holders_replicas_are_claimed_elsewhere() -> None:
    sim, log = placement_swarm(60, seed=9)
    sim.write("n000", "Workload", "web", workload("web", 4))
    assert sim.run_until_condition(lambda: exact(sim, "web", 4), 30.0, 0.05) is not None
    victim = sorted(sim.replicas("n000", "web").values())[0]
    sim.kill(victim)

    def replaced() -> bool:
        return all(
            sum(1 for holder in sim.replicas(n.name, "web").values() if holder != victim) == 4
            for n in sim.alive_nodes()
        )

    assert sim.run_until_condition(replaced, 60.0, 0.1) is not None
    settled = sim.now
    sim.run_for(30.0)
    assert log.count("web", settled) == 0


def test_both_sides_of_a_partition_run_their_share_and_heal_to_the_exact_count() -> None:
    sim, log = placement_swarm(60, seed=3)
    sim.write("n000", "Workload", "web", workload("web", 4, spread="strict"))
    assert sim.run_until_condition(lambda: exact(sim, "web", 4), 30.0, 0.05) is not None
    left, right = sim.names[:30], sim.names[30:]
    sim.partition([left, right])

    def side_runs(side: list[str]) -> bool:
        members = set(side)
        return all(
            sum(1 for holder in sim.replicas(n, "web").values() if holder in members) == 4
            for n in side
        )

    # Each side sees the other as dead, and runs the full count on its own nodes.
    assert sim.run_until_condition(lambda: side_runs(left) and side_runs(right), 120.0, 0.2)
    sim.heal()
    took = sim.run_until_condition(lambda: exact(sim, "web", 4), 120.0, 0.2)
    assert took is not None, "after healing, the surplus claims were not withdrawn"
    holders = set(sim.replicas("n000", "web").values())
    assert len(holders) == 4, "strict spread holds after the heal"
    settled = sim.now
    sim.run_for(60.0)
    assert log.count("web", settled) == 0, "flapping after the heal"


def test_the_same_seed_places_the_same_way() -> None:
    outcomes = []
    for _ in range(2):
        sim, log = placement_swarm(40, seed=11)
        sim.write("n003", "Workload", "web", workload("web", 6))
        sim.run_until_condition(lambda sim=sim: exact(sim, "web", 6), 30.0, 0.05)
        sim.run_for(5.0)
        outcomes.append(
            (sorted(sim.replicas("n000", "web").items()), [(c[1], c[3], c[4]) for c in log.changes])
        )
    assert outcomes[0] == outcomes[1]
