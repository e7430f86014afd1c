"""Vivaldi network coordinates: estimate the round trip time between any two nodes.

Each node keeps a point in a Euclidean space plus a non-negative *height* (the access-link
delay that every path from that node pays) and moves it a little every time it measures a
round trip to a peer whose coordinate it knows, so that distances between points come to
approximate RTTs. Nodes then estimate the RTT to peers they never measured.

References (the algorithm and its constants; the code here is our own):

- F. Dabek, R. Cox, F. Kaashoek, R. Morris, "Vivaldi: A Decentralized Network Coordinate
  System", SIGCOMM 2004: the spring model, the adaptive timestep ``delta = cc * w`` with
  ``w = e_local / (e_local + e_remote)``, the error estimate moving average with ``ce``, and
  the height-vector model (section 5.4).
- J. Ledlie, P. Gardner, M. Seltzer, "Network Coordinates in the Wild", NSDI 2007: a
  per-peer latency filter (a moving median of the last few samples) against outliers, and
  gravity towards the origin so that coordinates do not drift away together.
- HashiCorp Serf's ``coordinate`` package documentation and defaults (8 dimensions,
  ``ce = cc = 0.25``, error cap 1.5, minimum height 10 us, a window of 20 samples for the
  non-Euclidean adjustment term, filter of 3 samples, ``GravityRho = 150``, RTTs above 10 s
  refused). Serf's gravity divides a distance *in seconds* by ``rho = 150``, which makes it
  a very weak pull. Read as 150 ms (``rho = 0.15``) it pulls by ``(d / 0.15)**2`` seconds per
  update and coordinates diverge; ``rho = 1`` already costs 23% median error on the test
  matrix against 2% with 150. So Serf's value is kept as it is.

Pollen additions, because a peer's coordinate arrives over the network and is hostile input:

- a peer coordinate is used only if it has our dimensionality and every component is finite
  and within plausible bounds (:func:`is_plausible`); otherwise the sample is dropped;
- the displacement caused by one sample is capped at ``cc * rtt``, and the sample fed to the
  adjustment window is clamped to ``[-rtt, rtt]``, so a peer that lies about where it is can
  nudge us by a fraction of one RTT per sample instead of teleporting us (honest samples are
  almost never capped: the uncapped step is ``cc * w * (rtt - dist)`` with ``w <= 1``);
- an outlier guard: once we are confident (error below 0.5), a sample whose prediction is off
  by more than 5x the RTT is dropped -- unless three in a row are, in which case we are the
  one who is wrong (the node moved) and samples are taken again;
- if our own coordinate ever stops being finite it is reset to the origin (as Serf does).

Everything is deterministic given the :class:`random.Random` passed in; it is used only for
the rare random direction when two coordinates coincide.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from dataclasses import dataclass

# Below this, two points are the same point and an RTT is zero (Serf's zeroThreshold).
ZERO_THRESHOLD = 1.0e-6
# No RTT on this planet is longer; larger samples are measurement errors (Serf refuses > 10 s).
MAX_RTT = 10.0
# A component of an honest coordinate stays well below this (seconds).
MAX_COMPONENT = 100.0


@dataclass(frozen=True, slots=True)
class VivaldiConfig:
    """Tuning of the Vivaldi client; the defaults are Serf's (see the module docstring)."""

    dimensionality: int = 8
    vivaldi_error_max: float = 1.5
    vivaldi_ce: float = 0.25
    vivaldi_cc: float = 0.25
    adjustment_window_size: int = 20
    height_min: float = 10.0e-6
    latency_filter_size: int = 3
    gravity_rho: float = 150.0
    max_rtt: float = MAX_RTT
    # How many peers' latency filters are kept; the least recently updated is dropped.
    max_filtered_peers: int = 4096
    # Pollen's outlier guard: once our own error is below ``outlier_max_error``, a sample
    # whose prediction is off by more than ``outlier_wrongness`` times the RTT is dropped,
    # unless ``outlier_patience`` samples in a row were dropped (then we are the one who is
    # wrong, e.g. the node moved to another network, and samples are taken again).
    outlier_max_error: float = 0.5
    outlier_wrongness: float = 5.0
    outlier_patience: int = 3

    def __post_init__(self) -> None:
        if not 1 <= self.dimensionality <= 32:
            raise ValueError("dimensionality must be between 1 and 32")
        if self.latency_filter_size < 1 or self.max_filtered_peers < 1:
            raise ValueError("latency_filter_size and max_filtered_peers must be at least 1")
        if self.adjustment_window_size < 0:
            raise ValueError("adjustment_window_size must not be negative")
        for name in ("vivaldi_error_max", "vivaldi_ce", "vivaldi_cc", "height_min", "max_rtt"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number")
        if not (math.isfinite(self.gravity_rho) and self.gravity_rho > 0):
            raise ValueError("gravity_rho must be a positive finite number")
        if not (self.outlier_max_error >= 0 and self.outlier_wrongness > 0):
            raise ValueError("outlier_max_error and outlier_wrongness must be positive")
        if self.outlier_patience < 0:
            raise ValueError("outlier_patience must not be negative")


@dataclass(frozen=True, slots=True)
class Coordinate:
    """A point in the Vivaldi space; every quantity is in seconds except ``error``.

    ``vec`` is the Euclidean part, ``height`` the access-link delay, ``error`` the node's
    confidence (a relative error estimate, 0 = exact, capped by the config), and
    ``adjustment`` Serf's additive correction for what the Euclidean model cannot capture.
    """

    vec: tuple[float, ...]
    height: float
    error: float
    adjustment: float = 0.0

    @classmethod
    def origin(cls, config: VivaldiConfig | None = None) -> Coordinate:
        """The starting coordinate: at the origin, minimum height, maximum error."""
        cfg = config or VivaldiConfig()
        return cls(
            vec=(0.0,) * cfg.dimensionality,
            height=cfg.height_min,
            error=cfg.vivaldi_error_max,
            adjustment=0.0,
        )

    def is_finite(self) -> bool:
        """True if no component is NaN or infinite."""
        return (
            all(math.isfinite(x) for x in self.vec)
            and math.isfinite(self.height)
            and math.isfinite(self.error)
            and math.isfinite(self.adjustment)
        )

    def raw_distance_to(self, other: Coordinate) -> float:
        """Euclidean distance plus both heights, without the adjustment terms (seconds)."""
        return _magnitude(_diff(self.vec, other.vec)) + self.height + other.height

    def distance_to(self, other: Coordinate) -> float:
        """The estimated RTT to ``other`` in seconds.

        The adjustment terms are added unless that would make the estimate non-positive, in
        which case the raw distance is used (as Serf does).

        Raises :class:`ValueError` if the two coordinates have different dimensionality.
        """
        if len(self.vec) != len(other.vec):
            raise ValueError(
                f"coordinates have different dimensionality ({len(self.vec)} and {len(other.vec)})"
            )
        raw = self.raw_distance_to(other)
        adjusted = raw + self.adjustment + other.adjustment
        return adjusted if adjusted > 0.0 else raw


def estimate_rtt(a: Coordinate, b: Coordinate) -> float:
    """Estimated round trip time in seconds between the nodes at ``a`` and ``b``.

    Raises :class:`ValueError` if the coordinates have different dimensionality.
    """
    return a.distance_to(b)


def is_plausible(coord: Coordinate, config: VivaldiConfig | None = None) -> bool:
    """Whether ``coord`` could come from an honest peer running ``config``.

    Checks the dimensionality, that everything is finite, components within
    ``MAX_COMPONENT``, height within ``[0, max_rtt]``, error within ``[0, error_max]`` and
    ``|adjustment| <= max_rtt``.
    """
    cfg = config or VivaldiConfig()
    if len(coord.vec) != cfg.dimensionality or not coord.is_finite():
        return False
    if any(abs(x) > MAX_COMPONENT for x in coord.vec):
        return False
    return (
        0.0 <= coord.height <= cfg.max_rtt
        and 0.0 <= coord.error <= cfg.vivaldi_error_max
        and abs(coord.adjustment) <= cfg.max_rtt
    )


@dataclass(slots=True)
class VivaldiStats:
    """Counters of what the client did with the samples it was given."""

    updates: int = 0
    rejected: int = 0
    resets: int = 0


class VivaldiClient:
    """One node's Vivaldi state: its coordinate, latency filters and adjustment window.

    Feed it with :meth:`update` for every RTT measured to a peer (the membership layer
    measures them on probe acks, so no extra traffic is needed) and read :attr:`coordinate`.
    Not thread-safe; deterministic given ``rng``.
    """

    def __init__(self, config: VivaldiConfig | None = None, rng: random.Random | None = None):
        self._config = config or VivaldiConfig()
        self._rng = rng or random.Random(0)
        self._coord = Coordinate.origin(self._config)
        self._origin = Coordinate.origin(self._config)
        self._filters: OrderedDict[str, list[float]] = OrderedDict()
        self._adjustment_samples = [0.0] * self._config.adjustment_window_size
        self._adjustment_index = 0
        self._outlier_streak = 0
        self._stats = VivaldiStats()

    @property
    def config(self) -> VivaldiConfig:
        """The configuration this client runs with."""
        return self._config

    @property
    def coordinate(self) -> Coordinate:
        """This node's current coordinate."""
        return self._coord

    @property
    def stats(self) -> VivaldiStats:
        """A copy of the counters of accepted, rejected and reset updates."""
        return VivaldiStats(self._stats.updates, self._stats.rejected, self._stats.resets)

    def estimate_rtt(self, other: Coordinate) -> float:
        """Estimated RTT in seconds from this node to the node at ``other``."""
        return self._coord.distance_to(other)

    def forget(self, peer_id: str) -> None:
        """Drop the latency filter of a peer that left the swarm."""
        self._filters.pop(peer_id, None)

    def reset(self) -> None:
        """Start over from the origin, forgetting every filter and adjustment sample."""
        self._coord = Coordinate.origin(self._config)
        self._filters.clear()
        self._adjustment_samples = [0.0] * self._config.adjustment_window_size
        self._adjustment_index = 0
        self._outlier_streak = 0

    def update(self, peer_id: str, peer_coord: Coordinate, rtt_seconds: float) -> Coordinate:
        """Take one RTT sample to ``peer_id``, whose coordinate is ``peer_coord``.

        Returns the (possibly) moved coordinate. A sample is ignored, and counted in
        ``stats.rejected``, when the RTT is negative, not finite or above ``max_rtt``, or the
        peer's coordinate is not plausible (see :func:`is_plausible`). An RTT of exactly zero
        (seen with coarse clocks) is taken as the zero threshold, 1 us.
        """
        cfg = self._config
        if (
            not isinstance(rtt_seconds, (int, float))
            or not math.isfinite(rtt_seconds)
            or rtt_seconds < 0.0
            or rtt_seconds > cfg.max_rtt
            or not is_plausible(peer_coord, cfg)
        ):
            self._stats.rejected += 1
            return self._coord
        rtt = self._filter(peer_id, max(float(rtt_seconds), ZERO_THRESHOLD))
        if not self._update_vivaldi(peer_coord, rtt):
            return self._coord
        self._update_adjustment(peer_coord, rtt)
        self._update_gravity()
        if not self._coord.is_finite():
            self._stats.resets += 1
            self._coord = Coordinate.origin(cfg)
        self._stats.updates += 1
        return self._coord

    # --- the algorithm ----------------------------------------------------------------

    def _filter(self, peer_id: str, rtt: float) -> float:
        """Ledlie's moving median over the last ``latency_filter_size`` samples of a peer."""
        samples = self._filters.pop(peer_id, None)
        if samples is None:
            samples = []
            if len(self._filters) >= self._config.max_filtered_peers:
                self._filters.popitem(last=False)
        samples.append(rtt)
        if len(samples) > self._config.latency_filter_size:
            del samples[0]
        self._filters[peer_id] = samples
        ordered = sorted(samples)
        return ordered[len(ordered) // 2]

    def _update_vivaldi(self, other: Coordinate, rtt: float) -> bool:
        cfg = self._config
        coord = self._coord
        dist = coord.distance_to(other)
        wrongness = abs(dist - rtt) / rtt
        if coord.error < cfg.outlier_max_error and wrongness > cfg.outlier_wrongness:
            if self._outlier_streak < cfg.outlier_patience:
                self._outlier_streak += 1
                self._stats.rejected += 1
                return False
        else:
            self._outlier_streak = 0
        total_error = max(coord.error + other.error, ZERO_THRESHOLD)
        weight = coord.error / total_error
        error = cfg.vivaldi_ce * weight * wrongness + coord.error * (1.0 - cfg.vivaldi_ce * weight)
        error = min(error, cfg.vivaldi_error_max)
        force = cfg.vivaldi_cc * weight * (rtt - dist)
        # Pollen: one sample moves us by at most one RTT (a lying peer cannot teleport us).
        cap = cfg.vivaldi_cc * rtt
        force = max(-cap, min(cap, force))
        moved = self._apply_force(coord, force, other)
        self._coord = Coordinate(moved.vec, moved.height, error, coord.adjustment)
        return True

    def _update_adjustment(self, other: Coordinate, rtt: float) -> None:
        window = self._config.adjustment_window_size
        if window == 0:
            return
        sample = rtt - self._coord.raw_distance_to(other)
        self._adjustment_samples[self._adjustment_index] = max(-rtt, min(rtt, sample))
        self._adjustment_index = (self._adjustment_index + 1) % window
        adjustment = sum(self._adjustment_samples) / (2.0 * window)
        c = self._coord
        self._coord = Coordinate(c.vec, c.height, c.error, adjustment)

    def _update_gravity(self) -> None:
        dist = self._origin.distance_to(self._coord)
        ratio = dist / self._config.gravity_rho
        force = -(ratio * ratio)  # not ** 2, which raises OverflowError instead of giving inf
        c = self._apply_force(self._coord, force, self._origin)
        self._coord = Coordinate(c.vec, c.height, self._coord.error, self._coord.adjustment)

    def _apply_force(self, coord: Coordinate, force: float, other: Coordinate) -> Coordinate:
        """Move ``coord`` by ``force`` seconds along the line from ``other`` (away if > 0)."""
        unit, mag = self._unit_vector_at(coord.vec, other.vec)
        vec = tuple(x + u * force for x, u in zip(coord.vec, unit, strict=True))
        height = coord.height
        if mag > ZERO_THRESHOLD:
            height = (coord.height + other.height) * force / mag + coord.height
            height = max(height, self._config.height_min)
        return Coordinate(vec, height, coord.error, coord.adjustment)

    def _unit_vector_at(
        self, a: tuple[float, ...], b: tuple[float, ...]
    ) -> tuple[tuple[float, ...], float]:
        """Unit vector from ``b`` towards ``a`` and the distance; random if they coincide."""
        d = _diff(a, b)
        mag = _magnitude(d)
        if mag > ZERO_THRESHOLD:
            return tuple(x / mag for x in d), mag
        for _ in range(4):
            r = tuple(self._rng.random() - 0.5 for _ in a)
            rmag = _magnitude(r)
            if rmag > ZERO_THRESHOLD:
                return tuple(x / rmag for x in r), 0.0
        return (1.0,) + (0.0,) * (len(a) - 1), 0.0


def _diff(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(x - y for x, y in zip(a, b, strict=True))


def _magnitude(v: tuple[float, ...]) -> float:
    return math.sqrt(sum(x * x for x in v))


__all__ = [
    "MAX_RTT",
    "Coordinate",
    "VivaldiClient",
    "VivaldiConfig",
    "VivaldiStats",
    "estimate_rtt",
    "is_plausible",
]
