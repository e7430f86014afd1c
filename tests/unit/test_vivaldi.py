"""Vivaldi coordinates: convergence on a synthetic latency matrix, and hostile peers."""

from __future__ import annotations

import math
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pollen.mesh.vivaldi import (
    Coordinate,
    VivaldiClient,
    VivaldiConfig,
    estimate_rtt,
    is_plausible,
)

CFG = VivaldiConfig()


class Swarm:
    """``n`` nodes on a 100 ms x 100 ms plane with access links of 1 to 10 ms each.

    True RTT = Euclidean distance + both heights, which the height-vector model can represent.
    Each round every node measures one random peer with +-3% jitter.
    """

    def __init__(self, n: int = 20, seed: int = 1, jitter: float = 0.03) -> None:
        self.rng = random.Random(seed)
        self.n = n
        self.jitter = jitter
        self.points = [(self.rng.uniform(0, 0.1), self.rng.uniform(0, 0.1)) for _ in range(n)]
        self.heights = [self.rng.uniform(0.001, 0.01) for _ in range(n)]
        self.clients = [VivaldiClient(CFG, random.Random(seed * 1000 + i)) for i in range(n)]
        self.scale = 1.0

    def true_rtt(self, i: int, j: int) -> float:
        d = math.dist(self.points[i], self.points[j]) + self.heights[i] + self.heights[j]
        return d * self.scale

    def peer(self, i: int) -> int:
        j = self.rng.randrange(self.n - 1)
        return j + 1 if j >= i else j

    def round(self, liar: int | None = None, lie: Coordinate | None = None) -> None:
        for i in range(self.n):
            if i == liar:
                continue
            j = self.peer(i)
            while j == liar and lie is None:
                j = self.peer(i)
            coord = lie if (j == liar and lie is not None) else self.clients[j].coordinate
            rtt = self.true_rtt(i, j) * self.rng.uniform(1 - self.jitter, 1 + self.jitter)
            self.clients[i].update(f"n{j}", coord, rtt)

    def errors(self, exclude: int | None = None) -> list[float]:
        out = []
        for i in range(self.n):
            for j in range(i + 1, self.n):
                if exclude in (i, j):
                    continue
                est = estimate_rtt(self.clients[i].coordinate, self.clients[j].coordinate)
                true = self.true_rtt(i, j)
                out.append(abs(est - true) / true)
        return out


def test_converges_on_a_plane_with_heights() -> None:
    swarm = Swarm()
    for _ in range(20):
        swarm.round()
    early = statistics.median(swarm.errors())
    for _ in range(180):
        swarm.round()
    errors = sorted(swarm.errors())
    median = statistics.median(errors)
    p90 = errors[int(0.9 * len(errors))]
    # The paper reports 11-14% on real Internet data; this matrix is representable exactly,
    # so Vivaldi does much better: about 2% median after 200 rounds (16% after 20).
    assert median < 0.15
    assert median < 0.05, median
    assert p90 < 0.15, p90
    assert median < early
    for client in swarm.clients:
        c = client.coordinate
        assert c.is_finite() and c.error < 0.5 and c.height >= CFG.height_min


def test_same_seed_same_coordinates() -> None:
    a, b = Swarm(seed=4), Swarm(seed=4)
    for _ in range(30):
        a.round()
        b.round()
    assert [c.coordinate for c in a.clients] == [c.coordinate for c in b.clients]


def test_tracks_a_change_of_the_network() -> None:
    """All RTTs grow 5x (a node moved): the outlier guard must not freeze the coordinates."""
    swarm = Swarm(seed=2)
    for _ in range(150):
        swarm.round()
    swarm.scale = 5.0
    for _ in range(300):
        swarm.round()
    assert statistics.median(swarm.errors()) < 0.15


def test_coincident_coordinates_are_pushed_apart_deterministically() -> None:
    def pair() -> tuple[Coordinate, Coordinate]:
        a = VivaldiClient(CFG, random.Random(1))
        b = VivaldiClient(CFG, random.Random(2))
        for _ in range(50):
            a.update("b", b.coordinate, 0.02)
            b.update("a", a.coordinate, 0.02)
        return a.coordinate, b.coordinate

    a, b = pair()
    assert estimate_rtt(a, b) == pytest.approx(0.02, rel=0.1)
    assert pair() == (a, b)


# --- hostile input ----------------------------------------------------------------------

NAN = float("nan")
INF = float("inf")
ORIGIN = Coordinate.origin(CFG)


@pytest.mark.parametrize(
    "coord",
    [
        Coordinate((NAN,) + (0.0,) * 7, 0.001, 0.5),
        Coordinate((INF,) + (0.0,) * 7, 0.001, 0.5),
        Coordinate((0.0,) * 8, NAN, 0.5),
        Coordinate((0.0,) * 8, 0.001, INF),
        Coordinate((0.0,) * 8, 0.001, 0.5, NAN),
        Coordinate((0.0,) * 7, 0.001, 0.5),  # wrong dimensionality
        Coordinate((0.0,) * 9, 0.001, 0.5),
        Coordinate((1e300,) + (0.0,) * 7, 0.001, 0.5),  # absurdly far
        Coordinate((0.0,) * 8, -0.001, 0.5),  # negative height
        Coordinate((0.0,) * 8, 0.001, -0.1),  # negative error
        Coordinate((0.0,) * 8, 0.001, 99.0),  # error above the cap
        Coordinate((0.0,) * 8, 0.001, 0.5, 1e6),  # absurd adjustment
    ],
)
def test_implausible_peer_coordinates_are_ignored(coord: Coordinate) -> None:
    client = VivaldiClient(CFG, random.Random(1))
    client.update("good", Coordinate((0.01,) + (0.0,) * 7, 0.001, 0.3), 0.03)
    before = client.coordinate
    assert not is_plausible(coord, CFG)
    assert client.update("evil", coord, 0.03) == before
    assert client.stats.rejected == 1


@pytest.mark.parametrize("rtt", [-0.001, 10.5, NAN, INF, -INF])
def test_insane_rtts_are_ignored(rtt: float) -> None:
    client = VivaldiClient(CFG, random.Random(1))
    assert client.update("peer", ORIGIN, rtt) == ORIGIN
    assert client.stats.rejected == 1 and client.stats.updates == 0


def test_a_zero_rtt_is_clamped_not_refused() -> None:
    client = VivaldiClient(CFG, random.Random(1))
    coord = client.update("peer", ORIGIN, 0.0)
    assert coord.is_finite() and client.stats.updates == 1


@pytest.mark.parametrize(
    "lie",
    [
        Coordinate((50.0,) * 8, 9.0, 0.0),  # far away, claims perfect confidence
        Coordinate((-3.0,) + (0.0,) * 7, 1e-5, 0.01, -5.0),  # everyone is "closer" to it
    ],
)
def test_a_lying_peer_does_not_poison_the_swarm(lie: Coordinate) -> None:
    swarm = Swarm(seed=3)
    liar = 5
    for _ in range(200):
        swarm.round(liar=liar, lie=lie)
    errors = swarm.errors(exclude=liar)
    assert statistics.median(errors) < 0.05
    assert all(c.coordinate.is_finite() for c in swarm.clients)


def test_a_subtle_liar_has_a_bounded_effect_that_heals() -> None:
    """A liar that knows our coordinates and claims to be ~4x farther than it is (just under
    the outlier guard) moves an honest node by at most cc * RTT per sample. It does degrade
    the estimates (to about 27% median here), but boundedly, and they recover once the liar
    is gone (revoked, say)."""
    swarm = Swarm(seed=6)
    liar = 2
    for _ in range(100):
        swarm.round()
    for _ in range(200):
        for i in range(swarm.n):
            if i == liar:
                continue
            j = swarm.peer(i)
            rtt = swarm.true_rtt(i, j)
            if j == liar:
                me = swarm.clients[i].coordinate
                direction = [x + 1e-3 for x in me.vec]
                norm = math.sqrt(sum(x * x for x in direction))
                vec = tuple(
                    x + 3.5 * rtt * d / norm for x, d in zip(me.vec, direction, strict=True)
                )
                swarm.clients[i].update("liar", Coordinate(vec, 1e-5, 0.01), rtt)
            else:
                swarm.clients[i].update(f"n{j}", swarm.clients[j].coordinate, rtt)
    assert statistics.median(swarm.errors(exclude=liar)) < 0.5
    assert all(is_plausible(c.coordinate, CFG) for c in swarm.clients)
    for _ in range(150):
        swarm.round(liar=liar)  # the liar is gone: nobody measures it any more
    assert statistics.median(swarm.errors(exclude=liar)) < 0.10


finite_or_not = st.floats(allow_nan=True, allow_infinity=True, width=64)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    vec=st.lists(finite_or_not, min_size=1, max_size=10),
    height=finite_or_not,
    error=finite_or_not,
    adjustment=finite_or_not,
    rtt=finite_or_not,
)
def test_no_input_makes_the_coordinate_non_finite(
    vec: list[float], height: float, error: float, adjustment: float, rtt: float
) -> None:
    client = VivaldiClient(CFG, random.Random(1))
    client.update("a", Coordinate((0.01,) + (0.0,) * 7, 0.001, 0.4), 0.02)
    coord = client.update("x", Coordinate(tuple(vec), height, error, adjustment), rtt)
    assert coord.is_finite()
    assert is_plausible(coord, CFG)


# --- API edges --------------------------------------------------------------------------


def test_estimate_rtt_of_different_dimensionality_is_an_error() -> None:
    with pytest.raises(ValueError, match="dimensionality"):
        estimate_rtt(Coordinate((0.0,) * 8, 0.0, 1.0), Coordinate((0.0,) * 2, 0.0, 1.0))


def test_adjusted_distance_never_goes_negative() -> None:
    a = Coordinate((0.0,) * 8, 1e-5, 0.1, -1.0)
    b = Coordinate((0.01,) + (0.0,) * 7, 1e-5, 0.1, -1.0)
    assert estimate_rtt(a, b) == pytest.approx(0.01 + 2e-5)


def test_forget_and_reset() -> None:
    client = VivaldiClient(CFG, random.Random(1))
    client.update("p", Coordinate((0.01,) + (0.0,) * 7, 0.001, 0.3), 0.03)
    client.forget("p")
    client.forget("never-seen")
    client.reset()
    assert client.coordinate == ORIGIN


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dimensionality": 0},
        {"latency_filter_size": 0},
        {"vivaldi_cc": float("nan")},
        {"height_min": -1.0},
        {"gravity_rho": 0.0},
    ],
)
def test_bad_config_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        VivaldiConfig(**kwargs)  # type: ignore[arg-type]
