"""Gossip of the state document: Automerge's sync protocol with each peer, written sans-IO.

:class:`DocumentGossip` keeps one Automerge ``SyncState`` per peer and decides when to talk to
whom. It is fed with payloads and a clock and hands back payloads to send; it does no I/O and
reads no clock of its own, so the same code runs in a node (over QUIC) and in the simulator
(hundreds of instances on virtual time).

When it sends:

* **push**: after a local change, and after a received message moved the document's heads
  (which is how a change travels on across the swarm), each persistent peer gets a sync
  message ``push_delay`` later (the delay folds a burst of writes into one round). Every
  other link (a peer that chose us) gets a digest instead, a *lazy push*: it pulls if it
  still lacks something, and the full change is not sent down a link that already had it
  from elsewhere. So the push fanout is the number of persistent peers.
* **anti-entropy**: every ``anti_entropy_interval`` one persistent peer (each in turn, in a
  random order) gets a digest of our heads (9 bytes). A peer whose heads differ answers with
  a sync message, or a pull request. In a quiet swarm all digests match and nothing else is
  sent.

Payloads are one type byte and a body::

    0x01 SYNC    an Automerge sync message
    0x02 RESET   an Automerge sync message from a fresh SyncState: "I started over with you,
                 start over with me"
    0x03 DIGEST  8 bytes: BLAKE2b of our sorted heads
    0x04 PULL    nothing more: "your digest differs from my heads and I have nothing for
                 you; sync with me"

Why RESET exists: a ``SyncState`` remembers which changes it already sent and never sends them
again. If a message is lost (or a peer restarted, or we reset our side only), the two states
disagree and the protocol either goes silent while the heads differ or ping-pongs the same
request forever (both measured with automerge 1.0.0rc1). So whenever one side starts a fresh
state it says so, and the other side starts afresh too. Two things detect trouble: a digest
that does not match while nothing is in flight, and a sync message that would repeat, byte
for byte, the last one sent to that peer, which means the exchange is going round in circles.
Resets a node starts towards one peer are rate-limited with exponential backoff, so no
exchange, however confused or hostile the peer, can loop without bound.

Links: the persistent peers (chosen by :mod:`pollen.mesh.topology`) plus every peer that
talked to us within ``inbound_ttl``. Topology choices are one-sided; changes crossing links
in both directions (pushed one way, announced by digest the other) is what makes the union
of everyone's choice the graph that changes travel on.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, NoReturn, Protocol

from automerge import core as am

from pollen.state.document import StateDocument

__all__ = [
    "DIGEST",
    "PULL",
    "RESET",
    "SYNC",
    "DocumentGossip",
    "GossipConfig",
    "GossipStats",
    "LocalDocument",
    "SyncError",
    "SyncedDocument",
    "heads_digest",
]

#: Payload type bytes.
SYNC: Final = 0x01
RESET: Final = 0x02
DIGEST: Final = 0x03
PULL: Final = 0x04

DIGEST_SIZE: Final = 8

#: Exceptions that must never be swallowed while turning decoder failures into SyncError.
_FATAL: Final = (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError)


class SyncError(Exception):
    """A payload from a peer is malformed, oversized or cannot be applied.

    The peer's sync state has been reset when this is raised; the caller may close the peer's
    connection, and the node goes on serving everyone else.
    """


class SyncedDocument(Protocol):
    """The document a node syncs, changed only inside :meth:`update_document`.

    :class:`pollen.state.store.ResourceStore` is one: merged changes then go through its
    journal and change feed. :class:`LocalDocument` wraps a bare :class:`StateDocument`.
    """

    def update_document(self) -> AbstractContextManager[StateDocument]:
        """A context that yields the document and records whatever moved its heads."""
        ...


if TYPE_CHECKING:
    from pollen.state.store import ResourceStore

    def _a_store_is_a_synced_document(store: ResourceStore) -> SyncedDocument:
        return store  # checked by mypy: the node gossips its store directly


class LocalDocument:
    """A bare in-memory :class:`StateDocument` as a :class:`SyncedDocument`."""

    def __init__(self, document: StateDocument) -> None:
        """Wrap ``document``."""
        self.document = document

    @contextmanager
    def update_document(self) -> Iterator[StateDocument]:
        """Yield the document; there is nothing to record."""
        yield self.document


@dataclass(frozen=True)
class GossipConfig:
    """Timing and limits of document gossip. Times are in seconds."""

    #: Delay between a change (local, or merged from a peer) and the push to the links.
    push_delay: float = 0.01
    #: Mean interval between two digests this node sends, each to one persistent peer.
    anti_entropy_interval: float = 1.0
    #: Each interval is drawn uniformly within this fraction of the mean, so that nodes started
    #: together do not stay in step.
    anti_entropy_jitter: float = 0.2
    #: When a digest differs from our heads and our state has nothing to say, the two states
    #: are taken as out of step (and reset) only if no sync message went either way on that
    #: link this recently; before that, an exchange may simply not have finished, and we
    #: send a pull request instead.
    settle_time: float = 2.0
    #: Least time between two resets this node starts towards one peer; it doubles on each
    #: reset up to ``reset_backoff_max`` and drops back once the peer's digest matches ours.
    reset_backoff: float = 1.0
    reset_backoff_max: float = 30.0
    #: A peer that is not persistent stays a link this long after its last message. A peer
    #: that chose us sends a digest at least every two rounds of anti-entropy, so keep this
    #: well above ``2 * anti_entropy_interval * (persistent peers)``.
    inbound_ttl: float = 60.0
    #: Largest payload accepted. The first sync with a new node carries every change it lacks
    #: in one message, so this bounds the document a node can join with.
    max_message_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.push_delay < 0 or self.anti_entropy_interval <= 0:
            raise ValueError("push_delay must be >= 0 and anti_entropy_interval > 0")
        if not 0 <= self.anti_entropy_jitter < 1:
            raise ValueError("anti_entropy_jitter must be in [0, 1)")
        if self.max_message_bytes < 1 + DIGEST_SIZE:
            raise ValueError("max_message_bytes is too small for any payload")


@dataclass
class GossipStats:
    """Counters since the gossip was made, for metrics and benchmarks."""

    messages_sent: int = 0
    bytes_sent: int = 0
    messages_received: int = 0
    bytes_received: int = 0
    digests_sent: int = 0
    sync_sent: int = 0
    #: Resets this node started (stuck exchange or digest mismatch with nothing to say).
    resets: int = 0
    #: Payloads refused with :class:`SyncError`, and sync states thrown away as unusable.
    errors: int = 0


def heads_digest(heads: Iterable[bytes]) -> bytes:
    """The anti-entropy digest of a set of heads: order-independent, 8 bytes."""
    return hashlib.blake2b(b"".join(sorted(heads)), digest_size=DIGEST_SIZE).digest()


@dataclass
class _Peer:
    state: am.SyncState = field(default_factory=am.SyncState)
    #: False while the peer may still hold state from before our last fresh start: the next
    #: sync message to it goes out as RESET.
    announced: bool = False
    persistent: bool = False
    #: The last sync message sent, to spot an exchange that repeats itself.
    last_sent: bytes | None = None
    last_exchange: float = -math.inf
    last_heard: float = -math.inf
    next_reset_at: float = -math.inf
    backoff: float = 0.0
    dirty: bool = False
    #: The digest last sent to an inbound peer as a lazy push.
    notified: bytes | None = None

    def restart(self, *, announced: bool) -> None:
        self.state = am.SyncState()
        self.announced = announced
        self.last_sent = None


class DocumentGossip:
    """Sync of one document with a changing set of peers (see the module docstring).

    Peers are identified by name. Feed it with :meth:`receive`, :meth:`on_local_change`,
    :meth:`tick` (at :meth:`next_deadline` or later), :meth:`set_peers`, :meth:`peer_up` and
    :meth:`peer_down`; send what :meth:`drain_outgoing` returns. Not thread-safe: call it from
    one thread (the document itself may be written from others when it is a store).
    """

    def __init__(
        self,
        document: SyncedDocument | StateDocument,
        now: float,
        *,
        config: GossipConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """Gossip ``document``, starting at time ``now``.

        ``rng`` drives the choice of anti-entropy peers and intervals; pass a seeded one for
        reproducible runs.
        """
        self._doc: SyncedDocument = (
            LocalDocument(document) if isinstance(document, StateDocument) else document
        )
        self.config = config or GossipConfig()
        self._rng = rng or random.Random()
        self._peers: dict[str, _Peer] = {}
        self._persistent: list[str] = []
        self._outgoing: list[tuple[str, bytes]] = []
        self._flush_at: float | None = None
        self._rounds: list[str] = []
        self._next_anti_entropy = now + self._interval()
        self.stats = GossipStats()

    # --- inputs -----------------------------------------------------------------------------

    def set_peers(self, persistent: Iterable[str], now: float) -> None:
        """Make ``persistent`` the set of persistent peers; a new one is synced at once.

        A peer leaving the set keeps its sync state while it remains a link (it may still
        talk to us); :meth:`peer_down` drops it.
        """
        wanted = sorted(set(persistent))
        for name in self._persistent:
            if name not in wanted and name in self._peers:
                self._peers[name].persistent = False
        for name in wanted:
            peer = self._peers.get(name)
            if peer is None:
                peer = self._peers[name] = _Peer()
                peer.dirty = True
                self._schedule_flush(now)
            peer.persistent = True
        self._persistent = wanted

    def peer_up(self, peer: str, now: float) -> None:
        """A (new) connection to ``peer``: whatever sync state was kept for it is stale.

        The protocol requires starting afresh on reconnection; a persistent peer is synced at
        once.
        """
        self.peer_down(peer)
        state = self._peers.get(peer)
        if state is not None:
            state.dirty = True
            self._schedule_flush(now)

    def peer_down(self, peer: str) -> None:
        """The connection to ``peer`` closed: forget its sync state.

        A persistent peer stays in the set with a fresh state, for when it comes back; only
        :meth:`set_peers` stops the gossip with it.
        """
        state = self._peers.pop(peer, None)
        if state is not None and state.persistent:
            self._peers[peer] = _Peer(persistent=True)

    def on_local_change(self, now: float) -> None:
        """The document changed here: push to every link after ``push_delay``.

        Harmless for a change that came from a peer (the store's change feed reports both):
        links already in step have nothing to say.
        """
        for peer in self._peers.values():
            peer.dirty = True
        self._schedule_flush(now)

    def tick(self, now: float) -> None:
        """Do what is due at ``now``: a pending push, an anti-entropy digest."""
        if self._flush_at is not None and now >= self._flush_at:
            self._flush(now)
        if now >= self._next_anti_entropy:
            self._anti_entropy(now)
            self._next_anti_entropy = now + self._interval()
        self._expire_inbound(now)

    def receive(self, peer: str, payload: bytes, now: float) -> None:
        """Take in a payload from ``peer``; raises :class:`SyncError` (only) if it is bad."""
        size = len(payload)
        self.stats.messages_received += 1
        self.stats.bytes_received += size
        if size == 0 or size > self.config.max_message_bytes:
            self._refuse(peer, f"payload of {size} bytes from {peer}")
        kind = payload[0]
        if kind not in (SYNC, RESET, DIGEST, PULL):
            self._refuse(peer, f"unknown payload type {kind:#04x} from {peer}")
        if kind == DIGEST and size != 1 + DIGEST_SIZE:
            self._refuse(peer, f"digest of {size - 1} bytes from {peer}")
        if kind == PULL and size != 1:
            self._refuse(peer, f"pull request of {size} bytes from {peer}")
        state = self._peers.get(peer)
        if state is None:
            # A peer we keep nothing for: start afresh, and our reply tells it to do the same.
            state = self._peers[peer] = _Peer()
        state.last_heard = now
        if kind == DIGEST:
            self._on_digest(peer, state, payload[1:], now)
        elif kind == PULL:
            with self._doc.update_document() as doc:
                self._send_sync(peer, state, doc, now)
        else:
            self._on_sync(peer, state, kind, payload, now)

    # --- outputs ----------------------------------------------------------------------------

    def drain_outgoing(self) -> list[tuple[str, bytes]]:
        """The payloads to send, as (peer, payload), oldest first; empties the queue."""
        out, self._outgoing = self._outgoing, []
        return out

    def next_deadline(self) -> float:
        """The time :meth:`tick` next has something to do."""
        if self._flush_at is None:
            return self._next_anti_entropy
        return min(self._flush_at, self._next_anti_entropy)

    @property
    def persistent_peers(self) -> Sequence[str]:
        """The persistent peers, sorted."""
        return tuple(self._persistent)

    def links(self) -> list[str]:
        """Every peer a push or a lazy push goes to: persistent and recent inbound, sorted."""
        return sorted(self._peers)

    # --- internals --------------------------------------------------------------------------

    def _interval(self) -> float:
        jitter = self.config.anti_entropy_jitter
        return self.config.anti_entropy_interval * self._rng.uniform(1 - jitter, 1 + jitter)

    def _schedule_flush(self, now: float) -> None:
        at = now + self.config.push_delay
        if self._flush_at is None or at < self._flush_at:
            self._flush_at = at

    def _flush(self, now: float) -> None:
        self._flush_at = None
        dirty = [name for name, peer in self._peers.items() if peer.dirty]
        if not dirty:
            return
        with self._doc.update_document() as doc:
            digest: bytes | None = None
            for name in sorted(dirty):
                peer = self._peers[name]
                peer.dirty = False
                if peer.persistent:
                    self._send_sync(name, peer, doc, now)
                    continue
                # A peer that chose us gets a digest (lazy push): it pulls if it still lacks
                # something, and costs 9 bytes if it got the change elsewhere meanwhile.
                if digest is None:
                    digest = heads_digest(doc.heads())
                if peer.notified != digest:
                    peer.notified = digest
                    self._emit(name, bytes([DIGEST]) + digest)

    def _anti_entropy(self, now: float) -> None:
        # Random order, but each persistent peer once per round: every link is checked, and
        # kept alive on the other side (see inbound_ttl), within two rounds.
        target = None
        while target is None:
            if not self._rounds:
                self._rounds = [name for name in self._persistent if name in self._peers]
                if not self._rounds:
                    return
                self._rng.shuffle(self._rounds)
            name = self._rounds.pop()
            if name in self._peers and self._peers[name].persistent:
                target = name
        with self._doc.update_document() as doc:
            digest = heads_digest(doc.heads())
        self._emit(target, bytes([DIGEST]) + digest)
        self.stats.digests_sent += 1

    def _expire_inbound(self, now: float) -> None:
        ttl = self.config.inbound_ttl
        stale = [
            name
            for name, peer in self._peers.items()
            if not peer.persistent and now - max(peer.last_heard, peer.last_exchange) > ttl
        ]
        for name in stale:
            del self._peers[name]

    def _on_digest(self, name: str, peer: _Peer, digest: bytes, now: float) -> None:
        with self._doc.update_document() as doc:
            if heads_digest(doc.heads()) == digest:
                peer.backoff = 0.0
                return
            message, _ = self._generate(peer, doc)
            if message is not None:
                self._send_encoded(name, peer, message.encode(), now)
            elif now - peer.last_exchange >= self.config.settle_time and self._may_reset(peer, now):
                # The heads differ, our state thinks there is nothing to say, and nothing
                # went either way for a while: it is out of step with the peer's, as after a
                # lost message. (Sooner, an exchange may just not have finished.)
                self._reset_and_send(name, peer, doc, now)
            else:
                # We have nothing for the peer, so it has something for us (a lazy push, or
                # a change it made while we last talked): ask for it.
                self._emit(name, bytes([PULL]))

    def _on_sync(self, name: str, peer: _Peer, kind: int, payload: bytes, now: float) -> None:
        if kind == RESET:
            peer.restart(announced=True)
        try:
            message = am.Message.decode(payload[1:])
        except BaseException as exc:
            if isinstance(exc, _FATAL):
                raise
            self._refuse(name, f"undecodable sync message from {name}: {exc}")
        failure: str | None = None
        with self._doc.update_document() as doc:
            before = doc.heads()
            try:
                doc.automerge.receive_sync_message(peer.state, message)
            except BaseException as exc:
                # The binding raises plain Exceptions, and pyo3 turns a Rust panic into a
                # BaseException subclass; either way the message was bad, not the node.
                if isinstance(exc, _FATAL):
                    raise
                failure = f"sync message from {name} does not apply: {exc}"
            if failure is None:
                peer.last_exchange = now
                if self._send_sync(name, peer, doc, now):
                    failure = f"sync message from {name} left a sync state that panics"
            moved = doc.heads() != before
        if moved:
            # New changes: pass them on to every other link.
            for other_name, other in self._peers.items():
                if other_name != name:
                    other.dirty = True
            self._schedule_flush(now)
        if failure is not None:
            self._refuse(name, failure)

    def _generate(self, peer: _Peer, doc: StateDocument) -> tuple[am.Message | None, bool]:
        """The next sync message for ``peer``, and whether its state had to be thrown away.

        A hostile message can decode and apply cleanly yet leave the state unusable (a
        Bloom filter of zero bits makes every later call panic, found by fuzzing rc1); such
        a state is replaced by a fresh one, whose first message goes out as a RESET.
        """
        try:
            return doc.automerge.generate_sync_message(peer.state), False
        except BaseException as exc:
            if isinstance(exc, _FATAL):
                raise
            self.stats.errors += 1
            peer.restart(announced=False)
            return doc.automerge.generate_sync_message(peer.state), True

    def _send_sync(self, name: str, peer: _Peer, doc: StateDocument, now: float) -> bool:
        """Send ``peer`` what the protocol says next, if anything; True if its state was bad."""
        message, poisoned = self._generate(peer, doc)
        if message is None:
            return poisoned  # in step with the peer: nothing to say
        data = message.encode()
        if peer.announced and data == peer.last_sent:
            # Saying exactly the same thing again means the last exchange achieved nothing:
            # the two states are out of step. Start over, or go quiet until allowed to.
            if self._may_reset(peer, now):
                self._reset_and_send(name, peer, doc, now)
            return poisoned
        self._send_encoded(name, peer, data, now)
        return poisoned

    def _send_encoded(self, name: str, peer: _Peer, data: bytes, now: float) -> None:
        kind = SYNC if peer.announced else RESET
        peer.announced = True
        peer.last_sent = data
        peer.last_exchange = now
        self.stats.sync_sent += 1
        self._emit(name, bytes([kind]) + data)

    def _may_reset(self, peer: _Peer, now: float) -> bool:
        return now >= peer.next_reset_at

    def _reset_and_send(self, name: str, peer: _Peer, doc: StateDocument, now: float) -> None:
        config = self.config
        peer.backoff = min(max(peer.backoff * 2, config.reset_backoff), config.reset_backoff_max)
        peer.next_reset_at = now + peer.backoff
        peer.restart(announced=False)
        self.stats.resets += 1
        message, _ = self._generate(peer, doc)
        if message is not None:  # a fresh state always has something to say
            self._send_encoded(name, peer, message.encode(), now)

    def _emit(self, name: str, payload: bytes) -> None:
        self.stats.messages_sent += 1
        self.stats.bytes_sent += len(payload)
        self._outgoing.append((name, payload))

    def _refuse(self, name: str, reason: str) -> NoReturn:
        self.stats.errors += 1
        peer = self._peers.get(name)
        if peer is not None:
            if peer.persistent:
                peer.restart(announced=False)
            else:
                # Not a peer we chose: forget it; if it is genuine it will start over.
                del self._peers[name]
        raise SyncError(reason)
