"""Membership and failure detection: SWIM with Lifeguard, as a sans-IO state machine.

Nothing here does I/O or reads a clock. The shell (the node's QUIC transport, or the
simulator) feeds :class:`Membership` with what arrives (:meth:`Membership.receive`), calls
:meth:`Membership.tick` at :meth:`Membership.next_deadline`, and after every call sends what
:meth:`Membership.drain_outgoing` returns and acts on :meth:`Membership.drain_events`. Time is
the ``now`` argument, in seconds on any monotonic scale. Randomness comes from the
:class:`random.Random` given at construction, and no decision depends on the iteration order of
a ``set``, so the same seed and the same inputs give the same outputs in any process.

The protocol
------------
- **SWIM** (A. Das, I. Gupta, A. Motivala, "SWIM: Scalable Weakly-consistent Infection-style
  Process Group Membership Protocol", DSN 2002): every probe interval a member pings the next
  member of a randomized round-robin order (section 4.3; new members are inserted at a random
  place of the current round). Without an ack within the probe timeout it asks ``k`` other
  members to probe the target (``PingReq``); without any ack by the end of the interval the
  target becomes *suspect*. Suspicion, and then death, spread by piggybacking on probes and
  acks (infection style); a suspected member that hears about it refutes with a higher
  incarnation number, which overrides the suspicion everywhere.
- **Lifeguard** (A. Dadgar, J. Phillips, J. Currey, "Lifeguard: Local Health Awareness for
  More Accurate Failure Detection", 2018, arXiv:1707.00788):
  *local health* -- a score that grows when our probes fail without the intermediaries'
  nacks to vouch for our own health, or when we have to refute a suspicion, and shrinks on
  each successful probe; the probe interval and timeout are multiplied by ``score + 1`` (up to
  ``awareness_max_multiplier``), so a slow or overloaded member stops accusing healthy ones.
  *Dynamic suspicion* -- a suspicion timer starts at ``max`` and shrinks towards ``min`` as
  independent confirmations arrive: ``max - (max - min) * log(c + 1) / log(k + 1)``, with
  ``min = suspicion_mult * max(1, log10(N)) * probe_interval``, ``max =
  suspicion_max_timeout_mult * min`` and ``k = suspicion_mult - 2`` expected confirmations
  (0 when fewer than ``k + 2`` members are alive). *Buddy system* -- a ping to a suspect
  member carries the suspicion first, so that it can refute at once. *Nacks* -- an
  intermediary that cannot reach the target says so, so that our local health only counts
  the silence of intermediaries against us.
- **memberlist / Serf adaptations** (HashiCorp memberlist's documented ``DefaultLANConfig`` and
  Serf's gossip documentation, whose defaults are ours): a retransmit limit of
  ``retransmit_mult * ceil(log10(N + 1))`` per update, fewest-transmitted first; a separate
  gossip fan-out of pending updates to ``gossip_nodes`` members every ``gossip_interval``
  (also to members dead for less than ``gossip_to_the_dead_time``, so that a wrongly declared
  member learns it and refutes); a periodic full-state *push-pull* with one random member
  (every ``push_pull_interval``, stretched above 32 members) and on join; a remote "dead" in a
  push-pull is only taken as a suspicion; Serf's *reconnect* of dead members, so that the two
  sides of a healed partition find each other again; tombstones of dead and left members,
  reaped after ``tombstone_timeout``.

Pollen specifics: member identity is the node name, which the transport authenticates; each
member carries a :class:`MemberMeta` (addresses, Vivaldi coordinate, load, held artifacts,
labels) that changes much faster than the state document may; acks carry the acking node's
coordinate and every direct probe yields an RTT sample (:meth:`Membership.drain_rtt_samples`),
so Vivaldi is fed from traffic that exists anyway.

Messages other than ``Sync`` fill their piggyback up to ``max_packet_bytes`` (a single
update larger than that travels alone in a ``Gossip``); ``Sync`` is cut into pages of at
most ``sync_page_bytes``, all under :data:`pollen.mesh.wire.MAX_MESSAGE_SIZE`.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import MappingProxyType
from typing import NamedTuple

from pollen.mesh.vivaldi import Coordinate
from pollen.mesh.wire import (
    MAX_INCARNATION,
    MAX_MESSAGE_SIZE,
    MAX_SEQ,
    Ack,
    Alive,
    Dead,
    Gossip,
    MemberMeta,
    MemberState,
    Nack,
    Ping,
    PingReq,
    Suspect,
    SwimMessage,
    Sync,
    SyncEntry,
    Update,
    check_meta,
    check_name,
    encoded_entry_size,
    encoded_size,
)

# Bytes of a message besides its piggybacked updates (tags, seq, target name), generously.
_MESSAGE_OVERHEAD = 300
# Below this many bytes left, no update fits any more.
_MIN_UPDATE_SIZE = 16
# Stop looking for an update that fits what is left of a packet after this many too large.
_MAX_MISFITS = 8
# Builds a message around its piggybacked updates.
_Builder = Callable[[tuple[Update, ...]], SwimMessage]
# Accepts or refuses a member name when sampling.
_Filter = Callable[[str], bool]
# Heap timer kinds.
_TIMER_SUSPICION = 0
_TIMER_RELAY = 1


@dataclass(frozen=True, slots=True)
class SwimConfig:
    """Timing and fan-out of the protocol. Defaults are memberlist's ``DefaultLANConfig``.

    Times are in seconds. :meth:`lan`, :meth:`wan` and :meth:`local` give memberlist's three
    profiles.
    """

    probe_interval: float = 1.0
    probe_timeout: float = 0.5
    indirect_checks: int = 3
    retransmit_mult: int = 4
    suspicion_mult: int = 4
    suspicion_max_timeout_mult: int = 6
    awareness_max_multiplier: int = 8
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    gossip_to_the_dead_time: float = 30.0
    push_pull_interval: float = 30.0
    reconnect_interval: float = 30.0
    tombstone_timeout: float = 24 * 3600.0
    join_retry_interval: float = 1.0
    join_retry_max: float = 30.0
    # An intermediary sends its nack after this fraction of its probe timeout, so that the
    # nack reaches the requester before the requester's probe deadline.
    nack_fraction: float = 0.8
    # memberlist packs piggyback into 1,400-byte UDP packets; our messages ride QUIC streams,
    # so a larger budget lets bursts of meta updates spread ~10x faster (see ADR 0003). Use
    # about 1,200 if the shell sends membership messages as QUIC datagrams.
    max_packet_bytes: int = 8192
    sync_page_bytes: int = 60_000
    max_members: int = 10_000
    max_relays: int = 256

    def __post_init__(self) -> None:
        for name in (
            "probe_interval",
            "probe_timeout",
            "gossip_interval",
            "push_pull_interval",
            "reconnect_interval",
            "join_retry_interval",
            "join_retry_max",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds")
        if self.probe_timeout > self.probe_interval:
            raise ValueError("probe_timeout must not exceed probe_interval")
        if not 0 < self.nack_fraction <= 1:
            raise ValueError("nack_fraction must be in (0, 1]")
        if self.suspicion_mult < 1 or self.suspicion_max_timeout_mult < 1:
            raise ValueError("suspicion multipliers must be at least 1")
        if self.awareness_max_multiplier < 1 or self.retransmit_mult < 1:
            raise ValueError("awareness_max_multiplier and retransmit_mult must be at least 1")
        if self.indirect_checks < 0 or self.gossip_nodes < 0:
            raise ValueError("indirect_checks and gossip_nodes must not be negative")
        if not 0 < self.sync_page_bytes <= MAX_MESSAGE_SIZE - _MESSAGE_OVERHEAD:
            raise ValueError("sync_page_bytes must fit in a message")
        if not _MESSAGE_OVERHEAD < self.max_packet_bytes <= MAX_MESSAGE_SIZE:
            raise ValueError("max_packet_bytes is out of range")

    @classmethod
    def lan(cls) -> SwimConfig:
        """memberlist's ``DefaultLANConfig`` (the default)."""
        return cls()

    @classmethod
    def wan(cls) -> SwimConfig:
        """memberlist's ``DefaultWANConfig``: slower probes, longer suspicion."""
        return cls(
            probe_interval=5.0,
            probe_timeout=3.0,
            suspicion_mult=6,
            gossip_interval=0.5,
            gossip_nodes=4,
            gossip_to_the_dead_time=60.0,
            push_pull_interval=60.0,
        )

    @classmethod
    def local(cls) -> SwimConfig:
        """memberlist's ``DefaultLocalConfig``: one host or a fast LAN."""
        return cls(
            probe_interval=1.0,
            probe_timeout=0.2,
            indirect_checks=1,
            retransmit_mult=2,
            suspicion_mult=3,
            gossip_interval=0.1,
            gossip_to_the_dead_time=15.0,
            push_pull_interval=15.0,
        )

    def suspicion_timeouts(self, members: int) -> tuple[float, float]:
        """``(min, max)`` suspicion timeouts for a group of ``members`` live members."""
        scale = max(1.0, math.log10(max(1, members)))
        low = self.suspicion_mult * scale * self.probe_interval
        return low, self.suspicion_max_timeout_mult * low

    def retransmit_limit(self, members: int) -> int:
        """How many times an update is sent on by each member in a group of ``members``."""
        return self.retransmit_mult * max(1, math.ceil(math.log10(members + 1)))

    def push_pull_period(self, members: int) -> float:
        """memberlist's ``pushPullScale``: the interval grows with ``log2(N / 32)``."""
        if members <= 32:
            return self.push_pull_interval
        return self.push_pull_interval * (math.ceil(math.log2(members) - math.log2(32)) + 1)


@dataclass(frozen=True, slots=True)
class Member:
    """One member as this node sees it; ``since`` is when its ``state`` last changed."""

    name: str
    state: MemberState
    incarnation: int
    meta: MemberMeta
    since: float


class EventKind(StrEnum):
    """What happened to a member."""

    JOINED = "joined"  # first seen alive, or alive again after dead/left
    UPDATED = "updated"  # its meta changed
    SUSPECT = "suspect"
    ALIVE = "alive"  # refuted a suspicion
    DEAD = "dead"
    LEFT = "left"
    REAPED = "reaped"  # its tombstone was forgotten


@dataclass(frozen=True, slots=True)
class MemberEvent:
    """A change of one member, with the member as it is after the change."""

    kind: EventKind
    member: Member


@dataclass(frozen=True, slots=True)
class Outbound:
    """A message to send to the member named ``to``."""

    to: str
    message: SwimMessage


class RttSample(NamedTuple):
    """A round trip measured on a direct probe, and the peer's coordinate from its ack."""

    peer: str
    rtt: float
    coordinate: Coordinate


# --- internals --------------------------------------------------------------------------


class _Awareness:
    """Lifeguard's local health multiplier: a score in ``[0, max - 1]``."""

    __slots__ = ("_max", "score")

    def __init__(self, max_multiplier: int) -> None:
        self._max = max_multiplier
        self.score = 0

    def apply(self, delta: int) -> None:
        self.score = min(self._max - 1, max(0, self.score + delta))

    def scale(self, seconds: float) -> float:
        return seconds * (self.score + 1)


@dataclass(slots=True)
class _Suspicion:
    """Lifeguard's dynamic suspicion timer for one member."""

    start: float
    k: int
    low: float
    high: float
    confirmations: dict[str, None]
    n: int = 0
    deadline: float = 0.0

    def __post_init__(self) -> None:
        self.deadline = self.start + (self.high if self.k >= 1 else self.low)

    def confirm(self, by: str) -> bool:
        """Count an independent confirmation; True if it was new."""
        if self.n >= self.k or by in self.confirmations:
            return False
        self.confirmations[by] = None
        self.n += 1
        fraction = math.log(self.n + 1) / math.log(self.k + 1)
        timeout = max(self.low, self.high - fraction * (self.high - self.low))
        self.deadline = self.start + timeout
        return True


@dataclass(slots=True)
class _Probe:
    target: str
    seq: int
    sent_at: float
    timeout_at: float
    deadline: float
    indirect_sent: bool = False
    intermediaries: dict[str, bool] = field(default_factory=dict)  # name -> nacked
    nacks: int = 0


@dataclass(slots=True)
class _Relay:
    requester: str
    seq: int
    target: str


@dataclass(slots=True)
class _Broadcast:
    update: Update
    size: int
    transmits: int
    order: int


class _BroadcastQueue:
    """Pending updates, one per member name, sent fewest-transmits first, newest first."""

    def __init__(self) -> None:
        self._by_name: dict[str, _Broadcast] = {}
        self._buckets: list[dict[str, _Broadcast]] = [{}]
        self._order = 0

    def __len__(self) -> int:
        return len(self._by_name)

    def push(self, update: Update) -> None:
        old = self._by_name.pop(update.name, None)
        if old is not None:
            del self._buckets[old.transmits][update.name]
        self._order += 1
        entry = _Broadcast(update, encoded_size(update), 0, self._order)
        self._by_name[update.name] = entry
        self._buckets[0][update.name] = entry

    def take(self, budget: int, limit: int, force_one: bool = False) -> list[Update]:
        """Updates fitting in ``budget`` bytes; each taken one counts as transmitted once."""
        chosen: list[_Broadcast] = []
        remaining = budget
        misfits = 0
        for bucket in self._buckets:
            for entry in reversed(bucket.values()):
                if entry.size <= remaining or (force_one and not chosen):
                    chosen.append(entry)
                    remaining -= entry.size
                    if remaining < _MIN_UPDATE_SIZE:
                        break
                else:
                    misfits += 1
                    if misfits > _MAX_MISFITS:
                        break
            if remaining < _MIN_UPDATE_SIZE or misfits > _MAX_MISFITS:
                break
        for entry in chosen:
            name = entry.update.name
            del self._buckets[entry.transmits][name]
            entry.transmits += 1
            if entry.transmits >= limit:
                del self._by_name[name]
                continue
            while len(self._buckets) <= entry.transmits:
                self._buckets.append({})
            self._buckets[entry.transmits][name] = entry
        return [entry.update for entry in chosen]


class _NameList:
    """A list of names with O(1) add, remove and membership (for random sampling)."""

    __slots__ = ("_index", "items")

    def __init__(self) -> None:
        self.items: list[str] = []
        self._index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def add(self, name: str) -> None:
        if name not in self._index:
            self._index[name] = len(self.items)
            self.items.append(name)

    def discard(self, name: str) -> None:
        i = self._index.pop(name, None)
        if i is None:
            return
        last = self.items.pop()
        if i < len(self.items):
            self.items[i] = last
            self._index[last] = i


# --- the state machine --------------------------------------------------------------------


class Membership:
    """One member's view of the group, and the SWIM + Lifeguard protocol that maintains it.

    After every call, the caller sends :meth:`drain_outgoing` and handles
    :meth:`drain_events`; it calls :meth:`tick` no later than :meth:`next_deadline`.
    ``self_name`` and ``meta`` must be valid on the wire (else
    :class:`pollen.mesh.wire.WireError`, a ``ValueError``).
    """

    def __init__(
        self,
        self_name: str,
        meta: MemberMeta,
        config: SwimConfig,
        rng: random.Random,
        now: float,
    ) -> None:
        check_name(self_name)
        check_meta(meta)
        self._name = self_name
        self._config = config
        self._rng = rng
        self._now = now
        self._members: dict[str, Member] = {
            self_name: Member(self_name, MemberState.ALIVE, 0, meta, now)
        }
        self._live = _NameList()  # alive or suspect, self excluded
        self._dead: dict[str, None] = {}  # dead (not left), oldest death first
        self._awareness = _Awareness(config.awareness_max_multiplier)
        self._suspicions: dict[str, _Suspicion] = {}
        self._timers: list[tuple[float, int, int, str | int]] = []
        self._timer_order = 0
        self._relays: dict[int, _Relay] = {}
        self._broadcasts = _BroadcastQueue()
        self._seq = rng.randrange(MAX_SEQ)
        self._probe: _Probe | None = None
        self._probe_order: list[str] = []
        self._probe_pos = 0
        self._coordinate: Coordinate | None = meta.coordinate
        self._leaving = False
        self._joined = True
        self._join_targets: list[str] = []
        self._join_at: float | None = None
        self._join_backoff = config.join_retry_interval
        # Stagger the periodic work so that members started together do not beat in phase.
        self._next_probe_at = now + rng.uniform(0, config.probe_interval)
        self._next_gossip_at: float | None = None
        self._next_push_pull_at = now + rng.uniform(0, config.push_pull_interval)
        self._next_reconnect_at = now + rng.uniform(0, config.reconnect_interval)
        self._outgoing: list[Outbound] = []
        self._events: list[MemberEvent] = []
        self._rtt_samples: list[RttSample] = []
        self._indirect_only: list[str] = []

    # --- read side ------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """This member's name."""
        return self._name

    @property
    def config(self) -> SwimConfig:
        """The protocol configuration."""
        return self._config

    @property
    def incarnation(self) -> int:
        """This member's current incarnation number."""
        return self._members[self._name].incarnation

    @property
    def local_health(self) -> int:
        """Lifeguard's local health score (0 is healthy); timeouts scale by ``score + 1``."""
        return self._awareness.score

    @property
    def joined(self) -> bool:
        """False while a :meth:`join` has not been answered by any seed yet."""
        return self._joined

    @property
    def leaving(self) -> bool:
        """True once :meth:`leave` has been called."""
        return self._leaving

    @property
    def pending_broadcasts(self) -> int:
        """Updates still waiting to be gossiped (after :meth:`leave`, wait for 0)."""
        return len(self._broadcasts)

    def members(self) -> Mapping[str, Member]:
        """A read-only live view of every known member, this one and tombstones included."""
        return MappingProxyType(self._members)

    def live_count(self) -> int:
        """Members alive or suspect, this one included while it has not left."""
        return len(self._live) + (0 if self._leaving else 1)

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`tick` has something to do."""
        candidates: list[float] = []
        if not self._leaving:
            candidates.append(self._next_probe_at)
            candidates.append(self._next_push_pull_at)
            candidates.append(self._next_reconnect_at)
        probe = self._probe
        if probe is not None:
            candidates.append(probe.deadline if probe.indirect_sent else probe.timeout_at)
        if self._next_gossip_at is not None:
            candidates.append(self._next_gossip_at)
        if self._join_at is not None:
            candidates.append(self._join_at)
        timer = self._next_timer()
        if timer is not None:
            candidates.append(timer)
        return min(candidates) if candidates else None

    def drain_outgoing(self) -> list[Outbound]:
        """Messages to send, oldest first; the list is handed over and cleared."""
        out, self._outgoing = self._outgoing, []
        return out

    def drain_events(self) -> list[MemberEvent]:
        """Member changes since the last call, in order.

        Events about this member itself are ``UPDATED`` (after :meth:`update_meta`) and
        ``LEFT`` (after :meth:`leave`); refutations change only its incarnation, silently.
        """
        events, self._events = self._events, []
        return events

    def drain_rtt_samples(self) -> list[RttSample]:
        """Round trips measured on direct probes since the last call (feed them to Vivaldi)."""
        samples, self._rtt_samples = self._rtt_samples, []
        return samples

    def drain_indirect_only(self) -> list[str]:
        """Members whose probe was answered only through an intermediary, since the last call.

        A member alive for others but not answering us directly: the direct path is broken
        (the mesh routes its streams through a relay).
        """
        names, self._indirect_only = self._indirect_only, []
        return names

    # --- inputs ---------------------------------------------------------------------------

    def set_coordinate(self, coordinate: Coordinate | None) -> None:
        """The coordinate to put in our acks (cheap; does not bump the incarnation).

        Publish it in the meta too, with :meth:`update_meta`, now and then (say when it moved
        by more than a few percent): every meta update is gossiped to everyone.
        """
        self._coordinate = coordinate

    def join(self, seeds: Sequence[str], now: float) -> None:
        """Contact ``seeds`` (member names) with a push-pull, retrying until one answers."""
        self._advance(now)
        targets = list(dict.fromkeys(s for s in seeds if s != self._name))
        self._join_targets = targets
        if not targets:
            self._joined = True
            self._join_at = None
            return
        self._joined = False
        self._join_backoff = self._config.join_retry_interval
        self._join_attempt()

    def receive(self, sender: str, message: SwimMessage, now: float) -> None:
        """Handle one message from ``sender`` (a name the transport authenticated)."""
        self._advance(now)
        if sender == self._name:
            return
        if isinstance(message, Ping):
            self._apply_all(message.piggyback)
            self._send(sender, lambda pb: Ack(message.seq, self._coordinate, pb), ack=True)
        elif isinstance(message, Ack):
            self._apply_all(message.piggyback)
            self._on_ack(sender, message)
        elif isinstance(message, PingReq):
            self._apply_all(message.piggyback)
            self._on_ping_req(sender, message)
        elif isinstance(message, Nack):
            self._apply_all(message.piggyback)
            self._on_nack(sender, message)
        elif isinstance(message, Gossip):
            self._apply_all(message.updates)
        elif isinstance(message, Sync):
            self._merge(sender, message.entries)
            self._mark_joined()
            if message.reply:
                self._send_sync(sender, reply=False)
        # A confirmation may have pulled a suspicion deadline into the past.
        self._run_timers()

    def tick(self, now: float) -> None:
        """Run every timer due at ``now``."""
        self._advance(now)
        self._run_timers()
        self._run_probe()
        if not self._leaving and self._now >= self._next_probe_at:
            self._start_probe()
        if self._next_gossip_at is not None and self._now >= self._next_gossip_at:
            self._gossip()
        if not self._leaving and self._now >= self._next_push_pull_at:
            self._push_pull()
        if not self._leaving and self._now >= self._next_reconnect_at:
            self._reconnect()
        if self._join_at is not None and self._now >= self._join_at:
            self._join_attempt()
        # Confirmations during the steps above may have made a suspicion due already.
        self._run_timers()

    def update_meta(self, meta: MemberMeta, now: float) -> None:
        """Publish new facts about ourselves: bumps our incarnation and gossips it.

        Raises :class:`pollen.mesh.wire.WireError` (a ``ValueError``) if ``meta`` is invalid.
        """
        check_meta(meta)
        self._advance(now)
        if self._leaving:
            return
        me = self._members[self._name]
        if meta == me.meta:
            return
        incarnation = min(me.incarnation + 1, MAX_INCARNATION)
        me = replace(me, incarnation=incarnation, meta=meta)
        self._members[self._name] = me
        self._broadcast(Alive(self._name, incarnation, meta))
        self._emit(EventKind.UPDATED, me)

    def leave(self, now: float) -> None:
        """Leave gracefully: tell a few members at once, then keep gossiping it.

        Probing stops. Keep feeding the machine until :attr:`pending_broadcasts` is 0 (or a
        grace period passes) before closing connections.
        """
        self._advance(now)
        if self._leaving:
            return
        self._leaving = True
        self._probe = None
        self._join_at = None
        me = self._members[self._name]
        me = Member(self._name, MemberState.LEFT, me.incarnation, me.meta, self._now)
        self._members[self._name] = me
        self._broadcast(Dead(self._name, me.incarnation, self._name))
        self._emit(EventKind.LEFT, me)
        self._gossip()

    def evict(self, name: str, now: float) -> None:
        """Declare ``name`` dead on local authority (say its Node was deleted and revoked).

        The declaration is gossiped like any other. If the member is in fact alive and can
        still reach someone it refutes it, so keeping an evicted node out is the transport's
        job (it refuses the revoked certificate); this only makes the view catch up at once.
        """
        self._advance(now)
        member = self._members.get(name)
        if member is None or name == self._name:
            return
        self._on_dead(Dead(name, member.incarnation, self._name))

    # --- time and timers ------------------------------------------------------------------

    def _advance(self, now: float) -> None:
        if now > self._now:
            self._now = now

    def _push_timer(self, when: float, kind: int, key: str | int) -> None:
        self._timer_order += 1
        heapq.heappush(self._timers, (when, self._timer_order, kind, key))

    def _timer_live(self, when: float, kind: int, key: str | int) -> bool:
        if kind == _TIMER_SUSPICION:
            suspicion = self._suspicions.get(key) if isinstance(key, str) else None
            return suspicion is not None and suspicion.deadline == when
        return key in self._relays

    def _next_timer(self) -> float | None:
        timers = self._timers
        while timers:
            when, _, kind, key = timers[0]
            if self._timer_live(when, kind, key):
                return when
            heapq.heappop(timers)
        return None

    def _run_timers(self) -> None:
        while True:
            when = self._next_timer()
            if when is None or when > self._now:
                return
            _, _, kind, key = heapq.heappop(self._timers)
            if kind == _TIMER_SUSPICION and isinstance(key, str):
                del self._suspicions[key]
                member = self._members.get(key)
                if member is not None and member.state is MemberState.SUSPECT:
                    self._on_dead(Dead(key, member.incarnation, self._name))
            elif isinstance(key, int):
                relay = self._relays.pop(key)
                self._send(relay.requester, _nack_builder(relay.seq))

    # --- probing --------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & MAX_SEQ
        return self._seq

    def _probe_target(self) -> str | None:
        for _ in range(2):
            while self._probe_pos < len(self._probe_order):
                name = self._probe_order[self._probe_pos]
                self._probe_pos += 1
                if name in self._live:
                    return name
            self._new_round()
            if not self._probe_order:
                return None
        return None

    def _new_round(self) -> None:
        """Start a new probe round in a fresh random order; reap old tombstones."""
        self._reap()
        order = list(self._live.items)
        self._rng.shuffle(order)
        self._probe_order = order
        self._probe_pos = 0

    def _start_probe(self) -> None:
        cfg = self._config
        if self._probe is not None:  # not resolved yet (cannot happen with sane timers)
            self._next_probe_at = self._probe.deadline
            return
        target = self._probe_target()
        if target is None:
            self._next_probe_at = self._now + cfg.probe_interval
            return
        seq = self._next_seq()
        interval = self._awareness.scale(cfg.probe_interval)
        timeout = self._awareness.scale(cfg.probe_timeout)
        self._probe = _Probe(target, seq, self._now, self._now + timeout, self._now + interval)
        self._next_probe_at = self._now + interval
        member = self._members[target]
        first: tuple[Update, ...] = ()
        if member.state is MemberState.SUSPECT:
            # Lifeguard's buddy system: tell a suspect member first, so it can refute.
            first = (Suspect(target, member.incarnation, self._name),)
        self._send(target, lambda pb: Ping(seq, first + pb), reserve=len(first) * 600)

    def _run_probe(self) -> None:
        probe = self._probe
        if probe is None:
            return
        cfg = self._config
        if not probe.indirect_sent and self._now >= probe.timeout_at:
            probe.indirect_sent = True
            helpers = self._sample(
                cfg.indirect_checks,
                lambda n: n != probe.target and self._members[n].state is MemberState.ALIVE,
            )
            for helper in helpers:
                probe.intermediaries[helper] = False
                self._send(helper, lambda pb: PingReq(probe.seq, probe.target, pb))
        if self._now >= probe.deadline:
            self._probe = None
            expected = len(probe.intermediaries)
            self._awareness.apply(expected - probe.nacks if expected else 1)
            member = self._members.get(probe.target)
            if member is not None and member.state in (MemberState.ALIVE, MemberState.SUSPECT):
                self._on_suspect(Suspect(probe.target, member.incarnation, self._name))

    def _on_ack(self, sender: str, ack: Ack) -> None:
        probe = self._probe
        if probe is not None and ack.seq == probe.seq:
            if sender == probe.target:
                if ack.coordinate is not None:
                    rtt = self._now - probe.sent_at
                    self._rtt_samples.append(RttSample(sender, rtt, ack.coordinate))
            elif sender not in probe.intermediaries:
                return
            elif len(self._indirect_only) < 256:  # bounded if nobody drains it
                self._indirect_only.append(probe.target)
            self._probe = None
            self._awareness.apply(-1)
            return
        relay = self._relays.get(ack.seq)
        if relay is not None and sender == relay.target:
            del self._relays[ack.seq]
            seq = relay.seq
            self._send(relay.requester, lambda pb: Ack(seq, None, pb))

    def _on_nack(self, sender: str, nack: Nack) -> None:
        probe = self._probe
        if probe is None or nack.seq != probe.seq:
            return
        if probe.intermediaries.get(sender) is False:
            probe.intermediaries[sender] = True
            probe.nacks += 1

    def _on_ping_req(self, sender: str, req: PingReq) -> None:
        if req.target in (self._name, sender) or len(self._relays) >= self._config.max_relays:
            return
        seq = self._next_seq()
        self._relays[seq] = _Relay(sender, req.seq, req.target)
        cfg = self._config
        self._push_timer(self._now + cfg.nack_fraction * cfg.probe_timeout, _TIMER_RELAY, seq)
        self._send(req.target, lambda pb: Ping(seq, pb))

    # --- state changes --------------------------------------------------------------------

    def _apply_all(self, updates: Iterable[Update]) -> None:
        for update in updates:
            if isinstance(update, Alive):
                self._on_alive(update)
            elif isinstance(update, Suspect):
                self._on_suspect(update)
            else:
                self._on_dead(update)

    def _on_alive(self, alive: Alive) -> None:
        name = alive.name
        old = self._members.get(name)
        if old is not None and alive.incarnation < old.incarnation:
            return  # the common case of epidemic dissemination: old news
        if name == self._name:
            me = self._members[name]
            if self._leaving or alive.incarnation < me.incarnation:
                return
            if alive.incarnation == me.incarnation and alive.meta == me.meta:
                return
            self._refute(alive.incarnation)
            return
        if old is None:
            if not self._make_room():
                return
            member = Member(name, MemberState.ALIVE, alive.incarnation, alive.meta, self._now)
            self._members[name] = member
            self._add_live(name)
            self._broadcast(alive)
            self._emit(EventKind.JOINED, member)
            return
        if alive.incarnation <= old.incarnation:
            return
        since = old.since if old.state is MemberState.ALIVE else self._now
        member = Member(name, MemberState.ALIVE, alive.incarnation, alive.meta, since)
        self._members[name] = member
        self._suspicions.pop(name, None)
        self._broadcast(alive)
        if old.state in (MemberState.DEAD, MemberState.LEFT):
            self._dead.pop(name, None)
            self._add_live(name)
            self._emit(EventKind.JOINED, member)
            return
        if old.state is MemberState.SUSPECT:
            self._emit(EventKind.ALIVE, member)
        if old.meta != alive.meta:
            self._emit(EventKind.UPDATED, member)

    def _on_suspect(self, suspect: Suspect) -> None:
        name = suspect.name
        member = self._members.get(name)
        if member is None or suspect.incarnation < member.incarnation:
            return
        if name == self._name:
            if not self._leaving:
                self._refute(suspect.incarnation)
            return
        suspicion = self._suspicions.get(name)
        if suspicion is not None:
            if suspicion.confirm(suspect.by):
                self._push_timer(suspicion.deadline, _TIMER_SUSPICION, name)
                self._broadcast(suspect)
            return
        if member.state is not MemberState.ALIVE:
            return
        member = Member(name, MemberState.SUSPECT, suspect.incarnation, member.meta, self._now)
        self._members[name] = member
        live = len(self._live) + 1
        k = self._config.suspicion_mult - 2
        if live - 2 < k:
            k = 0
        low, high = self._config.suspicion_timeouts(live)
        suspicion = _Suspicion(self._now, k, low, high, {suspect.by: None})
        self._suspicions[name] = suspicion
        self._push_timer(suspicion.deadline, _TIMER_SUSPICION, name)
        self._broadcast(suspect)
        self._emit(EventKind.SUSPECT, member)

    def _on_dead(self, dead: Dead) -> None:
        name = dead.name
        member = self._members.get(name)
        if member is None or dead.incarnation < member.incarnation:
            return
        if member.state in (MemberState.DEAD, MemberState.LEFT):
            return
        if name == self._name:
            if not self._leaving:
                self._refute(dead.incarnation)
            return
        self._suspicions.pop(name, None)
        left = dead.by == name
        state = MemberState.LEFT if left else MemberState.DEAD
        member = Member(name, state, dead.incarnation, member.meta, self._now)
        self._members[name] = member
        self._live.discard(name)
        if not left:
            self._dead[name] = None
        self._broadcast(dead)
        self._emit(EventKind.LEFT if left else EventKind.DEAD, member)

    def _refute(self, incarnation: int) -> None:
        """Someone thinks we are suspect, dead or older than we are: overrule it."""
        me = self._members[self._name]
        new = min(max(me.incarnation, incarnation) + 1, MAX_INCARNATION)
        self._members[self._name] = replace(me, incarnation=new)
        self._broadcast(Alive(self._name, new, me.meta))
        self._awareness.apply(1)

    def _merge(self, sender: str, entries: Iterable[SyncEntry]) -> None:
        """Merge a push-pull page the way memberlist does: a remote 'dead' is a suspicion."""
        for entry in entries:
            name, incarnation = entry.name, entry.incarnation
            if entry.state is MemberState.ALIVE:
                self._on_alive(Alive(name, incarnation, entry.meta))
            elif entry.state is MemberState.LEFT:
                self._on_dead(Dead(name, incarnation, name))
            else:
                if name not in self._members and entry.state is MemberState.SUSPECT:
                    self._on_alive(Alive(name, incarnation, entry.meta))
                self._on_suspect(Suspect(name, incarnation, self._name))

    def _add_live(self, name: str) -> None:
        self._live.add(name)
        # Probe it within the current round, at a random place of what is left of it.
        pos = self._rng.randint(self._probe_pos, len(self._probe_order))
        self._probe_order.insert(pos, name)

    def _make_room(self) -> bool:
        if len(self._members) < self._config.max_members:
            return True
        oldest: Member | None = None
        for member in self._members.values():
            if member.state in (MemberState.DEAD, MemberState.LEFT) and (
                oldest is None or member.since < oldest.since
            ):
                oldest = member
        if oldest is None:
            return False
        self._forget(oldest)
        return True

    def _reap(self) -> None:
        limit = self._now - self._config.tombstone_timeout
        stale = [
            m
            for m in self._members.values()
            if m.state in (MemberState.DEAD, MemberState.LEFT) and m.since < limit
        ]
        for member in stale:
            self._forget(member)

    def _forget(self, member: Member) -> None:
        del self._members[member.name]
        self._dead.pop(member.name, None)
        self._emit(EventKind.REAPED, member)

    def _emit(self, kind: EventKind, member: Member) -> None:
        self._events.append(MemberEvent(kind, member))

    # --- dissemination --------------------------------------------------------------------

    def _broadcast(self, update: Update) -> None:
        self._broadcasts.push(update)
        if self._next_gossip_at is None:
            self._next_gossip_at = self._now + self._config.gossip_interval

    def _retransmit_limit(self) -> int:
        return self._config.retransmit_limit(len(self._live) + 1)

    def _send(
        self,
        to: str,
        build: _Builder,
        *,
        ack: bool = False,
        reserve: int = 0,
    ) -> None:
        budget = self._config.max_packet_bytes - _MESSAGE_OVERHEAD - reserve
        if ack and self._coordinate is not None:
            budget -= 30 + 25 * (len(self._coordinate.vec) + 3)
        piggyback: tuple[Update, ...] = ()
        if budget >= _MIN_UPDATE_SIZE and self._broadcasts:
            piggyback = tuple(self._broadcasts.take(budget, self._retransmit_limit()))
        self._outgoing.append(Outbound(to, build(piggyback)))

    def _gossip(self) -> None:
        if not self._broadcasts:
            self._next_gossip_at = None
            return
        self._next_gossip_at = self._now + self._config.gossip_interval
        horizon = self._now - self._config.gossip_to_the_dead_time
        recent_dead: list[str] = []
        for name in reversed(self._dead):
            if self._members[name].since < horizon:
                break
            recent_dead.append(name)
        budget = self._config.max_packet_bytes - _MESSAGE_OVERHEAD
        for target in self._sample(self._config.gossip_nodes, None, extra=recent_dead):
            updates = self._broadcasts.take(budget, self._retransmit_limit(), force_one=True)
            if not updates:
                break
            self._outgoing.append(Outbound(target, Gossip(tuple(updates))))

    def _sample(
        self,
        k: int,
        accept: _Filter | None,
        extra: Sequence[str] = (),
    ) -> list[str]:
        """Up to ``k`` random distinct live members (plus ``extra``) that ``accept`` allows."""
        pool: Sequence[str] = self._live.items
        if extra:
            pool = [*pool, *extra]
        if k <= 0 or not pool:
            return []
        if accept is None:
            return self._rng.sample(pool, min(k, len(pool)))
        # Draw a few more than needed and filter; fall back to a full scan if unlucky.
        picked = [n for n in self._rng.sample(pool, min(k + 2, len(pool))) if accept(n)]
        if len(picked) < k and len(pool) > k + 2:
            rest = [n for n in pool if accept(n) and n not in picked]
            picked += self._rng.sample(rest, min(k - len(picked), len(rest)))
        return picked[:k]

    # --- push-pull, reconnect, join -------------------------------------------------------

    def _sync_pages(self, reply: bool) -> list[Sync]:
        pages: list[Sync] = []
        page: list[SyncEntry] = []
        size = 0
        limit = self._config.sync_page_bytes
        for m in self._members.values():
            entry = SyncEntry(m.name, m.incarnation, m.state, m.meta)
            entry_size = encoded_entry_size(entry)
            if page and size + entry_size > limit:
                pages.append(Sync(tuple(page), reply and not pages))
                page, size = [], 0
            page.append(entry)
            size += entry_size
        pages.append(Sync(tuple(page), reply and not pages))
        return pages

    def _send_sync(self, to: str, *, reply: bool) -> None:
        for page in self._sync_pages(reply):
            self._outgoing.append(Outbound(to, page))

    def _push_pull(self) -> None:
        live = len(self._live) + 1
        self._next_push_pull_at = self._now + self._config.push_pull_period(live)
        peers = self._sample(1, lambda n: self._members[n].state is MemberState.ALIVE)
        if peers:
            self._send_sync(peers[0], reply=True)

    def _reconnect(self) -> None:
        """Serf's reconnect: now and then, push-pull with a random dead member."""
        self._next_reconnect_at = self._now + self._config.reconnect_interval
        if not self._dead:
            return
        probability = len(self._dead) / max(1, len(self._live))
        if self._rng.random() < probability:
            self._send_sync(self._rng.choice(list(self._dead)), reply=True)

    def _join_attempt(self) -> None:
        if self._joined:
            self._join_at = None
            return
        for seed in self._join_targets:
            self._send_sync(seed, reply=True)
        self._join_at = self._now + self._join_backoff
        self._join_backoff = min(self._join_backoff * 2, self._config.join_retry_max)

    def _mark_joined(self) -> None:
        if not self._joined:
            self._joined = True
            self._join_at = None


def _nack_builder(seq: int) -> _Builder:
    return lambda piggyback: Nack(seq, piggyback)


__all__ = [
    "Ack",
    "Alive",
    "Dead",
    "EventKind",
    "Gossip",
    "Member",
    "MemberEvent",
    "MemberMeta",
    "MemberState",
    "Membership",
    "Nack",
    "Outbound",
    "Ping",
    "PingReq",
    "RttSample",
    "Suspect",
    "SwimConfig",
    "SwimMessage",
    "Sync",
    "SyncEntry",
    "Update",
]
