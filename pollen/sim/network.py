"""The simulated network: where nodes are, how long a message takes, what gets lost.

Nodes sit in a few *regions*. A region is a point on a plane whose distances are round-trip
times between regions; a node is a point near its region's centre plus an access delay of its
own (its last mile). The RTT between two nodes is the distance between their points plus both
access delays, which is exactly the model Vivaldi assumes (a Euclidean part and a height), so
coordinates can converge. Each message then takes half the RTT, stretched by a random jitter,
and may be lost. Messages between two nodes on one channel arrive in the order they were sent,
as on a QUIC stream.

A partition is a set of groups: nodes in different groups cannot reach each other until
:meth:`Network.heal`. Addresses are documentation-prefix IPv6 strings, one /64 per region, so
that the topology can tell subnets apart; nothing ever connects to them.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["ChannelStats", "Fate", "Network", "NetworkConfig", "NetworkStats"]


@dataclass(frozen=True)
class NetworkConfig:
    """The shape of the simulated network. Times are in seconds."""

    #: Number of regions the nodes are spread over (round-robin).
    regions: int = 4
    #: Side of the square the region centres are drawn in: inter-region RTTs up to ~1.4x this.
    region_spread: float = 0.15
    #: Least RTT between two region centres (regions are redrawn until they are this far apart).
    min_region_rtt: float = 0.02
    #: Nodes are drawn within this distance of their region's centre (intra-region RTT).
    node_spread: float = 0.004
    #: Range of each node's access delay (added to every RTT it has, once per end).
    access: tuple[float, float] = (0.0002, 0.002)
    #: Each one-way delay is stretched by a uniform factor in [1, 1 + jitter].
    jitter: float = 0.1
    #: Probability that a message is lost.
    loss: float = 0.0

    def __post_init__(self) -> None:
        if self.regions < 1:
            raise ValueError("at least one region")
        if not 0 <= self.loss < 1:
            raise ValueError("loss must be in [0, 1)")
        if self.jitter < 0 or self.access[0] < 0 or self.access[1] < self.access[0]:
            raise ValueError("jitter and access delays must not be negative")


class Fate:
    """What happened to a message."""

    DELIVERED = "delivered"
    LOST = "lost"
    PARTITIONED = "partitioned"
    DEAD = "dead"


@dataclass
class ChannelStats:
    """Counters of one channel (membership, gossip)."""

    messages: int = 0
    bytes: int = 0
    lost: int = 0


@dataclass
class NetworkStats:
    """Counters of everything sent, by channel."""

    channels: dict[str, ChannelStats] = field(default_factory=dict)

    def channel(self, name: str) -> ChannelStats:
        """The counters of ``name``, created on first use."""
        stats = self.channels.get(name)
        if stats is None:
            stats = self.channels[name] = ChannelStats()
        return stats

    def copy(self) -> NetworkStats:
        """A snapshot, to subtract later."""
        return NetworkStats(
            {name: ChannelStats(s.messages, s.bytes, s.lost) for name, s in self.channels.items()}
        )

    def minus(self, earlier: NetworkStats) -> NetworkStats:
        """What was counted since ``earlier``."""
        out = NetworkStats()
        for name, stats in self.channels.items():
            before = earlier.channels.get(name, ChannelStats())
            out.channels[name] = ChannelStats(
                stats.messages - before.messages,
                stats.bytes - before.bytes,
                stats.lost - before.lost,
            )
        return out

    @property
    def messages(self) -> int:
        """Messages sent on every channel."""
        return sum(s.messages for s in self.channels.values())

    @property
    def bytes(self) -> int:
        """Payload bytes sent on every channel."""
        return sum(s.bytes for s in self.channels.values())


class Network:
    """Latency, loss and partitions between named nodes, with a trace of every message."""

    def __init__(self, names: Sequence[str], config: NetworkConfig, rng: random.Random) -> None:
        """Place ``names`` in regions; ``rng`` draws the layout and, later, jitter and loss."""
        self.config = config
        self._rng = rng
        self._regions = self._place_regions(config, rng)
        self._index = {name: i for i, name in enumerate(names)}
        self.region_of: dict[str, int] = {}
        self.address_of: dict[str, str] = {}
        self._point: dict[str, tuple[float, float]] = {}
        self._access: dict[str, float] = {}
        for i, name in enumerate(names):
            region = i % config.regions
            cx, cy = self._regions[region]
            angle = rng.uniform(0, 2 * math.pi)
            radius = config.node_spread * math.sqrt(rng.random())
            self.region_of[name] = region
            self._point[name] = (cx + radius * math.cos(angle), cy + radius * math.sin(angle))
            self._access[name] = rng.uniform(*config.access)
            self.address_of[name] = f"[2001:db8:{region:x}::{i + 1:x}]:7946"
        self._group: dict[str, int] | None = None
        self._last_arrival: dict[tuple[str, str, str], float] = {}
        self.stats = NetworkStats()
        self._trace = hashlib.blake2b(digest_size=16)

    @staticmethod
    def _place_regions(config: NetworkConfig, rng: random.Random) -> list[tuple[float, float]]:
        spread = config.region_spread
        for _ in range(1000):
            centres = [
                (rng.uniform(0, spread), rng.uniform(0, spread)) for _ in range(config.regions)
            ]
            if all(
                math.dist(a, b) >= config.min_region_rtt
                for i, a in enumerate(centres)
                for b in centres[i + 1 :]
            ):
                return centres
        raise ValueError("cannot place the regions that far apart in that square")

    def rtt(self, a: str, b: str) -> float:
        """The true RTT between two nodes, without jitter."""
        if a == b:
            return 0.0
        return math.dist(self._point[a], self._point[b]) + self._access[a] + self._access[b]

    def reachable(self, a: str, b: str) -> bool:
        """Whether the current partition lets ``a`` and ``b`` talk."""
        group = self._group
        return group is None or group.get(a, -1) == group.get(b, -1)

    def partition(self, groups: Iterable[Iterable[str]]) -> None:
        """Split the network: nodes in different groups (and nodes in none, which form one
        group of their own) cannot reach each other."""
        self._group = {}
        for index, members in enumerate(groups):
            for name in members:
                self._group[name] = index

    def heal(self) -> None:
        """Remove the partition."""
        self._group = None

    @property
    def partitioned(self) -> bool:
        """Whether a partition is in force."""
        return self._group is not None

    def send(
        self, now: float, src: str, dst: str, channel: str, payload: bytes, dst_alive: bool
    ) -> float | None:
        """Account for one message; the time it arrives, or None if it never does."""
        size = len(payload)
        stats = self.stats.channel(channel)
        stats.messages += 1
        stats.bytes += size
        arrival: float | None = None
        if not dst_alive:
            fate = Fate.DEAD
        elif not self.reachable(src, dst):
            fate = Fate.PARTITIONED
        elif self.config.loss and self._rng.random() < self.config.loss:
            fate = Fate.LOST
        else:
            fate = Fate.DELIVERED
            delay = self.rtt(src, dst) / 2 * (1 + self._rng.uniform(0, self.config.jitter))
            key = (src, dst, channel)
            # In order per link and channel, as on a stream; a hair later than the previous.
            arrival = max(now + delay, self._last_arrival.get(key, 0.0) + 1e-9)
            self._last_arrival[key] = arrival
        if fate != Fate.DELIVERED:
            stats.lost += 1
        self._trace.update(
            f"{now:.9f} {self._index[src]} {self._index[dst]} {channel} {size} {fate}\n".encode()
        )
        return arrival

    def trace_hash(self) -> str:
        """A digest of every message so far: time, ends, channel, size and fate."""
        return self._trace.copy().hexdigest()
