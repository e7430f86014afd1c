"""The deterministic simulation: many nodes, one process, virtual time.

Example::

    sim = Simulation(500, seed=7)
    sim.run_until(30.0)                       # let Vivaldi and the topology settle
    watch = sim.watch("Workload", "web")
    sim.write("n000", "Workload", "web", obj)
    sim.run_for(5.0)
    watch.time_to_reach(0.99, 500)            # virtual seconds until 99% of nodes had it

Everything random comes from ``random.Random`` instances derived from ``seed``, and every
iteration that matters runs in a fixed order, so one seed gives one run, in any process:
:meth:`Simulation.trace_hash` digests every message (time, ends, channel, size, fate) to
prove it. One caveat: Automerge stamps each change with the wall clock, so change hashes
differ between runs; sizes and timing do not, but a Bloom filter false positive (which
depends on the hashes) could in rare cases cost an extra sync round in one run only.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pollen.mesh import wire
from pollen.mesh.membership import SwimConfig
from pollen.mesh.sync import GossipConfig, heads_digest
from pollen.mesh.topology import TopologyConfig
from pollen.reconcilers.placement import NodeFacts, PlacementConfig, Weights
from pollen.sim.events import EventQueue
from pollen.sim.network import Network, NetworkConfig, NetworkStats
from pollen.sim.node import GOSSIP, SimNode, StaticView
from pollen.sim.placement import ClaimLog, SimPlacement

__all__ = ["Simulation", "TrafficReport", "Watch"]


@dataclass(frozen=True)
class TrafficReport:
    """Traffic over a stretch of virtual time, per alive node and second."""

    seconds: float
    nodes: int
    stats: NetworkStats

    def bytes_per_node_second(self, channel: str | None = None) -> float:
        """Payload bytes sent per node per second, on ``channel`` or on all."""
        if self.seconds <= 0 or self.nodes == 0:
            return 0.0
        total = self.stats.bytes if channel is None else self.stats.channel(channel).bytes
        return total / self.nodes / self.seconds

    def messages_per_node_second(self, channel: str | None = None) -> float:
        """Messages sent per node per second, on ``channel`` or on all."""
        if self.seconds <= 0 or self.nodes == 0:
            return 0.0
        total = self.stats.messages if channel is None else self.stats.channel(channel).messages
        return total / self.nodes / self.seconds


@dataclass
class Watch:
    """When each node first had one resource in its document (see :meth:`Simulation.watch`)."""

    kind: str
    name: str
    start: float
    #: Node name -> virtual time it first had the resource.
    seen: dict[str, float] = field(default_factory=dict)

    def time_to_reach(self, fraction: float, population: int) -> float | None:
        """Seconds from :attr:`start` until ``fraction`` of ``population`` nodes had it."""
        needed = max(1, math.ceil(fraction * population - 1e-9))
        if len(self.seen) < needed:
            return None
        return sorted(self.seen.values())[needed - 1] - self.start


def placement_swarm(
    n_nodes: int, seed: int, *, membership: bool = True, rng: random.Random | None = None
) -> tuple[Simulation, ClaimLog]:
    """A swarm running placement 5 s into virtual time (membership and gossip settled), every
    node of 4096 MB and 4000 CPU millis with a load drawn from 0, 0.2, 0.5 and 0.8 by ``rng``
    (by default a generator seeded with ``seed``). Returns it with its log of claim changes."""
    sim = Simulation(n_nodes, seed=seed, membership=membership)
    if rng is None:
        rng = random.Random(seed)
    facts = {
        name: NodeFacts(name, 4096, 4000, load=rng.choice([0.0, 0.2, 0.5, 0.8]))
        for name in sim.names
    }
    log = sim.enable_placement(facts)
    sim.run_until(5.0)
    return sim, log


class Simulation:
    """``n_nodes`` nodes named ``n000``, ``n001``, ... on a simulated network."""

    def __init__(
        self,
        n_nodes: int,
        seed: int,
        *,
        network: NetworkConfig | None = None,
        loss: float | None = None,
        gossip: GossipConfig | None = None,
        topology: TopologyConfig | None = None,
        membership: bool = True,
        swim: SwimConfig | None = None,
        warm_start: bool = True,
    ) -> None:
        """Build the swarm at time 0.

        ``loss`` overrides ``network.loss``. Nodes run SWIM membership (with ``swim``) and
        join through the first three nodes; with ``membership`` False they learn who is alive,
        and the true RTTs, from an oracle instead (see :class:`~pollen.sim.node.StaticView`).
        With ``warm_start`` every node starts knowing every other one alive, as in a swarm
        that has been up for a while (see :meth:`~pollen.sim.node.SimNode.warm_start`);
        otherwise they all join at time 0, which costs O(N^2) membership updates.
        """
        if n_nodes < 1:
            raise ValueError("at least one node")
        network = network or NetworkConfig()
        if loss is not None:
            network = dataclasses.replace(network, loss=loss)
        self.seed = seed
        self._rng = random.Random(seed)
        self.queue = EventQueue()
        width = max(3, len(str(n_nodes - 1)))
        self.names = [f"n{i:0{width}d}" for i in range(n_nodes)]
        self.network = Network(self.names, network, random.Random(self._rng.random()))
        self._view = StaticView(
            addresses=dict(self.network.address_of),
            alive=set(self.names),
            rtt=self.network.rtt,
        )
        self.gossip_config = gossip or GossipConfig()
        self.topology_config = topology or TopologyConfig()
        self.nodes: dict[str, SimNode] = {}
        self._watches: list[Watch] = []
        self._wake_at: dict[str, float] = {}
        self._placements: dict[str, SimPlacement] = {}
        for name in self.names:
            node = SimNode(
                name,
                self.network.address_of[name],
                random.Random(self._rng.random()),
                self.queue.now,
                gossip_config=self.gossip_config,
                topology_config=self.topology_config,
                static_view=None if membership else self._view,
                swim_config=swim,
            )
            self.nodes[name] = node
        if warm_start and n_nodes > 1:
            table = wire.Sync(
                tuple(
                    wire.SyncEntry(
                        name,
                        0,
                        wire.MemberState.ALIVE,
                        wire.MemberMeta(addresses=(self.network.address_of[name],)),
                    )
                    for name in self.names
                )
            )
            for name in self.names:
                self.nodes[name].warm_start(table, self.now)
                self._after(self.nodes[name])
        else:
            # Everyone joins through a few seeds, as nodes enrolled with one token would.
            seeds = self.names[: min(3, n_nodes)]
            for name in self.names:
                self.nodes[name].join(seeds, self.now)
                self._after(self.nodes[name])

    # --- time ----------------------------------------------------------------------------------

    @property
    def now(self) -> float:
        """The virtual time, in seconds."""
        return self.queue.now

    def run_until(self, t: float) -> None:
        """Run every event up to virtual time ``t``."""
        self.queue.run_until(t)

    def run_for(self, seconds: float) -> None:
        """Run ``seconds`` of virtual time."""
        self.queue.run_until(self.now + seconds)

    def run_until_condition(
        self, predicate: Callable[[], bool], timeout: float, check_every: float = 0.01
    ) -> float | None:
        """Run until ``predicate()`` holds, checked every ``check_every`` virtual seconds.

        Returns the virtual time it took (0 if it held at once), or None after ``timeout``.
        """
        start = self.now
        if predicate():
            return 0.0
        while self.now - start < timeout:
            self.queue.run_until(min(self.now + check_every, start + timeout))
            if predicate():
                return self.now - start
        return None

    # --- faults --------------------------------------------------------------------------------

    def partition(self, groups: Iterable[Iterable[str]]) -> None:
        """Cut the network between ``groups`` (nodes in none form one more group)."""
        self.network.partition([list(g) for g in groups])

    def heal(self) -> None:
        """Remove any partition."""
        self.network.heal()

    def kill(self, name: str) -> None:
        """Stop node ``name`` for good: it sends and receives nothing more."""
        node = self.nodes[name]
        node.alive = False
        self._view.alive.discard(name)
        for other in self.alive_nodes():
            other.members_changed()
            self._after(other)

    # --- placement -----------------------------------------------------------------------------

    def enable_placement(
        self,
        facts: Mapping[str, NodeFacts],
        *,
        config: PlacementConfig | None = None,
        weights: Weights | None = None,
    ) -> ClaimLog:
        """Run placement on every node from now on (:mod:`pollen.sim.placement`); ``facts``
        gives each node's capacity and labels. Returns the log of every claim change."""
        log = ClaimLog()
        for name, node in self.nodes.items():
            self._placements[name] = SimPlacement(node, facts, log, config=config, weights=weights)
        return log

    def replicas(self, node: str, workload: str) -> dict[str, str]:
        """The Replicas of ``workload`` in ``node``'s document: replica name -> holding node."""
        document = self.nodes[node].document
        held = {}
        for name in document.names("Replica"):
            data = document.read("Replica", name) or {}
            spec = data.get("spec") or {}
            if spec.get("workload") == workload:
                held[name] = str(spec.get("node"))
        return held

    # --- the document --------------------------------------------------------------------------

    def write(self, node: str, kind: str, name: str, obj: Mapping[str, Any]) -> None:
        """Write ``obj`` as ``kind``/``name`` on ``node``, as its API would."""
        target = self.nodes[node]
        if not target.alive:
            raise ValueError(f"node {node} is dead")
        target.write(kind, name, obj, self.now)
        self._check_watches(target)
        self._after(target)

    def watch(self, kind: str, name: str) -> Watch:
        """Record, from now on, when each node first has ``kind``/``name``.

        Checked after every write and every gossip message a node takes in, so the times
        are exact, not sampled.
        """
        watch = Watch(kind, name, self.now)
        for node in self.alive_nodes():
            if node.document.read(kind, name) is not None:
                watch.seen[node.name] = self.now
        self._watches.append(watch)
        return watch

    def _check_watches(self, node: SimNode) -> None:
        for watch in self._watches:
            if node.name not in watch.seen and node.document.read(watch.kind, watch.name):
                watch.seen[node.name] = self.now

    def alive_nodes(self) -> list[SimNode]:
        """The nodes not killed, in name order."""
        return [node for node in self.nodes.values() if node.alive]

    def coverage(self, kind: str, name: str, nodes: Sequence[str] | None = None) -> float:
        """The fraction of alive nodes (or of ``nodes``) whose document has ``kind``/``name``."""
        chosen = self.alive_nodes() if nodes is None else [self.nodes[n] for n in nodes]
        if not chosen:
            return 0.0
        have = sum(1 for node in chosen if node.document.read(kind, name) is not None)
        return have / len(chosen)

    def converged(self, nodes: Sequence[str] | None = None) -> bool:
        """Whether every alive node (or every one of ``nodes``) has the same heads."""
        chosen = self.alive_nodes() if nodes is None else [self.nodes[n] for n in nodes]
        return len({heads_digest(node.document.heads()) for node in chosen}) <= 1

    # --- metrics -------------------------------------------------------------------------------

    def traffic_since(self, snapshot: NetworkStats, start: float) -> TrafficReport:
        """Traffic since ``snapshot`` (from ``sim.network.stats.copy()`` at time ``start``)."""
        return TrafficReport(
            self.now - start, len(self.alive_nodes()), self.network.stats.minus(snapshot)
        )

    def trace_hash(self) -> str:
        """A digest of every message so far; equal for equal runs."""
        return self.network.trace_hash()

    # --- plumbing ------------------------------------------------------------------------------

    def _after(self, node: SimNode) -> None:
        """Send what ``node`` has to send, and make sure it wakes at its next deadline."""
        now = self.now
        placement = self._placements.get(node.name)
        if placement is not None and node.alive:
            placement.run(now)
        for dst, channel, payload in node.drain():
            target = self.nodes.get(dst)
            arrival = self.network.send(
                now, node.name, dst, channel, payload, target is not None and target.alive
            )
            if arrival is not None:
                self.queue.schedule(arrival, self._deliverer(node.name, dst, channel, payload))
        deadline = node.next_deadline()
        if placement is not None:
            deadline = min(deadline, placement.next_deadline())
        scheduled = self._wake_at.get(node.name)
        if scheduled is None or deadline < scheduled or scheduled < now:
            self._wake_at[node.name] = deadline
            self.queue.schedule(deadline, self._waker(node.name, deadline))

    def _deliverer(self, src: str, dst: str, channel: str, payload: bytes) -> Callable[[], None]:
        def deliver() -> None:
            node = self.nodes[dst]
            if not node.alive or not self.network.reachable(src, dst):
                return  # died, or cut off, while the message was on its way
            node.receive(src, channel, payload, self.now)
            if channel == GOSSIP and self._watches:
                self._check_watches(node)
            self._after(node)

        return deliver

    def _waker(self, name: str, at: float) -> Callable[[], None]:
        def wake() -> None:
            if self._wake_at.get(name) != at:
                return  # superseded by an earlier wake-up
            node = self.nodes[name]
            if not node.alive:
                return
            del self._wake_at[name]
            node.tick(self.now)
            self._after(node)

        return wake
