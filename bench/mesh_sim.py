"""Mesh benchmarks in the simulator: how fast a new Workload spreads, what idling costs.

Each run builds a swarm of 500 simulated nodes (membership, Vivaldi, topology and document
gossip, the same code as a node runs), lets it settle for a while of virtual time, writes one
Workload on a random node and records when each node first has it. Median over seeds. The
anchor is Serf's documented figure for a user event: 1,000 nodes in 1.6 s.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

from bench.report import Row, Section, kib
from pollen.sim import Simulation
from pollen.sim.node import GOSSIP, MEMBERSHIP

NODES = 500
SEEDS = (1, 2, 3, 4, 5)
#: Virtual seconds before the write: Vivaldi has a few dozen samples per node by then.
WARMUP = 30.0
#: Virtual seconds watched after the write.
AFTER = 5.0
#: Virtual seconds of idle traffic measured (on the first seed, after the write settled).
IDLE = 30.0
#: One more run with this share of messages lost (membership and gossip alike).
LOSS = 0.02
SERF_SECONDS = 1.6
TARGET_SECONDS = 3.0


def _workload(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "pollen.dev/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": name, "generation": 1, "uid": f"bench-{name}"},
        "spec": {
            "artifact": "sha256:" + "ab" * 32,
            "replicas": 3,
            "executor": "http",
            "resources": {"memoryMB": 32, "cpuMillis": 100},
            "env": {"GREETING": "hello"},
        },
    }


def _rtt_summary(sim: Simulation) -> str:
    """Median RTTs within a region and between regions, from the network model itself."""
    net = sim.network
    names = sim.names[:200]
    same: list[float] = []
    other: list[float] = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            (same if net.region_of[a] == net.region_of[b] else other).append(net.rtt(a, b))
    return (
        f"median RTT {statistics.median(same) * 1000:.1f} ms within a region, "
        f"{statistics.median(other) * 1000:.0f} ms between regions "
        f"(max {max(other) * 1000:.0f} ms)"
    )


@dataclass(frozen=True)
class _Run:
    reach_99: float
    reach_all: float
    wall: float
    virtual: float
    write_bytes_per_node: float
    idle_gossip: float | None = None
    idle_membership: float | None = None
    network: str = ""


def _run(seed: int, *, measure_idle: bool, loss: float = 0.0) -> _Run:
    started = time.perf_counter()
    sim = Simulation(NODES, seed, loss=loss)
    sim.run_until(WARMUP)
    writer = sim.names[random.Random(seed).randrange(NODES)]
    watch = sim.watch("Workload", "bench")
    before = sim.network.stats.copy()
    sim.write(writer, "Workload", "bench", _workload("bench"))
    sim.run_for(AFTER)
    wall = time.perf_counter() - started
    spread = sim.network.stats.minus(before).channel(GOSSIP).bytes
    reach_99 = watch.time_to_reach(0.99, NODES)
    reach_all = watch.time_to_reach(1.0, NODES)
    idle_gossip = idle_membership = None
    if measure_idle:
        snapshot, start = sim.network.stats.copy(), sim.now
        sim.run_for(IDLE)
        traffic = sim.traffic_since(snapshot, start)
        idle_gossip = traffic.bytes_per_node_second(GOSSIP)
        idle_membership = traffic.bytes_per_node_second(MEMBERSHIP)
    return _Run(
        reach_99=float("inf") if reach_99 is None else reach_99,
        reach_all=float("inf") if reach_all is None else reach_all,
        wall=wall,
        virtual=WARMUP + AFTER,
        write_bytes_per_node=spread / NODES,
        idle_gossip=idle_gossip,
        idle_membership=idle_membership,
        network=_rtt_summary(sim),
    )


def _seconds(value: float) -> str:
    return f"{value:.2f} s" if value < 10 else f"{value:.0f} s"


def run() -> Section:
    runs = [_run(seed, measure_idle=i == 0) for i, seed in enumerate(SEEDS)]
    lossy = _run(SEEDS[0], measure_idle=False, loss=LOSS)
    reach = statistics.median(r.reach_99 for r in runs)
    reach_all = statistics.median(r.reach_all for r in runs)
    wall = statistics.median(r.wall for r in runs)
    virtual = runs[0].virtual
    spread = statistics.median(r.write_bytes_per_node for r in runs)
    idle_gossip = runs[0].idle_gossip or 0.0
    idle_membership = runs[0].idle_membership or 0.0
    samples = ", ".join(f"{r.reach_99:.3f}" for r in runs)
    rows = [
        Row(
            f"a new Workload reaches 99% of {NODES} simulated nodes (virtual time)",
            _seconds(reach),
            f"Serf: 1,000 nodes in {SERF_SECONDS} s",
            f"{reach / SERF_SECONDS:.2f}x",
            f"< {TARGET_SECONDS:.0f} s",
            reach < TARGET_SECONDS,
        ),
        Row(
            f"the same Workload reaches all {NODES} nodes (virtual time)",
            _seconds(reach_all),
        ),
        Row(
            f"the same with {LOSS:.0%} of all messages lost (first seed only)",
            f"99%: {_seconds(lossy.reach_99)}, all: {_seconds(lossy.reach_all)}",
            "—",
            "—",
            f"< {TARGET_SECONDS:.0f} s",
            lossy.reach_99 < TARGET_SECONDS,
        ),
        Row(
            f"wall-clock time of one run: {NODES} nodes, {virtual:.0f} s of virtual time",
            _seconds(wall),
            f"{virtual:.0f} s simulated",
            f"{wall / virtual:.2f}x real time",
        ),
        Row(
            "document gossip carrying that one Workload, per node",
            kib(int(spread)),
        ),
        Row(
            "idle document gossip per node",
            f"{idle_gossip:.1f} B/s",
            f"membership (SWIM probes, acks with coordinates): {idle_membership:.0f} B/s",
            f"{idle_gossip / idle_membership:.2f}x" if idle_membership else "—",
        ),
    ]
    notes = (
        f"Simulated network: 4 regions, {runs[0].network} for the first seed; per-node "
        f"access delay 0.2-2 ms, up to 10% jitter, no loss unless a row says so. Membership "
        f"starts warm (every node knows every other one) and runs {WARMUP:.0f} s before the "
        f"write. Seeds {', '.join(map(str, SEEDS))}; virtual seconds to 99%: {samples}. "
        f"Payload bytes only (no QUIC, UDP or IP headers). Idle figures over {IDLE:.0f} s "
        f"after the write, first seed."
    )
    return Section(f"Mesh simulation: {NODES} nodes", rows, notes=notes)


if __name__ == "__main__":
    from bench.report import render

    print(render([run()]))
