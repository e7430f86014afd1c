"""Whole swarms in the simulator: convergence, partitions, failures, determinism.

Every test here runs the real membership, Vivaldi, topology and document gossip code on
virtual time; together they take well under a minute of CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from pollen.mesh.topology import connected_components
from pollen.sim import NetworkConfig, Simulation
from pollen.sim.network import Network
from pollen.sim.node import GOSSIP, MEMBERSHIP

pytestmark = [pytest.mark.sim, pytest.mark.timeout(180)]


def workload(name: str, replicas: int = 3) -> dict[str, Any]:
    return {
        "apiVersion": "pollen.dev/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": name, "generation": 1, "uid": f"uid-{name}"},
        "spec": {
            "artifact": "sha256:" + "a" * 64,
            "replicas": replicas,
            "executor": "http",
            "resources": {"memoryMB": 64, "cpuMillis": 100},
        },
    }


@pytest.fixture(scope="module")
def swarm() -> Iterator[Simulation]:
    """500 nodes with membership, shared by the tests that only move it forward."""
    sim = Simulation(500, seed=11)
    sim.run_until(3.0)
    yield sim


def test_500_nodes_converge_on_a_new_workload(swarm: Simulation) -> None:
    watch = swarm.watch("Workload", "web")
    swarm.write("n123", "Workload", "web", workload("web"))
    swarm.run_for(3.0)
    reached = watch.time_to_reach(0.99, 500)
    assert reached is not None and reached < 3.0
    assert watch.time_to_reach(1.0, 500) is not None
    assert swarm.converged()
    assert swarm.coverage("Workload", "web") == 1.0


def test_the_union_of_peer_choices_is_one_component(swarm: Simulation) -> None:
    choices = {node.name: node.choice.peers for node in swarm.alive_nodes()}
    assert len(connected_components(choices)) == 1
    assert all(len(peers) == swarm.topology_config.total for peers in choices.values())


def test_an_idle_swarm_gossips_almost_nothing(swarm: Simulation) -> None:
    swarm.run_for(2.0)  # let any earlier write settle
    snapshot, start = swarm.network.stats.copy(), swarm.now
    swarm.run_for(6.0)
    traffic = swarm.traffic_since(snapshot, start)
    # One 9-byte digest a second, plus the odd new link; membership is far louder.
    assert traffic.bytes_per_node_second(GOSSIP) < 40
    assert traffic.bytes_per_node_second(MEMBERSHIP) > traffic.bytes_per_node_second(GOSSIP)


@pytest.mark.parametrize(("n_nodes", "membership"), [(100, True), (500, False)])
def test_a_partition_keeps_both_halves_working_and_heals(n_nodes: int, membership: bool) -> None:
    sim = Simulation(n_nodes, seed=3, membership=membership)
    sim.run_until(5.0)
    left, right = sim.names[: n_nodes // 2], sim.names[n_nodes // 2 :]
    sim.partition([left, right])
    sim.run_for(1.0)
    for i in range(3):
        sim.write(left[i], "Workload", f"left-{i}", workload(f"left-{i}"))
        sim.write(right[i], "Workload", f"right-{i}", workload(f"right-{i}"))
    sim.run_for(5.0)
    # Both halves keep working: each converged on its own writes, and saw none of the other.
    assert sim.converged(left) and sim.converged(right)
    assert sim.coverage("Workload", "left-2", left) == 1.0
    assert sim.coverage("Workload", "right-2", right) == 1.0
    assert sim.coverage("Workload", "left-0", right) == 0.0
    if membership:
        # Long enough for each half to declare the other dead and re-choose its peers.
        sim.run_for(40.0)
        membership_view = sim.nodes[left[0]].membership
        assert membership_view is not None
        alive = [m for m in membership_view.members().values() if m.state.value == "alive"]
        assert len(alive) == len(left)
    sim.write(left[5], "Workload", "late-left", workload("late-left"))
    sim.write(right[5], "Workload", "late-right", workload("late-right"))
    sim.run_for(2.0)
    sim.heal()
    took = sim.run_until_condition(sim.converged, timeout=90.0, check_every=0.5)
    assert took is not None, "the two halves never converged after the partition healed"
    expected = sorted(
        [f"left-{i}" for i in range(3)]
        + [f"right-{i}" for i in range(3)]
        + ["late-left", "late-right"]
    )
    assert all(node.document.names("Workload") == expected for node in sim.alive_nodes())


def test_a_killed_node_is_routed_around() -> None:
    sim = Simulation(60, seed=5)
    sim.run_until(5.0)
    victim = "n010"
    chosen_by = [n.name for n in sim.alive_nodes() if victim in n.choice.peers]
    assert chosen_by
    sim.kill(victim)
    sim.run_for(30.0)  # suspicion, then death, then a new choice of peers
    assert all(victim not in node.choice.peers for node in sim.alive_nodes())
    watch = sim.watch("Workload", "after-kill")
    sim.write("n020", "Workload", "after-kill", workload("after-kill"))
    sim.run_for(3.0)
    assert watch.time_to_reach(1.0, len(sim.alive_nodes())) is not None
    assert victim not in watch.seen


def test_nodes_that_join_through_seeds_find_everyone_and_converge() -> None:
    sim = Simulation(40, seed=4, warm_start=False)
    sim.write("n039", "Workload", "early", workload("early"))
    took = sim.run_until_condition(sim.converged, timeout=30.0, check_every=0.5)
    assert took is not None
    for node in sim.alive_nodes():
        assert node.membership is not None
        assert len(node.membership.members()) == 40
        assert node.document.names("Workload") == ["early"]


def test_gossip_converges_over_a_lossy_network() -> None:
    sim = Simulation(200, seed=8, loss=0.05)
    sim.run_until(3.0)
    for i in range(5):
        sim.write(sim.names[i * 37], "Workload", f"w-{i}", workload(f"w-{i}"))
        sim.run_for(0.2)
    took = sim.run_until_condition(sim.converged, timeout=30.0, check_every=0.5)
    assert took is not None
    assert sim.network.stats.channel(GOSSIP).lost > 0


def _run(seed: int) -> tuple[str, list[str]]:
    sim = Simulation(60, seed=seed)
    sim.run_until(4.0)
    sim.write("n001", "Workload", "one", workload("one"))
    sim.run_for(2.0)
    sim.kill("n002")
    sim.partition([sim.names[:30], sim.names[30:]])
    sim.write("n040", "Workload", "two", workload("two"))
    sim.run_for(3.0)
    sim.heal()
    sim.run_for(5.0)
    return sim.trace_hash(), sorted(sim.nodes["n050"].choice.peers)


def test_the_same_seed_gives_the_same_run() -> None:
    first, second = _run(21), _run(21)
    assert first == second
    other = _run(22)
    assert other[0] != first[0]


def test_network_model() -> None:
    import random

    config = NetworkConfig(regions=3, jitter=0.0)
    names = [f"n{i}" for i in range(9)]
    net = Network(names, config, random.Random(1))
    same_region = net.rtt("n0", "n3")
    other_region = net.rtt("n0", "n1")
    assert net.rtt("n0", "n1") == net.rtt("n1", "n0")
    assert same_region < config.min_region_rtt <= other_region + 0.01
    assert net.address_of["n0"].split("::")[0] == net.address_of["n3"].split("::")[0]
    # In order per link: a later message never overtakes an earlier one.
    arrivals = [net.send(0.0 + i * 1e-6, "n0", "n1", "x", b"p", True) for i in range(20)]
    assert arrivals == sorted(arrivals)
    net.partition([["n0"], ["n1"]])
    assert not net.reachable("n0", "n1")
    assert net.reachable("n2", "n4")  # neither listed: one group of their own
    assert net.send(1.0, "n0", "n1", "x", b"p", True) is None
    net.heal()
    assert net.reachable("n0", "n1")
    assert net.send(2.0, "n0", "n1", "x", b"p", False) is None  # dead destination
    assert net.stats.channel("x").lost == 2
