"""One simulated node: the protocol code of a real node, wired to virtual time and network.

A :class:`SimNode` composes what a real node composes: membership and failure detection
(:class:`~pollen.mesh.membership.Membership`), Vivaldi fed from the RTTs membership measures
on its probes, the topology choice, and the gossip
(:class:`~pollen.mesh.sync.DocumentGossip`) of an in-memory
:class:`~pollen.state.document.StateDocument`. Its only I/O is :meth:`SimNode.drain`, whose
(destination, channel, bytes) the simulation delivers; membership messages are encoded with
:mod:`pollen.mesh.wire` on the way out and decoded on the way in, so the codec runs on every
hop.

With a :class:`StaticView` instead of membership the node learns who is alive, and the true
RTTs, from an oracle kept by the simulation: that isolates the gossip from failure detection.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from pollen.mesh import wire
from pollen.mesh.membership import EventKind, Membership, SwimConfig
from pollen.mesh.sync import DocumentGossip, GossipConfig, SyncError
from pollen.mesh.topology import Candidate, PeerChoice, TopologyConfig, choose_peers
from pollen.mesh.vivaldi import Coordinate, VivaldiClient, VivaldiConfig
from pollen.mesh.wire import MemberMeta, MemberState
from pollen.state.document import StateDocument

__all__ = ["GOSSIP", "MEMBERSHIP", "SimNode", "StaticView"]

#: Channel names.
MEMBERSHIP: Final = "membership"
GOSSIP: Final = "gossip"

#: Least virtual time between two topology choices forced by membership changes.
MIN_RECHOOSE_INTERVAL: Final = 2.0
#: Samples our Vivaldi client takes before our estimates are trusted for the topology.
MIN_VIVALDI_UPDATES: Final = 5


@dataclass
class StaticView:
    """Membership as an oracle: who is alive, where, and the true RTTs between them."""

    addresses: Mapping[str, str]
    alive: set[str]
    rtt: Callable[[str, str], float]


class SimNode:
    """A node of the simulation (see the module docstring)."""

    def __init__(
        self,
        name: str,
        address: str,
        rng: random.Random,
        now: float,
        *,
        gossip_config: GossipConfig,
        topology_config: TopologyConfig,
        static_view: StaticView | None = None,
        swim_config: SwimConfig | None = None,
    ) -> None:
        """Make node ``name``; ``rng`` is its own stream of randomness.

        Without ``static_view`` the node runs membership with ``swim_config`` and must be
        started with :meth:`join`.
        """
        self.name = name
        self.address = address
        self.alive = True
        self.document = StateDocument.new(actor_id=rng.randbytes(16))
        self.gossip = DocumentGossip(
            self.document, now, config=gossip_config, rng=random.Random(rng.random())
        )
        self.vivaldi = VivaldiClient(VivaldiConfig(), rng=random.Random(rng.random()))
        self.topology_config = topology_config
        self._topology_rng = random.Random(rng.random())
        self._static = static_view
        self.membership: Membership | None = None
        if static_view is None:
            self.membership = Membership(
                name,
                MemberMeta(addresses=(address,)),
                swim_config or SwimConfig(),
                random.Random(rng.random()),
                now,
            )
            # Acks carry our coordinate, and a probe yields an RTT sample only with one.
            self.membership.set_coordinate(self.vivaldi.coordinate)
        #: Peer coordinates, from probe acks and from members' published meta.
        self.coordinates: dict[str, Coordinate] = {}
        self.choice = PeerChoice()
        self._next_rechoose = now + rng.uniform(0, topology_config.rechoose_interval)
        self._next_rotate = now + rng.uniform(0, topology_config.rotate_interval)
        self._topology_dirty = True
        self._last_choice_at = -MIN_RECHOOSE_INTERVAL
        self._outgoing: list[tuple[str, str, bytes]] = []
        self.decode_errors = 0
        #: Moves whenever membership reports a change: what depends on the view checks it.
        self.view_version = 0

    # --- the simulation's side ---------------------------------------------------------------

    def join(self, seeds: list[str], now: float) -> None:
        """Start membership by contacting ``seeds``."""
        if self.membership is not None:
            self.membership.join(seeds, now)
            self._after_membership(now)

    def warm_start(self, table: wire.Sync, now: float) -> None:
        """Start as a member of a swarm that has been running for a while.

        ``table`` lists every member alive (a push-pull page, as if from a peer). What a real
        join then does, spreading each newcomer to everyone with every member retransmitting
        it several times, costs O(N^2) decoded updates: well over a minute of CPU for 500
        nodes, with nothing to teach about the gossip of the document. So the updates the merge
        queued for retransmission are dropped here, and the swarm starts quiet.
        """
        membership = self.membership
        if membership is None:
            return
        sender = next(e.name for e in table.entries if e.name != self.name)
        membership.receive(sender, table, now)
        queue = getattr(membership, "_broadcasts", None)
        if queue is None or not hasattr(membership, "_next_gossip_at"):
            raise RuntimeError("Membership's internals changed: update SimNode.warm_start")
        membership._broadcasts = type(queue)()
        membership._next_gossip_at = None
        self._after_membership(now)

    def receive(self, src: str, channel: str, payload: bytes, now: float) -> None:
        """A message arrived. A bad one is dropped, as a real node would close the stream."""
        if channel == GOSSIP:
            try:
                self.gossip.receive(src, payload, now)
            except SyncError:
                self.decode_errors += 1
        elif channel == MEMBERSHIP and self.membership is not None:
            try:
                message = wire.decode(payload)
            except wire.WireError:
                self.decode_errors += 1
                return
            self.membership.receive(src, message, now)
            self._after_membership(now)
        self._maybe_rechoose(now)

    def tick(self, now: float) -> None:
        """Do whatever is due at ``now``."""
        membership = self.membership
        if membership is not None:
            deadline = membership.next_deadline()
            if deadline is not None and now >= deadline:
                membership.tick(now)
                self._after_membership(now)
        if now >= self.gossip.next_deadline():
            self.gossip.tick(now)
        self._maybe_rechoose(now)

    def next_deadline(self) -> float:
        """When :meth:`tick` next has something to do."""
        deadline = min(self.gossip.next_deadline(), self._next_rechoose)
        if self._topology_dirty:
            deadline = min(deadline, self._last_choice_at + MIN_RECHOOSE_INTERVAL)
        if self.membership is not None:
            swim = self.membership.next_deadline()
            if swim is not None:
                deadline = min(deadline, swim)
        return deadline

    def drain(self) -> list[tuple[str, str, bytes]]:
        """Messages to send, as (destination, channel, payload)."""
        out = self._outgoing
        self._outgoing = []
        for dst, payload in self.gossip.drain_outgoing():
            out.append((dst, GOSSIP, payload))
        return out

    def write(self, kind: str, name: str, obj: Mapping[str, Any], now: float) -> None:
        """A local write, as the API or a reconciler would make it."""
        self.document.write(kind, name, obj)
        self.gossip.on_local_change(now)

    def alive_members(self) -> frozenset[str]:
        """The nodes alive (or only suspected) in this node's view: its membership's, or the
        oracle's."""
        if self.membership is None:
            return frozenset(self._static.alive) if self._static is not None else frozenset()
        return frozenset(
            name
            for name, member in self.membership.members().items()
            if member.state in (MemberState.ALIVE, MemberState.SUSPECT)
        )

    def members_changed(self) -> None:
        """The oracle's set of alive members changed: choose again if a peer is gone."""
        self.view_version += 1
        if self._static is not None and not self.choice.peers <= self._static.alive:
            self._topology_dirty = True

    # --- membership, Vivaldi -------------------------------------------------------------------

    def _after_membership(self, now: float) -> None:
        membership = self.membership
        assert membership is not None
        for outbound in membership.drain_outgoing():
            self._outgoing.append((outbound.to, MEMBERSHIP, wire.encode(outbound.message)))
        samples = membership.drain_rtt_samples()
        for sample in samples:
            self.coordinates[sample.peer] = sample.coordinate
            self.vivaldi.update(sample.peer, sample.coordinate, sample.rtt)
        if samples:
            # Acks carry it. It is not put in our meta: every meta change is an update that
            # every member retransmits several times, far too dear for a value that moves
            # with each sample (Serf also keeps coordinates out of its member tags).
            membership.set_coordinate(self.vivaldi.coordinate)
        for event in membership.drain_events():
            self.view_version += 1
            member = event.member
            if member.name == self.name:
                continue
            fresh = event.kind in (EventKind.JOINED, EventKind.UPDATED, EventKind.ALIVE)
            if fresh and member.meta.coordinate is not None:
                self.coordinates[member.name] = member.meta.coordinate
            if event.kind == EventKind.JOINED:
                # New, or back from the dead: a link to it starts over, and a node short of
                # peers (or split off, after a partition) gets to choose again.
                self.gossip.peer_up(member.name, now)
                self._topology_dirty = True
            elif event.kind in (EventKind.DEAD, EventKind.LEFT, EventKind.REAPED):
                self.gossip.peer_down(member.name)
                self.vivaldi.forget(member.name)
                if event.kind == EventKind.REAPED:
                    self.coordinates.pop(member.name, None)
                if member.name in self.choice.peers:
                    self._topology_dirty = True

    # --- topology ------------------------------------------------------------------------------

    def _candidates(self) -> list[Candidate]:
        view = self._static
        if view is not None:
            return [
                Candidate(other, view.addresses[other], view.rtt(self.name, other))
                for other in sorted(view.alive)
                if other != self.name
            ]
        membership = self.membership
        assert membership is not None
        trusted = self.vivaldi.stats.updates >= MIN_VIVALDI_UPDATES
        out: list[Candidate] = []
        for name, member in membership.members().items():
            if name == self.name or member.state is not MemberState.ALIVE:
                continue
            coordinate = self.coordinates.get(name)
            rtt = None
            if trusted and coordinate is not None:
                try:
                    rtt = self.vivaldi.estimate_rtt(coordinate)
                except ValueError:  # another dimensionality: not comparable
                    rtt = None
            address = member.meta.addresses[0] if member.meta.addresses else None
            out.append(Candidate(name, address, rtt))
        return out

    def _maybe_rechoose(self, now: float) -> None:
        periodic = now >= self._next_rechoose
        forced = self._topology_dirty and now >= self._last_choice_at + MIN_RECHOOSE_INTERVAL
        if not (periodic or forced):
            return
        self._topology_dirty = False
        self._last_choice_at = now
        config = self.topology_config
        if periodic:
            self._next_rechoose = now + config.rechoose_interval
        rotate = now >= self._next_rotate
        if rotate:
            self._next_rotate = now + config.rotate_interval
        candidates = self._candidates()
        alive = {c.name for c in candidates}
        for gone in sorted(self.choice.peers - alive):
            self.gossip.peer_down(gone)
        self.choice = choose_peers(
            self.name,
            self.address,
            candidates,
            self._topology_rng,
            config,
            previous=self.choice,
            rotate=config.rotate if rotate else 0,
        )
        self.gossip.set_peers(sorted(self.choice.peers), now)
