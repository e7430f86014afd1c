"""Choice of persistent peers: bounded, deterministic, and never splitting the swarm."""

from __future__ import annotations

import math
import random

import pytest

from pollen.mesh.topology import (
    Candidate,
    PeerChoice,
    TopologyConfig,
    choose_peers,
    connected_components,
    same_subnet,
)

Point = tuple[float, float]


def clusters(
    rng: random.Random, sizes: list[int], spread: float, distance: float
) -> dict[str, Point]:
    """Nodes in clusters of the given sizes: centres ``distance`` apart on a circle, members
    within ``spread`` of their centre (coordinates in seconds of RTT)."""
    points: dict[str, Point] = {}
    for c, size in enumerate(sizes):
        angle = 2 * math.pi * c / max(len(sizes), 1)
        radius = distance / (2 * math.sin(math.pi / len(sizes))) if len(sizes) > 1 else 0.0
        cx, cy = radius * math.cos(angle), radius * math.sin(angle)
        for i in range(size):
            points[f"c{c}-n{i}"] = (
                cx + rng.uniform(-spread, spread),
                cy + rng.uniform(-spread, spread),
            )
    return points


def rtt(a: Point, b: Point) -> float:
    return math.dist(a, b)


def everyone_chooses(
    points: dict[str, Point],
    seed: int,
    config: TopologyConfig | None = None,
    addresses: dict[str, str] | None = None,
) -> dict[str, PeerChoice]:
    rng = random.Random(seed)
    out = {}
    for name, here in points.items():
        candidates = [
            Candidate(other, (addresses or {}).get(other), rtt(here, there))
            for other, there in points.items()
            if other != name
        ]
        out[name] = choose_peers(name, (addresses or {}).get(name), candidates, rng, config)
    return out


def is_connected(choices: dict[str, PeerChoice]) -> bool:
    return len(connected_components({n: c.peers for n, c in choices.items()})) == 1


@pytest.mark.parametrize("seed", range(8))
def test_a_uniform_swarm_is_connected(seed: int) -> None:
    rng = random.Random(seed)
    points = {f"n{i}": (rng.uniform(0, 0.2), rng.uniform(0, 0.2)) for i in range(300)}
    assert is_connected(everyone_chooses(points, seed))


@pytest.mark.parametrize("seed", range(6))
def test_two_dense_far_apart_clusters_stay_connected(seed: int) -> None:
    points = clusters(random.Random(seed), [250, 250], spread=0.001, distance=0.15)
    choices = everyone_chooses(points, seed)
    assert is_connected(choices)
    # Every node's bridges leave its cluster, not just the graph as a whole.
    for name, choice in choices.items():
        assert len(choice.bridges) == 2
        assert all(peer.split("-")[0] != name.split("-")[0] for peer in choice.bridges)


@pytest.mark.parametrize("seed", range(12))
def test_bridges_alone_join_clusters(seed: int) -> None:
    # No random links at all: only nearest peers and one bridge each. Still one component.
    config = TopologyConfig(nearest=4, random_links=0, bridges=1)
    points = clusters(random.Random(seed), [40] * 8, spread=0.002, distance=0.08)
    assert is_connected(everyone_chooses(points, seed, config))


def test_without_bridges_or_random_links_clusters_split() -> None:
    # The failure the bridges exist for: nearest-only choices keep each cluster to itself.
    config = TopologyConfig(nearest=4, random_links=0, bridges=0)
    points = clusters(random.Random(1), [50, 50], spread=0.001, distance=0.15)
    assert (
        len(
            connected_components(
                {n: c.peers for n, c in everyone_chooses(points, 1, config).items()}
            )
        )
        >= 2
    )


@pytest.mark.parametrize("seed", range(8))
def test_a_tiny_island_is_not_cut_off(seed: int) -> None:
    points = clusters(random.Random(seed), [3, 300], spread=0.001, distance=0.1)
    choices = everyone_chooses(points, seed)
    assert is_connected(choices)
    for name in (n for n in choices if n.startswith("c0-")):
        assert any(peer.startswith("c1-") for peer in choices[name].peers)


@pytest.mark.parametrize("seed", range(5))
def test_many_islands_form_one_swarm(seed: int) -> None:
    points = clusters(random.Random(seed), [10] * 50, spread=0.001, distance=0.05)
    assert is_connected(everyone_chooses(points, seed))


def test_another_subnet_is_a_boundary_even_at_lan_latency() -> None:
    # Everyone within 1 ms; two subnets. Bridges must cross to the other subnet.
    rng = random.Random(3)
    points = {f"n{i}": (rng.uniform(0, 0.001), 0.0) for i in range(60)}
    addresses = {
        name: f"192.0.2.{i}:7000" if i < 30 else f"198.51.100.{i}:7000"
        for i, name in enumerate(points)
    }
    config = TopologyConfig(nearest=4, random_links=0, bridges=2)
    choices = everyone_chooses(points, 3, config, addresses)
    for name, choice in choices.items():
        here = addresses[name].split(".")[0:3]
        assert all(addresses[p].split(".")[0:3] != here for p in choice.bridges)
    assert is_connected(choices)


def test_the_choice_is_bounded_and_deterministic() -> None:
    rng = random.Random(0)
    cands = [Candidate(f"n{i}", None, rng.uniform(0.001, 0.2)) for i in range(100)]
    config = TopologyConfig()
    first = choose_peers("me", None, cands, random.Random(42), config)
    shuffled = list(cands)
    random.Random(7).shuffle(shuffled)
    assert choose_peers("me", None, shuffled, random.Random(42), config) == first
    assert len(first.peers) == config.total
    assert "me" not in first.peers
    nearest = sorted(cands, key=lambda c: c.rtt or 0)[: config.nearest]
    assert set(first.nearest) == {c.name for c in nearest}
    assert choose_peers("me", None, cands, random.Random(43), config) != first


def test_unknown_rtts_still_give_a_full_set() -> None:
    cands = [Candidate(f"n{i}") for i in range(50)]
    choice = choose_peers("me", None, cands, random.Random(1))
    assert choice.nearest == ()
    assert len(choice.peers) == TopologyConfig().total


def test_few_members_are_all_chosen() -> None:
    cands = [Candidate(f"n{i}", None, 0.01 * i) for i in range(5)] + [Candidate("me")]
    choice = choose_peers("me", None, cands, random.Random(1))
    assert choice.peers == {f"n{i}" for i in range(5)}


def test_rechoosing_keeps_most_links_and_rotates_one() -> None:
    rng = random.Random(5)
    cands = [Candidate(f"n{i}", None, rng.uniform(0.001, 0.2)) for i in range(200)]
    config = TopologyConfig(nearest=4, random_links=3, bridges=2, rotate=1)
    choice_rng = random.Random(9)
    first = choose_peers("me", None, cands, choice_rng, config)
    second = choose_peers("me", None, cands, choice_rng, config, previous=first)
    assert second.nearest == first.nearest
    assert second.bridges == first.bridges
    assert len(set(second.random) & set(first.random)) == 2
    # A previous peer that is gone is replaced.
    alive = [c for c in cands if c.name != first.bridges[0]]
    third = choose_peers("me", None, alive, choice_rng, config, previous=second)
    assert first.bridges[0] not in third.peers and len(third.bridges) == 2


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("192.0.2.1:7000", "192.0.2.200:7001", True),
        ("192.0.2.1", "192.0.3.1", False),
        ("[2001:db8:0:1::5]:7000", "[2001:db8:0:1::9]:7000", True),
        ("[2001:db8:0:1::5]:7000", "2001:db8:0:2::5", False),
        ("node-a.example:7000", "192.0.2.1:7000", None),
        (None, "192.0.2.1", None),
    ],
)
def test_same_subnet(a: str | None, b: str | None, expected: bool | None) -> None:
    assert same_subnet(a, b) is expected


def test_connected_components_ignores_dead_peers() -> None:
    comps = connected_components({"a": ["b", "gone"], "b": [], "c": ["c"]})
    assert comps == [{"a", "b"}, {"c"}]


def test_config_is_checked() -> None:
    with pytest.raises(ValueError):
        TopologyConfig(nearest=0, random_links=0, bridges=0)
    with pytest.raises(ValueError):
        TopologyConfig(nearest=-1)


def test_nearest_peers_are_kept_while_about_as_near() -> None:
    rng = random.Random(2)
    cands = [Candidate(f"n{i}", None, rng.uniform(0.010, 0.200)) for i in range(100)]
    config = TopologyConfig(nearest=4, nearest_slack=0.5, nearest_slack_floor=0.0)
    first = choose_peers("me", None, cands, random.Random(1), config)
    # Everyone else comes a little nearer: the old nearest are still within the slack.
    nearer = [
        Candidate(c.name, None, c.rtt if c.name in first.nearest else (c.rtt or 0) * 0.9)
        for c in cands
    ]
    again = choose_peers("me", None, nearer, random.Random(1), config, previous=first)
    assert set(again.nearest) == set(first.nearest)
    # Much nearer: they are replaced.
    much = [
        Candidate(c.name, None, c.rtt if c.name in first.nearest else (c.rtt or 0) * 0.1)
        for c in cands
    ]
    moved = choose_peers("me", None, much, random.Random(1), config, previous=first)
    assert not set(moved.nearest) & set(first.nearest)


def test_rotate_zero_keeps_every_random_link() -> None:
    rng = random.Random(4)
    cands = [Candidate(f"n{i}", None, rng.uniform(0.001, 0.2)) for i in range(200)]
    config = TopologyConfig(random_links=3, rotate=1)
    first = choose_peers("me", None, cands, random.Random(3), config)
    again = choose_peers("me", None, cands, random.Random(5), config, previous=first, rotate=0)
    assert again.random == first.random
