"""The choice of persistent peers: a small, bounded set that keeps the swarm in one piece.

Each node keeps long-lived connections to a few peers only, and the document gossip flows
along them (in both directions, so the graph that matters is the union of everyone's choice).
:func:`choose_peers` picks, from the alive members:

* the ``nearest`` few by estimated RTT (Vivaldi): changes spread fast within a neighbourhood;
* ``bridges`` across a boundary: peers in another subnet, or far away in RTT compared with our
  own neighbourhood, chosen at random with the farther ones likelier. Without them, a dense
  cluster (a site, a rack, a home network) would choose only itself and could split off;
* ``random_links`` chosen uniformly: a random graph with two or more random out-links per node
  is connected with high probability and has a small diameter, whatever the RTTs say.

Everything is a pure function of its inputs and the ``rng``, so a simulation is reproducible.
Re-choosing keeps the random links and bridges that are still valid, except ``rotate`` random
links, so the connections mostly stay put while the graph still mixes over time.
"""

from __future__ import annotations

import functools
import heapq
import ipaddress
import math
import random
import statistics
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "Candidate",
    "PeerChoice",
    "TopologyConfig",
    "choose_peers",
    "connected_components",
    "same_subnet",
]


@dataclass(frozen=True)
class Candidate:
    """An alive member that may be chosen."""

    name: str
    #: Its address: ``host``, ``host:port`` or ``[v6host]:port``; None if unknown.
    address: str | None = None
    #: Estimated round-trip time from us, in seconds; None while no estimate exists.
    rtt: float | None = None


@dataclass(frozen=True)
class TopologyConfig:
    """How many peers of each sort to keep, and what counts as across a boundary."""

    nearest: int = 4
    random_links: int = 2
    bridges: int = 2
    #: A peer whose RTT is at least this many times our neighbourhood's radius (the RTT of our
    #: farthest nearest peer) is across a boundary...
    far_factor: float = 3.0
    #: ... provided its RTT is also at least this (seconds): on a LAN everyone is "far"
    #: compared with a sub-millisecond radius, and none of that is a boundary.
    min_far_rtt: float = 0.01
    #: A previous nearest peer is kept while its RTT is within this fraction above the
    #: ``nearest``-th smallest RTT, so that estimation noise does not churn connections.
    nearest_slack: float = 0.5
    #: ... or within this many seconds of it: below a few milliseconds, estimation error
    #: is larger than the differences between neighbours.
    nearest_slack_floor: float = 0.002
    #: Address prefixes that make a subnet.
    ipv4_prefix: int = 24
    ipv6_prefix: int = 64
    #: Seconds between two periodic choices (membership changes force one in between).
    rechoose_interval: float = 60.0
    #: Random links replaced every ``rotate_interval`` seconds (callers pass ``rotate`` to
    #: :func:`choose_peers` when it is due). Kept rare: each new link costs a sync from a
    #: fresh state, whose Bloom filter covers the whole history (about 1.25 bytes a change).
    rotate: int = 1
    rotate_interval: float = 600.0

    def __post_init__(self) -> None:
        if min(self.nearest, self.random_links, self.bridges, self.rotate) < 0:
            raise ValueError("peer counts must not be negative")
        if self.total == 0:
            raise ValueError("at least one peer must be chosen")

    @property
    def total(self) -> int:
        """The most persistent peers a node keeps."""
        return self.nearest + self.random_links + self.bridges


@dataclass(frozen=True)
class PeerChoice:
    """The persistent peers, by why they were chosen."""

    nearest: tuple[str, ...] = ()
    bridges: tuple[str, ...] = ()
    random: tuple[str, ...] = ()

    @property
    def peers(self) -> frozenset[str]:
        """Every chosen peer."""
        return frozenset(self.nearest + self.bridges + self.random)


@functools.lru_cache(maxsize=65536)
def _subnet(address: str, ipv4_prefix: int, ipv6_prefix: int) -> str | None:
    host = address
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None  # a name, not an address: no subnet to compare
    prefix = ipv4_prefix if ip.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def same_subnet(a: str | None, b: str | None, config: TopologyConfig | None = None) -> bool | None:
    """Whether two addresses share a subnet; None when either is unknown or not an IP."""
    config = config or TopologyConfig()
    if a is None or b is None:
        return None
    net_a = _subnet(a, config.ipv4_prefix, config.ipv6_prefix)
    net_b = _subnet(b, config.ipv4_prefix, config.ipv6_prefix)
    if net_a is None or net_b is None:
        return None
    return net_a == net_b


def _weighted_sample(
    rng: random.Random, pool: Sequence[str], weights: Sequence[float], k: int
) -> list[str]:
    """``k`` distinct items of ``pool``, each draw likelier for a larger weight."""
    items, left = list(pool), list(weights)
    chosen: list[str] = []
    while items and len(chosen) < k:
        total = sum(left)
        if total <= 0:
            index = rng.randrange(len(items))
        else:
            mark, index = rng.uniform(0, total), 0
            while index < len(items) - 1 and mark > left[index]:
                mark -= left[index]
                index += 1
        chosen.append(items.pop(index))
        left.pop(index)
    return chosen


def choose_peers(
    self_name: str,
    self_address: str | None,
    candidates: Iterable[Candidate],
    rng: random.Random,
    config: TopologyConfig | None = None,
    previous: PeerChoice | None = None,
    rotate: int | None = None,
) -> PeerChoice:
    """The persistent peers to keep among ``candidates`` (see the module docstring).

    ``previous`` is the last choice: its random links and bridges that are still candidates
    (and still across a boundary) are kept, except ``rotate`` (default ``config.rotate``)
    random links: pass 0 for a choice forced by a membership change. The result
    depends only on the arguments and the state of ``rng``, not on the order of
    ``candidates``.
    """
    config = config or TopologyConfig()
    by_name = {c.name: c for c in candidates if c.name != self_name}
    names = sorted(by_name)
    if len(names) <= config.total:
        # Too few members to choose from: keep them all, sorted into the same categories.
        ranked = sorted((c for c in by_name.values() if c.rtt is not None), key=_rtt_key)
        closest = tuple(c.name for c in ranked[: config.nearest])
        return PeerChoice(closest, (), tuple(n for n in names if n not in closest))

    known = [by_name[n] for n in names if by_name[n].rtt is not None]
    ranked = heapq.nsmallest(config.nearest, known, key=_rtt_key)
    nearest: list[str] = []
    if previous is not None and ranked:
        # Estimates wobble from one choice to the next; a previous nearest peer that is
        # still about as near stays, rather than swapping connections for nothing.
        kth = ranked[-1].rtt or 0.0
        bound = max(kth * (1 + config.nearest_slack), kth + config.nearest_slack_floor)
        nearest = [
            n
            for n in previous.nearest
            if n in by_name and (rtt := by_name[n].rtt) is not None and rtt <= bound
        ][: config.nearest]
    nearest += [c.name for c in ranked if c.name not in nearest][: config.nearest - len(nearest)]
    taken = set(nearest)

    radius = max((by_name[n].rtt or 0.0) for n in nearest) if nearest else 0.0
    threshold = max(config.far_factor * radius, config.min_far_rtt)

    def across(candidate: Candidate) -> bool:
        if candidate.rtt is not None and candidate.rtt >= threshold:
            return True
        return self_address is not None and (
            same_subnet(self_address, candidate.address, config) is False
        )

    boundary = [n for n in names if n not in taken and across(by_name[n])]
    bridges = [
        n for n in (previous.bridges if previous else ()) if n in boundary and n not in taken
    ][: config.bridges]
    taken.update(bridges)
    if len(bridges) < config.bridges:
        pool = [n for n in boundary if n not in taken]
        # Farther is likelier: a bridge to the next street helps less than one to another
        # continent. Another subnet with no RTT yet counts as typical.
        rtts = [by_name[n].rtt for n in pool]
        known_rtts = [r for r in rtts if r is not None]
        typical = statistics.median(known_rtts) if known_rtts else 1.0
        weights = [typical if r is None else r for r in rtts]
        picked = _weighted_sample(rng, pool, weights, config.bridges - len(bridges))
        bridges += picked
        taken.update(picked)

    kept = [n for n in (previous.random if previous else ()) if n in by_name and n not in taken]
    rotate = config.rotate if rotate is None else rotate
    if kept and rotate:
        for _ in range(min(rotate, len(kept))):
            kept.pop(rng.randrange(len(kept)))
    kept = kept[: config.random_links]
    taken.update(kept)
    # Whatever the other categories could not fill (no RTTs yet, no boundary) goes to random
    # links, so a node always keeps its full count of peers.
    wanted = config.total - len(nearest) - len(bridges) - len(kept)
    pool = [n for n in names if n not in taken]
    random_links = kept + rng.sample(pool, min(wanted, len(pool)))
    return PeerChoice(tuple(nearest), tuple(bridges), tuple(random_links))


def _rtt_key(candidate: Candidate) -> tuple[float, str]:
    return (candidate.rtt if candidate.rtt is not None else math.inf, candidate.name)


def connected_components(choices: Mapping[str, Iterable[str]]) -> list[set[str]]:
    """The components of the undirected union of everyone's choice, largest first.

    ``choices`` maps each node to the peers it chose; every key is a node even if it chose
    nobody. Peers not among the keys are ignored (dead members).
    """
    adjacency: dict[str, set[str]] = {name: set() for name in choices}
    for name, peers in choices.items():
        for peer in peers:
            if peer in adjacency and peer != name:
                adjacency[name].add(peer)
                adjacency[peer].add(name)
    seen: set[str] = set()
    components: list[set[str]] = []
    for start in sorted(adjacency):
        if start in seen:
            continue
        component = {start}
        queue = deque([start])
        while queue:
            for peer in adjacency[queue.popleft()]:
                if peer not in component:
                    component.add(peer)
                    queue.append(peer)
        seen |= component
        components.append(component)
    components.sort(key=lambda c: (-len(c), min(c)))
    return components
