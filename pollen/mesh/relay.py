"""Relay: reaching a node through another when there is no direct route. Sans-IO.

When node A cannot open a connection to node B (a firewall, a one-way route, a partition
between two subnets) but some node R can reach both, A's streams to B go through R:

1. A opens a stream of kind :data:`RELAY_KIND` to R and writes a :class:`RelayRequest` naming
   the target B and the kind of stream A wants.
2. R checks the request, opens a stream of kind :data:`RELAYED_KIND` to B (dialling B if it must,
   never through a further relay: one hop at most) and writes a :class:`RelayedHeader` naming the
   origin A, which R authenticated itself, and the kind.
3. B answers R with a :class:`RelayAnswer`; R passes it to A. From then on R copies frames
   both ways unchanged until either end finishes or resets.

Only streams are relayed, never membership datagrams: SWIM already reaches a node it cannot
probe directly through indirect probes (``PingReq``), and an RTT measured through a relay would
teach Vivaldi a wrong distance. Document gossip flows epidemically through whoever is reachable.

This module holds the vocabulary (headers and answers, with strict decoding: every byte comes
from a peer) and :class:`RouteTable`, the memory of which peers could not be reached directly
and which relay to try for them, driven by a clock like the other protocol state machines. The
async splicing lives in :mod:`pollen.mesh.service`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

import orjson

from pollen.mesh.frames import decode_object

#: Stream kind of a request to relay, sent by the origin to the relay.
RELAY_KIND: Final = "relay"
#: Stream kind of a relayed stream, opened by the relay to the target.
RELAYED_KIND: Final = "relayed"
#: Largest header or answer frame.
MAX_HEADER_SIZE: Final = 1024

_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
_KIND_RE = re.compile(r"^[a-z0-9][a-z0-9._/-]{0,63}\Z")


class RelayError(Exception):
    """A malformed relay header or answer, or a relay that could not be used; one sentence."""


def _decode_object(frame: bytes, what: str) -> dict[str, object]:
    return decode_object(frame, what, MAX_HEADER_SIZE, RelayError)


def _field(value: dict[str, object], key: str, pattern: re.Pattern[str], what: str) -> str:
    text = value.get(key)
    if not isinstance(text, str) or not pattern.match(text):
        raise RelayError(f'the {what} has no valid "{key}"')
    return text


def _only(value: dict[str, object], keys: set[str], what: str) -> None:
    extra = set(value) - keys
    if extra:
        raise RelayError(f"the {what} has unknown fields: {', '.join(sorted(extra))}")


@dataclass(frozen=True)
class RelayRequest:
    """Origin to relay: open a ``kind`` stream to ``target`` for me."""

    target: str
    kind: str

    def encode(self) -> bytes:
        return orjson.dumps({"to": self.target, "kind": self.kind})

    @classmethod
    def decode(cls, frame: bytes) -> RelayRequest:
        value = _decode_object(frame, "relay request")
        _only(value, {"to", "kind"}, "relay request")
        return cls(
            target=_field(value, "to", _NAME_RE, "relay request"),
            kind=_field(value, "kind", _KIND_RE, "relay request"),
        )


@dataclass(frozen=True)
class RelayedHeader:
    """Relay to target: ``origin`` (authenticated by the relay) opens a ``kind`` stream."""

    origin: str
    kind: str

    def encode(self) -> bytes:
        return orjson.dumps({"from": self.origin, "kind": self.kind})

    @classmethod
    def decode(cls, frame: bytes) -> RelayedHeader:
        value = _decode_object(frame, "relayed stream header")
        _only(value, {"from", "kind"}, "relayed stream header")
        return cls(
            origin=_field(value, "from", _NAME_RE, "relayed stream header"),
            kind=_field(value, "kind", _KIND_RE, "relayed stream header"),
        )


@dataclass(frozen=True)
class RelayAnswer:
    """Target (through the relay) or relay to origin: accepted, or refused with a reason."""

    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def encode(self) -> bytes:
        return orjson.dumps({"ok": True} if self.error is None else {"error": self.error[:512]})

    @classmethod
    def decode(cls, frame: bytes) -> RelayAnswer:
        value = _decode_object(frame, "relay answer")
        _only(value, {"ok", "error"}, "relay answer")
        if value.get("ok") is True and "error" not in value:
            return cls()
        error = value.get("error")
        if isinstance(error, str) and "ok" not in value:
            return cls(error=error[:512] or "refused")
        raise RelayError("the relay answer is neither ok nor an error")


# --- routes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouteConfig:
    """How long a failed direct dial is remembered, and how relays are chosen."""

    direct_attempt: float = 2.0
    """Seconds a first direct dial may take before the relay is tried instead."""
    retry_direct_after: float = 30.0
    """Seconds after a failed direct dial before the next stream tries direct again."""
    max_relays_tried: int = 3
    """Relays tried, best first, before giving up on a stream."""
    indirect_only_limit: int = 2
    """Probes in a row answered only through an intermediary before the direct connection is
    taken for broken (one lost datagram must not cut a healthy connection)."""


@dataclass
class RouteTable:
    """Which peers this node could not reach directly, and through whom to try them.

    Level-triggered by what the caller reports: a direct connection to a peer (made by anyone,
    in either direction) clears its mark; a failed dial sets it until ``retry_direct_after``.
    """

    config: RouteConfig = field(default_factory=RouteConfig)
    _unreachable_until: dict[str, float] = field(default_factory=dict)
    _via: dict[str, str] = field(default_factory=dict)
    _indirect_only: dict[str, int] = field(default_factory=dict)

    def direct_failed(self, peer: str, now: float) -> None:
        """A direct dial to ``peer`` failed."""
        self._unreachable_until[peer] = now + self.config.retry_direct_after

    def direct_up(self, peer: str) -> None:
        """There is a direct connection to ``peer``."""
        self._unreachable_until.pop(peer, None)
        self._via.pop(peer, None)

    def direct_answer(self, peer: str) -> None:
        """``peer`` answered a probe directly: the direct path works."""
        self._indirect_only.pop(peer, None)

    def indirect_only(self, peer: str, now: float) -> bool:
        """``peer`` answered a probe only through an intermediary.

        True when that happened ``indirect_only_limit`` times in a row: the direct connection
        is broken even if it is not closed yet (QUIC notices only at its idle timeout), so the
        caller should close it; streams go through a relay until ``retry_direct_after``.
        """
        count = self._indirect_only.get(peer, 0) + 1
        if count < self.config.indirect_only_limit:
            self._indirect_only[peer] = count
            return False
        self._indirect_only.pop(peer, None)
        self.direct_failed(peer, now)
        return True

    def try_direct(self, peer: str, now: float) -> bool:
        """Whether a stream to ``peer`` should try a direct dial first."""
        until = self._unreachable_until.get(peer)
        if until is None:
            return True
        if now >= until:
            del self._unreachable_until[peer]
            return True
        return False

    def relayed_via(self, peer: str, relay: str) -> None:
        """A stream to ``peer`` went through ``relay``: try it first next time."""
        self._via[peer] = relay

    def relay_failed(self, peer: str, relay: str) -> None:
        if self._via.get(peer) == relay:
            del self._via[peer]

    def forget(self, peer: str) -> None:
        """``peer`` left the swarm."""
        self._unreachable_until.pop(peer, None)
        self._via.pop(peer, None)
        self._indirect_only.pop(peer, None)
        for target, relay in list(self._via.items()):
            if relay == peer:
                del self._via[target]

    def relays(
        self,
        target: str,
        connected: Iterable[str],
        distance: Callable[[str, str], float | None],
        *,
        self_name: str,
    ) -> list[str]:
        """Relays to try for ``target``, best first, among peers this node is connected to.

        The one that worked last time comes first; then the others by the estimated length of
        the path through them, ``distance(self, relay) + distance(relay, target)`` (Vivaldi;
        unknown distances last), ties by name so every run orders them the same way.
        """
        candidates = sorted({c for c in connected if c not in (target, self_name)})

        def path(relay: str) -> tuple[int, float, str]:
            first = distance(self_name, relay)
            second = distance(relay, target)
            if first is None or second is None:
                return (1, 0.0, relay)
            return (0, first + second, relay)

        ordered = sorted(candidates, key=path)
        preferred = self._via.get(target)
        if preferred in ordered:
            ordered.remove(preferred)
            ordered.insert(0, preferred)
        return ordered[: self.config.max_relays_tried]
