"""The mesh of one node: the async shell around the sans-IO membership, Vivaldi and gossip.

:class:`MeshService` owns the QUIC transport and feeds the protocol state machines with what
arrives and with the loop's clock, then sends what they want sent. It decides nothing itself:
who is alive is :mod:`membership`'s call, which peers to keep is :mod:`topology`'s, what to
sync is :mod:`sync`'s. The same state machines run in :mod:`pollen.sim` on virtual time.

Channels on a peer connection:

* ``MEMBERSHIP`` messages (:mod:`wire`), as datagrams when they fit;
* a ``gossip`` stream each way per peer, carrying :mod:`sync` payloads as frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from pollen.mesh import identity, pki, tokens, topology, wire
from pollen.mesh.membership import (
    Member,
    MemberEvent,
    MemberMeta,
    Membership,
    MemberState,
    SwimConfig,
)
from pollen.mesh.sync import DocumentGossip, GossipConfig, SyncedDocument, SyncError
from pollen.mesh.transport import (
    FramedStream,
    MeshTransport,
    PeerUnavailable,
    TransportConfig,
    TransportError,
)
from pollen.mesh.vivaldi import Coordinate, VivaldiClient, estimate_rtt

log = logging.getLogger(__name__)

MEMBERSHIP_CHANNEL = 1
GOSSIP_STREAM = "gossip"
# Seconds between checks that fast-changing facts (load, coordinate) moved enough to announce.
META_REFRESH_SECONDS = 5.0


@dataclass
class MeshSettings:
    """Protocol settings of one node's mesh."""

    # memberlist's local profile with a 0.5 s probe interval: at 10 nodes a dead node is dead
    # everywhere in about 3.3 s (median) instead of 6 s, inside the 5 s target of SPEC
    # section 7, for a few more small datagrams a second (ADR 0003).
    swim: SwimConfig = field(
        default_factory=lambda: dataclasses.replace(SwimConfig.local(), probe_interval=0.5)
    )
    gossip: GossipConfig = field(default_factory=GossipConfig)
    topology: topology.TopologyConfig = field(default_factory=topology.TopologyConfig)


class MeshService:
    """Membership, Vivaldi and document gossip of one node over its QUIC transport."""

    def __init__(
        self,
        credentials: identity.NodeCredentials,
        document: SyncedDocument,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        is_revoked: pki.RevocationCheck | None = None,
        admitter: tokens.Admitter | None = None,
        settings: MeshSettings | None = None,
        labels: Mapping[str, str] | None = None,
        load: Callable[[], float] = lambda: 0.0,
        on_member_event: Callable[[MemberEvent], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings or MeshSettings()
        self.transport = MeshTransport(
            credentials,
            host=host,
            port=port,
            # The first sync with a new node carries everything it lacks in one message, so
            # gossip frames may be as large as the largest message gossip accepts.
            config=TransportConfig(max_frame_size=self.settings.gossip.max_message_bytes),
            is_revoked=is_revoked,
            admitter=admitter,
            on_message=self._on_message,
            on_stream=self._on_stream,
            on_peer=self._on_peer,
        )
        self.name = self.transport.name
        self._document = document
        self._labels = dict(labels or {})
        self._load = load
        self._on_member_event = on_member_event
        self._rng = rng or random.Random()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.vivaldi = VivaldiClient(rng=self._rng)
        self.membership: Membership | None = None
        self.gossip: DocumentGossip | None = None
        self._peers = topology.PeerChoice()
        self._wake = asyncio.Event()
        self._timer: asyncio.Task[None] | None = None
        self._dialing: dict[str, asyncio.Task[None]] = {}
        self._pending: dict[str, list[bytes]] = {}
        self._gossip_out: dict[str, asyncio.Queue[bytes]] = {}
        self._gossip_writers: dict[str, asyncio.Task[None]] = {}
        self._readers: set[asyncio.Task[None]] = set()
        self._next_topology = 0.0
        self._next_rotate = 0.0
        self._stopped = False
        self._next_meta = 0.0
        self._last_meta: MemberMeta | None = None

    # lifecycle ---------------------------------------------------------------------------

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    @property
    def address(self) -> str:
        host, port = self.transport.bound_address
        return tokens.format_address(host, port)

    def _meta(self) -> MemberMeta:
        return MemberMeta(
            addresses=(self.address,),
            coordinate=self.vivaldi.coordinate,
            load=max(0.0, min(1.0, self._load())),
            artifacts=(),
            labels=tuple(sorted(self._labels.items()))[:16],
        )

    async def start(self) -> None:
        """Start the transport and the protocol timers. Call :meth:`join` to meet others."""
        self._loop = asyncio.get_running_loop()
        await self.transport.start()
        now = self._now()
        self._last_meta = self._meta()
        self.membership = Membership(self.name, self._last_meta, self.settings.swim, self._rng, now)
        self.gossip = DocumentGossip(
            self._document, now, config=self.settings.gossip, rng=self._rng
        )
        self._timer = self._loop.create_task(self._run_timers())

    async def join(self, addresses: Iterable[tuple[str, int]]) -> list[str]:
        """Dial ``addresses`` and join the members found there; returns their names.

        Unreachable addresses are skipped (logged): a node that cannot reach its seeds still
        runs, alone, and membership retries the seeds it met.
        """
        assert self.membership is not None
        names: list[str] = []
        for host, port in addresses:
            try:
                peer = await self.transport.connect((host, port))
            except TransportError as exc:
                log.warning("cannot reach %s: %s", tokens.format_address(host, port), exc)
                continue
            if peer.name != self.name:
                names.append(peer.name)
        if names:
            self.membership.join(names, self._now())
            self._flush()
        return names

    async def stop(self) -> None:
        """Leave gracefully (others see *left*, not *dead*), then close every connection."""
        if self.membership is not None and self._loop is not None:
            self.membership.leave(self._now())
            self._flush()
            # Give the leave a moment to go out on the datagrams already queued.
            await asyncio.sleep(0)
        self._stopped = True
        self._wake.set()
        if self._timer is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
        for task in [*self._dialing.values(), *self._gossip_writers.values(), *self._readers]:
            task.cancel()
        await self.transport.stop()

    # what the node asks ---------------------------------------------------------------------

    def members(self) -> Mapping[str, Member]:
        """Every member this node knows of, itself included."""
        return self.membership.members() if self.membership is not None else {}

    def alive(self) -> list[str]:
        return sorted(name for name, m in self.members().items() if m.state == MemberState.ALIVE)

    def estimated_rtt(self, peer: str) -> float | None:
        """Vivaldi's estimate of the round trip to ``peer`` in seconds, if it has a coordinate."""
        member = self.members().get(peer)
        if member is None or member.meta.coordinate is None:
            return None
        if peer == self.name:
            return 0.0
        try:
            return estimate_rtt(self.vivaldi.coordinate, member.meta.coordinate)
        except ValueError:
            return None

    @property
    def coordinate(self) -> Coordinate:
        return self.vivaldi.coordinate

    def document_changed(self) -> None:
        """The local document changed: push it to the peers soon."""
        if self.gossip is not None and self._loop is not None:
            self.gossip.on_local_change(self._now())
            self._flush()

    def evict(self, peer: str) -> None:
        """Declare ``peer`` dead at once (its Node was deleted) and drop its connection."""
        if self.membership is not None and self._loop is not None:
            self.membership.evict(peer, self._now())
            self.transport.close_peer(peer, "this node was removed from the cluster")
            self._flush()

    # driving the state machines -------------------------------------------------------------

    async def _run_timers(self) -> None:
        # A flag, not only cancellation: on Python 3.11, wait_for() can swallow a cancel that
        # races with the event being set, and this loop would then never end.
        while not self._stopped:
            assert self.membership is not None and self.gossip is not None
            now = self._now()
            deadlines = [self._next_topology, self._next_meta, self.gossip.next_deadline()]
            member_deadline = self.membership.next_deadline()
            if member_deadline is not None:
                deadlines.append(member_deadline)
            delay = max(0.0, min(deadlines) - now)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(delay, 1.0)):
                    await self._wake.wait()
            if self._stopped:
                return
            try:
                self._tick()
            except Exception:
                log.exception("mesh timer step failed; continuing")

    def _tick(self) -> None:
        assert self.membership is not None and self.gossip is not None
        now = self._now()
        self.membership.tick(now)
        self.gossip.tick(now)
        if now >= self._next_meta:
            self._next_meta = now + META_REFRESH_SECONDS
            self._refresh_meta(now)
        if now >= self._next_topology:
            self._choose_peers(now)
        self._flush()

    def _refresh_meta(self, now: float) -> None:
        assert self.membership is not None
        self.membership.set_coordinate(self.vivaldi.coordinate)
        meta = self._meta()
        previous = self._last_meta
        # Coordinates travel in acks; announce (which bumps the incarnation and gossips) only
        # when something else changed, or load moved noticeably.
        if previous is None or (
            meta.addresses != previous.addresses
            or meta.labels != previous.labels
            or meta.artifacts != previous.artifacts
            or abs(meta.load - previous.load) >= 0.1
        ):
            self._last_meta = meta
            self.membership.update_meta(meta, now)

    def _choose_peers(self, now: float) -> None:
        assert self.gossip is not None
        self._next_topology = now + self.settings.topology.rechoose_interval
        candidates = [
            topology.Candidate(
                name,
                member.meta.addresses[0] if member.meta.addresses else None,
                self.estimated_rtt(name),
            )
            for name, member in self.members().items()
            if name != self.name and member.state == MemberState.ALIVE
        ]
        self._peers = topology.choose_peers(
            self.name,
            self.address,
            candidates,
            self._rng,
            self.settings.topology,
            previous=self._peers,
            # Replace a random link only every rotate_interval: each new link costs a sync from
            # a fresh state (a Bloom filter of the whole history).
            rotate=None if now >= self._next_rotate else 0,
        )
        if now >= self._next_rotate:
            self._next_rotate = now + self.settings.topology.rotate_interval
        self.gossip.set_peers(sorted(self._peers.peers), now)
        for peer in self._peers.peers:
            self._ensure_connected(peer)

    def _flush(self) -> None:
        """Send everything the state machines queued, and hand their events on."""
        assert self.membership is not None and self.gossip is not None
        for outbound in self.membership.drain_outgoing():
            self._send_membership(outbound.to, wire.encode(outbound.message))
        for peer, payload in self.gossip.drain_outgoing():
            self._send_gossip(peer, payload)
        for sample in self.membership.drain_rtt_samples():
            if sample.coordinate is not None:
                self.vivaldi.update(sample.peer, sample.coordinate, sample.rtt)
        membership_changed = False
        for event in self.membership.drain_events():
            membership_changed = True
            if self._on_member_event is not None:
                try:
                    self._on_member_event(event)
                except Exception:
                    log.exception("member event handler failed for %s", event)
        if membership_changed:
            # Joins and deaths change the candidates: choose again soon rather than in a minute.
            self._next_topology = min(self._next_topology, self._now() + 0.5)
            self._wake.set()

    # sending ----------------------------------------------------------------------------------

    def _send_membership(self, peer: str, data: bytes) -> None:
        try:
            self.transport.send(peer, MEMBERSHIP_CHANNEL, data)
        except PeerUnavailable:
            queue = self._pending.setdefault(peer, [])
            if len(queue) < 64:
                queue.append(data)
            self._ensure_connected(peer)

    def _ensure_connected(self, peer: str) -> None:
        if self.transport.peer(peer) is not None or peer in self._dialing or self._loop is None:
            return
        member = self.members().get(peer)
        if member is None:
            return
        addresses = []
        for text in member.meta.addresses:
            with contextlib.suppress(ValueError):  # a peer's meta is hostile input
                addresses.append(tokens.parse_address(text))
        if not addresses:
            return
        task = self._loop.create_task(self._dial(peer, addresses))
        self._dialing[peer] = task
        task.add_done_callback(lambda _: self._dialing.pop(peer, None))

    async def _dial(self, peer: str, addresses: list[tuple[str, int]]) -> None:
        for address in addresses:
            try:
                await self.transport.connect(address, expected_peer=peer)
                return
            except TransportError as exc:
                log.debug("cannot reach %s at %s: %s", peer, address, exc)
        # Unreachable: membership's probes will suspect it; drop what waited for it.
        self._pending.pop(peer, None)

    def _send_gossip(self, peer: str, payload: bytes) -> None:
        queue = self._gossip_out.get(peer)
        if queue is None:
            if self.transport.peer(peer) is None:
                self._ensure_connected(peer)
                return  # gossip recovers: the next digest or peer_up resyncs
            queue = asyncio.Queue()
            self._gossip_out[peer] = queue
            assert self._loop is not None
            self._gossip_writers[peer] = self._loop.create_task(self._write_gossip(peer, queue))
        queue.put_nowait(payload)

    async def _write_gossip(self, peer: str, queue: asyncio.Queue[bytes]) -> None:
        try:
            stream = await self.transport.open_stream(peer, GOSSIP_STREAM)
            while True:
                await stream.write_frame(await queue.get())
        except (TransportError, ConnectionError) as exc:
            log.debug("gossip stream to %s ended: %s", peer, exc)
        finally:
            if self._gossip_out.get(peer) is queue:
                del self._gossip_out[peer]
                self._gossip_writers.pop(peer, None)

    # receiving --------------------------------------------------------------------------------

    def _on_message(self, peer: str, channel: int, payload: bytes) -> None:
        if channel != MEMBERSHIP_CHANNEL or self.membership is None:
            return
        try:
            message = wire.decode(payload)
        except wire.WireError as exc:
            log.warning("bad membership message from %s: %s", peer, exc)
            self.transport.close_peer(peer, "malformed membership message")
            return
        self.membership.receive(peer, message, self._now())
        self._flush()

    async def _on_stream(self, peer: str, kind: str, stream: FramedStream) -> None:
        if kind != GOSSIP_STREAM:
            stream.reset()
            return
        task = asyncio.current_task()
        if task is not None:
            self._readers.add(task)
        try:
            while (frame := await stream.read_frame()) is not None:
                if self.gossip is None:
                    continue
                try:
                    self.gossip.receive(peer, frame, self._now())
                except SyncError as exc:
                    log.warning("bad gossip from %s: %s", peer, exc)
                self._flush()
        except (TransportError, ConnectionError) as exc:
            log.debug("gossip stream from %s ended: %s", peer, exc)
        finally:
            if task is not None:
                self._readers.discard(task)

    def _on_peer(self, peer: str, connected: bool) -> None:
        if self.gossip is None or self._loop is None:
            return
        now = self._now()
        if connected:
            self.gossip.peer_up(peer, now)
            for data in self._pending.pop(peer, []):
                with contextlib.suppress(PeerUnavailable):
                    self.transport.send(peer, MEMBERSHIP_CHANNEL, data)
        else:
            self.gossip.peer_down(peer)
            writer = self._gossip_writers.pop(peer, None)
            if writer is not None:
                writer.cancel()
            self._gossip_out.pop(peer, None)
        self._flush()
