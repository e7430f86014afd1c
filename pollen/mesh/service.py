"""The mesh of one node: the async shell around the sans-IO membership, Vivaldi and gossip.

:class:`MeshService` owns the QUIC transport and feeds the protocol state machines with what
arrives and with the loop's clock, then sends what they want sent. It decides nothing itself:
who is alive is :mod:`membership`'s call, which peers to keep is :mod:`topology`'s, what to
sync is :mod:`sync`'s. The same state machines run in :mod:`pollen.sim` on virtual time.

Channels on a peer connection:

* ``MEMBERSHIP`` messages (:mod:`wire`), as datagrams when they fit;
* a ``gossip`` stream each way per peer, carrying :mod:`sync` payloads as frames;
* streams of the kinds other parts of the node register (:meth:`MeshService.handle_streams`),
  opened with :meth:`MeshService.open_stream`, directly or through a relay (:mod:`relay`)
  when the peer cannot be reached directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from pollen.mesh import identity, pki, tokens, topology, wire
from pollen.mesh.membership import (
    EventKind,
    Member,
    MemberEvent,
    MemberMeta,
    Membership,
    MemberState,
    SwimConfig,
)
from pollen.mesh.relay import (
    RELAY_KIND,
    RELAYED_KIND,
    RelayAnswer,
    RelayedHeader,
    RelayError,
    RelayRequest,
    RouteConfig,
    RouteTable,
)
from pollen.mesh.sync import DocumentGossip, GossipConfig, SyncedDocument, SyncError
from pollen.mesh.transport import (
    FramedStream,
    MeshTransport,
    PeerUnavailable,
    StreamClosed,
    TransportConfig,
    TransportError,
)
from pollen.mesh.vivaldi import Coordinate, VivaldiClient, estimate_rtt

log = logging.getLogger(__name__)

MEMBERSHIP_CHANNEL = 1
GOSSIP_STREAM = "gossip"
# Seconds between checks that fast-changing facts (load, coordinate) moved enough to announce.
META_REFRESH_SECONDS = 5.0
# Seconds a relay or a relayed stream may take to send its header or answer.
RELAY_HEADER_TIMEOUT = 10.0
# Streams this node relays for others at once; further requests are refused as busy.
MAX_RELAYED_STREAMS = 256
_RESERVED_KINDS = frozenset({GOSSIP_STREAM, RELAY_KIND, RELAYED_KIND})

_Header = TypeVar("_Header", RelayRequest, RelayedHeader)

StreamHandler = Callable[[str, FramedStream], Awaitable[None]]
"""Serves one incoming stream: ``(origin node, stream)``. Returning finishes the stream."""


@dataclass(frozen=True)
class MeshStream:
    """A stream to ``peer``, direct (``via`` is None) or through the relay ``via``."""

    stream: FramedStream
    peer: str
    via: str | None = None


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
    routes: RouteConfig = field(default_factory=RouteConfig)


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
        held_artifacts: Callable[[], Sequence[str]] = lambda: (),
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
        # Digests this node holds, most relevant first; the first MAX_ARTIFACTS are announced.
        self._held_artifacts = held_artifacts
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
        self._routes = RouteTable(self.settings.routes)
        self._handlers: dict[str, StreamHandler] = {}
        self._relaying = 0

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
            # Sorted, so that a change of order alone is not a change worth announcing.
            artifacts=tuple(sorted(self._held_artifacts()[: wire.MAX_ARTIFACTS])),
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
        return self.distance(self.name, peer)

    def distance(self, a: str, b: str) -> float | None:
        """Vivaldi's estimate of the round trip between members ``a`` and ``b``, in seconds."""
        if a == b:
            return 0.0
        coordinates = []
        for name in (a, b):
            if name == self.name:
                coordinates.append(self.vivaldi.coordinate)
                continue
            member = self.members().get(name)
            if member is None or member.meta.coordinate is None:
                return None
            coordinates.append(member.meta.coordinate)
        try:
            return estimate_rtt(coordinates[0], coordinates[1])
        except ValueError:  # a peer's coordinate of another dimensionality
            return None

    @property
    def coordinate(self) -> Coordinate:
        return self.vivaldi.coordinate

    def document_changed(self) -> None:
        """The local document changed: push it to the peers soon."""
        if self.gossip is not None and self._loop is not None:
            self.gossip.on_local_change(self._now())
            self._flush()

    def meta_changed(self) -> None:
        """Something this node announces (the artifacts it holds) changed: announce it now
        rather than at the next periodic refresh."""
        self._next_meta = 0.0
        self._wake.set()

    def handle_streams(self, kind: str, handler: StreamHandler) -> None:
        """Serve incoming streams of ``kind``, direct or relayed, with ``handler``."""
        if kind in _RESERVED_KINDS:
            raise ValueError(f"stream kind {kind!r} is the mesh's own")
        self._handlers[kind] = handler

    async def open_stream(self, peer: str, kind: str, *, via: str | None = None) -> MeshStream:
        """A stream of ``kind`` to ``peer``: direct when possible, else through a relay.

        A peer not connected yet is dialled; if that fails, or takes longer than
        ``routes.direct_attempt``, the stream goes through a connected node that can reach
        ``peer`` (one hop), and the next streams try the relay that worked first, for
        ``retry_direct_after`` seconds. With ``via``, the stream goes through that relay even
        when a direct route exists (for diagnostics). Raises :class:`PeerUnavailable` with
        every reason when nothing works.
        """
        if peer == self.name:
            raise ValueError("a node does not open mesh streams to itself")
        if via is not None:
            try:
                return MeshStream(await self._open_relayed(via, peer, kind), peer, via=via)
            except (RelayError, TimeoutError) as exc:
                raise PeerUnavailable(
                    f"node {peer!r} through {via}: {str(exc) or 'timed out'}"
                ) from None
        if self.transport.peer(peer) is None and self._routes.try_direct(peer, self._now()):
            addresses = self._addresses_of(peer)
            try:
                async with asyncio.timeout(self.settings.routes.direct_attempt):
                    await self._connect(peer, addresses)
            except (TransportError, TimeoutError) as exc:
                log.debug("no direct route to %s: %s", peer, str(exc) or "timed out")
                self._routes.direct_failed(peer, self._now())
        if self.transport.peer(peer) is not None:
            with contextlib.suppress(PeerUnavailable):
                return MeshStream(await self.transport.open_stream(peer, kind), peer)
        reasons: list[str] = []
        relays = self._routes.relays(
            peer, self.transport.peers(), self.distance, self_name=self.name
        )
        for relay in relays:
            try:
                stream = await self._open_relayed(relay, peer, kind)
            except (TransportError, RelayError, TimeoutError) as exc:
                self._routes.relay_failed(peer, relay)
                reasons.append(f"through {relay}: {str(exc) or 'timed out'}")
                continue
            self._routes.relayed_via(peer, relay)
            return MeshStream(stream, peer, via=relay)
        if not relays:
            reasons.append("no other node to relay through")
        raise PeerUnavailable(
            f"node {peer!r} cannot be reached directly or through a relay ({'; '.join(reasons)})"
        )

    async def _connect(self, peer: str, addresses: list[tuple[str, int]]) -> None:
        if not addresses:
            raise PeerUnavailable(f"no address is known for node {peer!r}")
        failure: TransportError | None = None
        for address in addresses:
            try:
                await self.transport.connect(address, expected_peer=peer)
                return
            except TransportError as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def _open_relayed(self, relay: str, peer: str, kind: str) -> FramedStream:
        stream = await self.transport.open_stream(relay, RELAY_KIND)
        try:
            await stream.write_frame(RelayRequest(peer, kind).encode())
            async with asyncio.timeout(RELAY_HEADER_TIMEOUT):
                frame = await stream.read_frame()
            if frame is None:
                raise RelayError("the relay ended the stream without an answer")
            answer = RelayAnswer.decode(frame)
        except BaseException:
            stream.reset()
            raise
        if not answer.ok:
            stream.reset()
            raise RelayError(answer.error or "refused")
        return stream

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
            self._routes.direct_answer(sample.peer)
            if sample.coordinate is not None:
                self.vivaldi.update(sample.peer, sample.coordinate, sample.rtt)
        for peer in self.membership.drain_indirect_only():
            if self._routes.indirect_only(peer, self._now()):
                log.info("no direct route to %s any more; its streams go through a relay", peer)
                self.transport.close_peer(peer, "the direct path stopped answering")
        membership_changed = False
        for event in self.membership.drain_events():
            membership_changed = True
            if event.kind in (EventKind.DEAD, EventKind.LEFT, EventKind.REAPED):
                self._routes.forget(event.member.name)
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

    def _addresses_of(self, peer: str) -> list[tuple[str, int]]:
        member = self.members().get(peer)
        addresses: list[tuple[str, int]] = []
        for text in member.meta.addresses if member is not None else ():
            with contextlib.suppress(ValueError):  # a peer's meta is hostile input
                addresses.append(tokens.parse_address(text))
        return addresses

    def _ensure_connected(self, peer: str) -> None:
        if self.transport.peer(peer) is not None or peer in self._dialing or self._loop is None:
            return
        addresses = self._addresses_of(peer)
        if not addresses:
            return
        task = self._loop.create_task(self._dial(peer, addresses))
        self._dialing[peer] = task
        task.add_done_callback(lambda _: self._dialing.pop(peer, None))

    async def _dial(self, peer: str, addresses: list[tuple[str, int]]) -> None:
        try:
            await self._connect(peer, addresses)
        except TransportError as exc:
            log.debug("cannot reach %s: %s", peer, exc)
            if self._loop is not None:
                self._routes.direct_failed(peer, self._now())
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
        if kind == RELAY_KIND:
            await self._serve_relay(peer, stream)
            return
        if kind == RELAYED_KIND:
            await self._accept_relayed(peer, stream)
            return
        if kind != GOSSIP_STREAM:
            handler = self._handlers.get(kind)
            if handler is None:
                stream.reset()
                return
            await handler(peer, stream)
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
            self._routes.direct_up(peer)
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

    # relaying ---------------------------------------------------------------------------------

    async def _serve_relay(self, origin: str, stream: FramedStream) -> None:
        """Relay ``origin``'s stream to the target it names, then copy frames both ways."""
        request = await _read_header(stream, RelayRequest.decode, "bad relay request")
        if request is None:
            return
        refusal = self._relay_refusal(origin, request)
        if refusal is not None:
            await stream.write_frame(RelayAnswer(refusal).encode())
            return
        self._relaying += 1
        try:
            try:
                onward = await self._open_onward(origin, request)
            except (TransportError, RelayError, TimeoutError) as exc:
                reason = f"{self.name} cannot reach {request.target}: {str(exc) or 'timed out'}"
                await stream.write_frame(RelayAnswer(reason).encode())
                return
            try:
                await stream.write_frame(RelayAnswer().encode())
            except BaseException:
                onward.reset()
                raise
            await _splice(stream, onward)
        finally:
            self._relaying -= 1

    def _relay_refusal(self, origin: str, request: RelayRequest) -> str | None:
        if request.target in (origin, self.name):
            return f"{self.name} does not relay a stream back to its origin or to itself"
        if request.kind in _RESERVED_KINDS:
            return f"stream kind {request.kind!r} is not relayed"
        member = self.members().get(request.target)
        if member is None or member.state != MemberState.ALIVE:
            return f"{request.target} is not an alive member as {self.name} sees it"
        if self._relaying >= MAX_RELAYED_STREAMS:
            return f"{self.name} is relaying too many streams"
        return None

    async def _open_onward(self, origin: str, request: RelayRequest) -> FramedStream:
        """The stream to the target, with the target's answer read (and checked to be ok)."""
        if self.transport.peer(request.target) is None:
            async with asyncio.timeout(self.settings.routes.direct_attempt):
                await self._connect(request.target, self._addresses_of(request.target))
        onward = await self.transport.open_stream(request.target, RELAYED_KIND)
        try:
            await onward.write_frame(RelayedHeader(origin, request.kind).encode())
            async with asyncio.timeout(RELAY_HEADER_TIMEOUT):
                frame = await onward.read_frame()
            if frame is None:
                raise RelayError(f"{request.target} ended the stream without an answer")
            answer = RelayAnswer.decode(frame)
            if not answer.ok:
                raise RelayError(answer.error or "refused")
        except BaseException:
            onward.reset()
            raise
        return onward

    async def _accept_relayed(self, relay: str, stream: FramedStream) -> None:
        """A stream ``relay`` opened on behalf of another node: hand it to its handler."""
        header = await _read_header(stream, RelayedHeader.decode, "bad relayed header")
        if header is None:
            return
        handler = self._handlers.get(header.kind)
        refusal: str | None = None
        if header.origin in (relay, self.name):
            refusal = "a relayed stream must come from a third node"
        elif header.origin not in self.members():
            # The relay authenticated the origin; this node still insists on a member it knows.
            refusal = f"{header.origin} is not a member as {self.name} sees it"
        elif handler is None:
            refusal = f"{self.name} serves no {header.kind!r} streams"
        if refusal is not None:
            await stream.write_frame(RelayAnswer(refusal).encode())
            return
        assert handler is not None
        await stream.write_frame(RelayAnswer().encode())
        await handler(header.origin, stream)


async def _read_header(
    stream: FramedStream, decode: Callable[[bytes], _Header], refusal: str
) -> _Header | None:
    """The first frame of a relay stream, decoded; None (after answering why) if it is bad."""
    try:
        async with asyncio.timeout(RELAY_HEADER_TIMEOUT):
            frame = await stream.read_frame()
        if frame is None:
            return None
        return decode(frame)
    except (RelayError, TimeoutError) as exc:
        await stream.write_frame(RelayAnswer(f"{refusal}: {str(exc) or 'timed out'}").encode())
        return None


async def _splice(a: FramedStream, b: FramedStream) -> None:
    """Copy frames from ``a`` to ``b`` and back until both directions finished.

    A reset or a lost connection on either side resets both: an end must never take a stream
    cut short by the relay for a complete one.
    """

    async def pump(source: FramedStream, sink: FramedStream) -> None:
        while (frame := await source.read_frame()) is not None:
            await sink.write_frame(frame)
        await sink.finish()

    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(pump(a, b))
            group.create_task(pump(b, a))
    except BaseExceptionGroup as failures:
        a.reset()
        b.reset()
        unexpected = failures.subgroup(
            lambda e: not isinstance(e, (StreamClosed, TransportError, ConnectionError))
        )
        if unexpected is not None:
            raise
        raise StreamClosed("one end of the relayed stream closed") from None
    except BaseException:
        a.reset()
        b.reset()
        raise
