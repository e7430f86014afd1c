"""The mesh transport over real QUIC on 127.0.0.1, with real certificates.

Peers that must be refused are played by plain aioquic clients and servers, so that they can do
what our own transport never would (present nothing, send before being accepted, break frames).
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from aioquic.asyncio.client import connect as quic_connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pollen.mesh import identity, pki, tokens
from pollen.mesh import transport as mt
from pollen.mesh.transport import (
    ALPN_ENROL,
    ALPN_MESH,
    CloseCode,
    ConnectionRefused,
    FrameDecoder,
    FramedStream,
    FrameError,
    MeshTransport,
    PeerUnavailable,
    StreamClosed,
    TransportConfig,
    encode_frame,
)

WAIT = 10.0


async def eventually(condition: Callable[[], object], what: str) -> None:
    """Wait for ``condition`` with a deadline (no fixed sleeps)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {WAIT}s waiting for {what}")
        await asyncio.sleep(0.01)


# --- a cluster and its nodes ----------------------------------------------------------------------


@dataclass
class Cluster:
    name: str
    root: Ed25519PrivateKey
    ca: x509.Certificate

    @classmethod
    def new(cls, name: str = "c1") -> Cluster:
        root = Ed25519PrivateKey.generate()
        return cls(name, root, pki.create_ca_certificate(root, name, datetime.now(UTC)))

    def credentials(
        self,
        node: str,
        *,
        issued: datetime | None = None,
        validity: timedelta = pki.NODE_VALIDITY,
        key: Ed25519PrivateKey | None = None,
        admit: bool = False,
    ) -> identity.NodeCredentials:
        key = key or Ed25519PrivateKey.generate()
        cert = pki.issue_node_certificate(
            self.root, self.ca, node, key.public_key(), issued or datetime.now(UTC), validity
        )
        return identity.NodeCredentials(
            self.name, node, key, cert, self.ca, self.root if admit else None
        )


async def echo(peer: str, kind: str, stream: FramedStream) -> None:
    async for frame in stream:
        await stream.write_frame(frame)
    await stream.finish()


@dataclass
class Node:
    """A started transport and what its handlers saw."""

    transport: MeshTransport
    messages: asyncio.Queue[tuple[str, int, bytes]] = field(default_factory=asyncio.Queue)
    peer_events: list[tuple[str, bool]] = field(default_factory=list)
    streams: list[tuple[str, str]] = field(default_factory=list)

    @property
    def address(self) -> tuple[str, int]:
        return self.transport.bound_address

    @property
    def saw_nothing(self) -> bool:
        return self.messages.empty() and not self.peer_events and not self.streams

    async def message(self) -> tuple[str, int, bytes]:
        return await asyncio.wait_for(self.messages.get(), WAIT)


StartNode = Callable[..., Awaitable[Node]]


@pytest.fixture
async def start_node() -> AsyncIterator[StartNode]:
    started: list[Node] = []

    async def start(
        credentials: identity.NodeCredentials,
        *,
        handler: Callable[[str, str, FramedStream], Awaitable[None]] = echo,
        **kwargs: Any,
    ) -> Node:
        node: Node

        async def on_stream(peer: str, kind: str, stream: FramedStream) -> None:
            node.streams.append((peer, kind))
            await handler(peer, kind, stream)

        transport = MeshTransport(
            credentials,
            on_message=lambda p, c, b: node.messages.put_nowait((p, c, b)),
            on_stream=on_stream,
            on_peer=lambda p, up: node.peer_events.append((p, up)),
            **kwargs,
        )
        node = Node(transport)
        await transport.start()
        started.append(node)
        return node

    yield start
    for node in started:
        await node.transport.stop()


@pytest.fixture
def cluster() -> Cluster:
    return Cluster.new("c1")


# --- plain aioquic peers --------------------------------------------------------------------------


class RecordingProtocol(QuicConnectionProtocol):
    """An aioquic client that records every event it gets."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[events.QuicEvent] = []
        self.terminated: asyncio.Future[events.ConnectionTerminated] = (
            asyncio.get_running_loop().create_future()
        )

    def quic_event_received(self, event: events.QuicEvent) -> None:
        self.events.append(event)
        if isinstance(event, events.ConnectionTerminated) and not self.terminated.done():
            self.terminated.set_result(event)
        # Not passed on to aioquic's stream readers: their writers FIN a stream when collected.

    @property
    def received_data(self) -> list[events.QuicEvent]:
        return [
            e
            for e in self.events
            if isinstance(e, events.StreamDataReceived | events.DatagramFrameReceived)
        ]

    async def closed_with(self) -> events.ConnectionTerminated:
        return await asyncio.wait_for(asyncio.shield(self.terminated), WAIT)

    def send(self, stream_id: int, data: bytes, end: bool = False) -> None:
        self._quic.send_stream_data(stream_id, data, end_stream=end)
        self.transmit()

    def new_stream(self, unidirectional: bool = False) -> int:
        return int(self._quic.get_next_available_stream_id(is_unidirectional=unidirectional))

    def datagram(self, data: bytes) -> None:
        self._quic.send_datagram_frame(data)
        self.transmit()


@asynccontextmanager
async def raw_client(
    address: tuple[str, int],
    *,
    alpn: str = ALPN_MESH,
    credentials: identity.NodeCredentials | None = None,
    certificate: x509.Certificate | None = None,
    key: Ed25519PrivateKey | None = None,
) -> AsyncIterator[RecordingProtocol]:
    """A plain aioquic client that does not check the server and may present anything."""
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=[alpn],
        verify_mode=ssl.CERT_NONE,
        max_datagram_frame_size=65536,
    )
    if credentials is not None:
        config.certificate, config.private_key = credentials.certificate, credentials.node_key
    if certificate is not None:
        config.certificate, config.private_key = certificate, key
    async with quic_connect(
        address[0],
        address[1],
        configuration=config,
        create_protocol=RecordingProtocol,
        wait_connected=False,
    ) as client:
        assert isinstance(client, RecordingProtocol)
        # Without wait_connected, aioquic leaves the first flight unsent until asked.
        client.transmit()
        yield client


def hello(instance: str | None = None) -> bytes:
    instance = instance or secrets.token_hex(16)
    return encode_frame(orjson.dumps({"v": 1, "instance": instance}))


def self_signed(name: str, cluster: str = "c1") -> tuple[x509.Certificate, Ed25519PrivateKey]:
    """A node certificate with our names, signed by its own key."""
    key = Ed25519PrivateKey.generate()
    now = datetime.now(UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pollen cluster {cluster}")])
        )
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(pki.node_uri(cluster, name))]
            ),
            critical=False,
        )
        .sign(key, algorithm=None)
    )
    return cert, key


# --- the happy path -------------------------------------------------------------------------------


async def test_messages_both_ways_over_one_connection(
    start_node: StartNode, cluster: Cluster
) -> None:
    a = await start_node(cluster.credentials("a"))
    b = await start_node(cluster.credentials("b"))
    conn = await a.transport.connect(b.address, expected_peer="b")
    assert conn.name == "b" and conn.outgoing and conn.instance == b.transport.instance
    await eventually(lambda: b.transport.peers() == ["a"], "b to see a")

    a.transport.send("b", 7, b"small")  # a datagram
    a.transport.send("b", 8, b"x" * 50_000)  # too big for a datagram: the control stream
    a.transport.send("b", 9, b"ordered", reliable=True)
    got = sorted([await b.message() for _ in range(3)])
    assert got == [("a", 7, b"small"), ("a", 8, b"x" * 50_000), ("a", 9, b"ordered")]

    # b answers on the connection a opened: no second connection appears.
    b.transport.send("a", 1, b"pong")
    assert await a.message() == ("b", 1, b"pong")
    back = b.transport.peer("a")
    assert back is not None and not back.outgoing and back.instance == a.transport.instance
    assert a.peer_events == [("b", True)] and b.peer_events == [("a", True)]
    assert a.transport.peers() == ["b"] and b.transport.peers() == ["a"]


async def test_datagram_limit_boundary(start_node: StartNode, cluster: Cluster) -> None:
    a = await start_node(cluster.credentials("a"))
    b = await start_node(cluster.credentials("b"))
    await a.transport.connect(b.address)
    limit = a.transport.config.datagram_limit
    for size in (0, limit - 1, limit, 10_000):
        a.transport.send("b", 3, bytes(size))
        assert await b.message() == ("a", 3, bytes(size))
    with pytest.raises(ValueError, match="exceeds the limit"):
        a.transport.send("b", 3, bytes(a.transport.config.max_message_size + 1))
    with pytest.raises(ValueError, match="channel"):
        a.transport.send("b", 256, b"")


async def test_streams_carry_frames_both_ways(start_node: StartNode, cluster: Cluster) -> None:
    a = await start_node(cluster.credentials("a"))
    b = await start_node(cluster.credentials("b"))
    await a.transport.connect(b.address)

    async def round_trip(frames: list[bytes]) -> list[bytes]:
        stream = await a.transport.open_stream("b", "rpc")
        for frame in frames:
            await stream.write_frame(frame)
        await stream.finish()
        return [frame async for frame in stream]

    frames = [b"", b"one", bytes(range(256)) * 10, b"z" * 1_000_000]
    results = await asyncio.gather(*(round_trip(frames) for _ in range(5)))
    assert all(result == frames for result in results)
    assert b.streams == [("a", "rpc")] * 5
    # Streams are opened from either end on the same connection.
    stream = await b.transport.open_stream("a", "gossip")
    await stream.write_frame(b"sync")
    assert await stream.read_frame() == b"sync"
    await stream.finish()
    assert await stream.read_frame() is None
    assert a.streams == [("b", "gossip")]


async def test_large_transfer_with_backpressure(start_node: StartNode, cluster: Cluster) -> None:
    a = await start_node(cluster.credentials("a"))
    b = await start_node(cluster.credentials("b"))
    await a.transport.connect(b.address)
    stream = await a.transport.open_stream("b", "bulk")
    chunk = bytes(range(256)) * 4096  # 1 MiB

    async def writer() -> None:
        for _ in range(8):
            await stream.write_frame(chunk)
        await stream.finish()

    task = asyncio.create_task(writer())
    received = [frame async for frame in stream]
    await task
    assert received == [chunk] * 8


async def test_handler_failures_and_resets_stay_on_their_stream(
    start_node: StartNode, cluster: Cluster
) -> None:
    async def handler(peer: str, kind: str, stream: FramedStream) -> None:
        if kind == "boom":
            raise RuntimeError("handler bug")
        if kind == "reset":
            stream.reset()
            return
        await echo(peer, kind, stream)

    a = await start_node(cluster.credentials("a"))
    b = await start_node(cluster.credentials("b"), handler=handler)
    await a.transport.connect(b.address)
    boom = await a.transport.open_stream("b", "boom")
    await boom.write_frame(b"x")
    with pytest.raises(StreamClosed):
        while await boom.read_frame() is not None:
            pass
    reset = await a.transport.open_stream("b", "reset")
    await reset.write_frame(b"x")
    with pytest.raises(StreamClosed):
        await reset.read_frame()
    ok = await a.transport.open_stream("b", "echo")
    await ok.write_frame(b"still here")
    assert await ok.read_frame() == b"still here"
    assert a.transport.peers() == ["b"]


async def test_rtt_comes_from_quic(start_node: StartNode, cluster: Cluster) -> None:
    a = await start_node(cluster.credentials("a"))
    b = await start_node(cluster.credentials("b"))
    conn = await a.transport.connect(b.address)
    for _ in range(5):
        await asyncio.wait_for(conn.ping(), WAIT)
    rtt = a.transport.rtt("b")
    assert rtt is not None and 0 < rtt < 0.5
    stats = conn.rtt_stats()
    assert stats is not None and stats.minimum <= stats.smoothed
    assert a.transport.rtt("nobody") is None


async def test_connect_reuses_and_unknown_peers_are_unavailable(
    start_node: StartNode, cluster: Cluster
) -> None:
    a = await start_node(cluster.credentials("a"))
    b = await start_node(cluster.credentials("b"))
    first, second = await asyncio.gather(
        a.transport.connect(b.address), a.transport.connect(b.address)
    )
    assert first is second
    assert await a.transport.connect(("localhost", b.address[1]), expected_peer="b") is first
    assert await a.transport.connect(b.address) is first
    # Nodes dial from their listening socket: b finds a's incoming connection by address.
    assert await b.transport.connect(a.address) is b.transport.peer("a")
    assert a.peer_events == [("b", True)] and b.peer_events == [("a", True)]
    with pytest.raises(PeerUnavailable):
        a.transport.send("c", 1, b"")
    with pytest.raises(PeerUnavailable):
        await a.transport.open_stream("c", "rpc")


async def test_both_ends_dialling_at_once_keep_one_connection(
    start_node: StartNode, cluster: Cluster
) -> None:
    for round_ in range(20):
        a = await start_node(cluster.credentials(f"a{round_}"))
        b = await start_node(cluster.credentials(f"b{round_}"))
        an, bn = a.transport.name, b.transport.name
        await asyncio.gather(a.transport.connect(b.address), b.transport.connect(a.address))

        def settled(a: Node = a, b: Node = b, an: str = an, bn: str = bn) -> bool:
            ab, ba = a.transport.peer(bn), b.transport.peer(an)
            return ab is not None and ba is not None and ab.outgoing != ba.outgoing

        await eventually(settled, "one connection between the two")
        kept = a.transport.peer(bn)
        assert kept is not None
        if a.peer_events.count((bn, True)) > 1 or b.peer_events.count((an, True)) > 1:
            # Both dials got through: the one dialled by the smaller name was kept. (One side may
            # also find the other's finished connection before dialling, and simply use it.)
            assert kept.outgoing
        a.transport.send(bn, 1, b"hi")
        b.transport.send(an, 1, b"hi")
        assert await b.message() == (an, 1, b"hi")
        assert await a.message() == (bn, 1, b"hi")
        assert a.transport.peer(bn) is kept


async def test_a_restarted_peer_replaces_its_old_connection(
    start_node: StartNode, cluster: Cluster
) -> None:
    a = await start_node(cluster.credentials("a"))
    b_creds = cluster.credentials("b")
    b = await start_node(b_creds)
    await b.transport.connect(a.address)
    await eventually(lambda: a.transport.peers() == ["b"], "a to see b")
    # Same identity, new process: the old connection is still open on a's side.
    b2 = await start_node(b_creds)
    await b2.transport.connect(a.address)
    await eventually(
        lambda: (p := a.transport.peer("b")) is not None and p.instance == b2.transport.instance,
        "a to switch to the new b",
    )
    assert a.peer_events == [("b", True), ("b", False), ("b", True)]
    await eventually(lambda: b.transport.peers() == [], "the old b to lose its connection")
    a.transport.send("b", 1, b"to the new one")
    assert await b2.message() == ("a", 1, b"to the new one")


async def test_stop_closes_connections(start_node: StartNode, cluster: Cluster) -> None:
    a = await start_node(cluster.credentials("a"))
    b = await start_node(cluster.credentials("b"))
    await a.transport.connect(b.address)
    await eventually(lambda: b.transport.peers() == ["a"], "b to see a")
    await a.transport.stop()
    await eventually(lambda: ("a", False) in b.peer_events, "b to see a leave")
    assert b.transport.peers() == []


# --- mutual authentication: who is refused --------------------------------------------------------


async def assert_refused_with_nothing_exchanged(
    server: Node, client: RecordingProtocol, reason: str
) -> None:
    # The refused client sends as soon as it can: its first 1-RTT packets travel with its
    # handshake's last flight.
    stream = client.new_stream()
    client.send(stream, encode_frame(b"rpc") + encode_frame(b"payload"))
    client.send(client.new_stream(unidirectional=True), hello())
    client.datagram(b"\x01membership")
    closed = await client.closed_with()
    assert closed.error_code == CloseCode.UNAUTHENTICATED, closed
    assert reason in closed.reason_phrase
    assert client.received_data == []  # nothing but the close was written to it
    assert server.saw_nothing  # nothing it sent was read
    assert server.transport.peers() == []


async def test_a_client_without_a_certificate_is_refused(
    start_node: StartNode, cluster: Cluster
) -> None:
    server = await start_node(cluster.credentials("a"))
    async with raw_client(server.address) as client:
        await assert_refused_with_nothing_exchanged(server, client, "none was presented")


async def test_a_self_signed_certificate_is_refused(
    start_node: StartNode, cluster: Cluster
) -> None:
    server = await start_node(cluster.credentials("a"))
    cert, key = self_signed("b")
    async with raw_client(server.address, certificate=cert, key=key) as client:
        await assert_refused_with_nothing_exchanged(server, client, "not issued by cluster 'c1'")


async def test_another_clusters_certificate_is_refused(
    start_node: StartNode, cluster: Cluster
) -> None:
    server = await start_node(cluster.credentials("a"))
    impostor = Cluster.new("c1").credentials("b")  # same names, another root key
    async with raw_client(server.address, credentials=impostor) as client:
        await assert_refused_with_nothing_exchanged(server, client, "not issued by cluster 'c1'")


async def test_an_expired_certificate_is_refused(start_node: StartNode, cluster: Cluster) -> None:
    server = await start_node(cluster.credentials("a"))
    old = cluster.credentials("b", issued=datetime.now(UTC) - timedelta(days=400))
    async with raw_client(server.address, credentials=old) as client:
        await assert_refused_with_nothing_exchanged(server, client, "expired")


async def test_a_revoked_node_is_refused(start_node: StartNode, cluster: Cluster) -> None:
    server = await start_node(cluster.credentials("a"), is_revoked=lambda name, _s: name == "b")
    async with raw_client(server.address, credentials=cluster.credentials("b")) as client:
        await assert_refused_with_nothing_exchanged(server, client, "'b' has been revoked")


async def test_a_certificate_without_its_key_fails_the_handshake(
    start_node: StartNode, cluster: Cluster
) -> None:
    server = await start_node(cluster.credentials("a"))
    genuine = cluster.credentials("b")
    thief = Ed25519PrivateKey.generate()
    async with raw_client(server.address, certificate=genuine.certificate, key=thief) as client:
        closed = await client.closed_with()
    assert closed.error_code != CloseCode.NO_ERROR  # a TLS alert: the signature did not verify
    assert client.received_data == [] and server.saw_nothing


async def test_our_client_refuses_servers_outside_the_cluster(
    start_node: StartNode, cluster: Cluster
) -> None:
    client = await start_node(cluster.credentials("a"))
    foreign = await start_node(Cluster.new("c1").credentials("b"))
    expired = await start_node(
        cluster.credentials("c", issued=datetime.now(UTC) - timedelta(days=400))
    )
    # Inside the TLS handshake, so our certificate is never sent to them.
    with pytest.raises(ConnectionRefused, match="local issuer"):
        await client.transport.connect(foreign.address)
    with pytest.raises(ConnectionRefused, match="no longer valid"):
        await client.transport.connect(expired.address)
    assert foreign.saw_nothing and expired.saw_nothing and client.saw_nothing


async def test_our_client_refuses_a_revoked_or_unexpected_server(
    start_node: StartNode, cluster: Cluster
) -> None:
    revoked = {"b"}
    client = await start_node(cluster.credentials("a"), is_revoked=lambda n, _s: n in revoked)
    b = await start_node(cluster.credentials("b"))
    c = await start_node(cluster.credentials("c"))
    with pytest.raises(ConnectionRefused, match="'b' has been revoked"):
        await client.transport.connect(b.address)
    with pytest.raises(ConnectionRefused, match="expected node 'b' but node 'c' answered"):
        await client.transport.connect(c.address, expected_peer="b")
    await eventually(lambda: b.transport.peers() == [] and c.transport.peers() == [], "cleanup")
    assert b.saw_nothing and c.saw_nothing and client.saw_nothing


async def test_a_node_does_not_connect_to_itself(start_node: StartNode, cluster: Cluster) -> None:
    a = await start_node(cluster.credentials("a"))
    with pytest.raises(ConnectionRefused, match="cannot connect to itself"):
        await a.transport.connect(a.address)


async def test_revoking_a_connected_node_closes_it(start_node: StartNode, cluster: Cluster) -> None:
    revoked: set[str] = set()
    a = await start_node(cluster.credentials("a"), is_revoked=lambda n, _s: n in revoked)
    b = await start_node(cluster.credentials("b"))
    await b.transport.connect(a.address)
    await eventually(lambda: a.transport.peers() == ["b"], "a to see b")
    assert a.transport.recheck_revocations() == []
    revoked.add("b")  # the Node resource was deleted
    assert a.transport.recheck_revocations() == ["b"]
    assert a.transport.peers() == []
    await eventually(lambda: ("a", False) in b.peer_events, "b to be dropped")
    with pytest.raises(ConnectionRefused, match="revoked"):
        await b.transport.connect(a.address)


# --- bad frames close only their connection -------------------------------------------------------


@contextmanager
def no_error_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    yield
    errors = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert not errors, [r.getMessage() for r in errors]


@asynccontextmanager
async def member(
    server: Node, credentials: identity.NodeCredentials
) -> AsyncIterator[RecordingProtocol]:
    """A plain aioquic client with a valid certificate that says hello, then misbehaves."""
    instance = secrets.token_hex(16)
    async with raw_client(server.address, credentials=credentials) as client:
        client.send(client.new_stream(unidirectional=True), hello(instance))
        await eventually(
            lambda: (
                (p := server.transport.peer(credentials.node_name)) is not None
                and p.instance == instance
            ),
            "the member to be accepted",
        )
        yield client


async def still_serves(server: Node, good: Node) -> None:
    """The server still takes messages and streams from the good peer."""
    token = secrets.token_bytes(8)
    good.transport.send(server.transport.name, 5, token)
    while (message := await server.message()) != (good.transport.name, 5, token):
        assert message[0] != good.transport.name, message  # others' messages may come first
    stream = await good.transport.open_stream(server.transport.name, "echo")
    await stream.write_frame(b"yes")
    assert await stream.read_frame() == b"yes"


@pytest.mark.parametrize(
    ("misbehave", "reason"),
    [
        (lambda c: c.send(c.new_stream(), b"\xff\xff\xff\xff"), "exceeds the limit"),
        (lambda c: c.send(c.new_stream(), encode_frame(b"BAD KIND")), "invalid kind"),
        (
            lambda c: c.send(c.new_stream(), encode_frame(b"rpc") + b"\x00\x00\x00\x09ab", True),
            "middle",
        ),
        (lambda c: c.send(c.new_stream(unidirectional=True), hello()), "second control stream"),
        (lambda c: c.send(2, encode_frame(b""), False), "empty message"),
        (lambda c: c.datagram(b""), "empty datagram"),
        (lambda c: c.send(c.new_stream(), b"", True), "ended before its header"),
        (
            lambda c: c.send(2, b"\x00\x20\x00\x00", False),  # a 2 MiB message
            "exceeds the limit",
        ),
    ],
)
async def test_a_bad_frame_closes_only_that_connection(
    start_node: StartNode,
    cluster: Cluster,
    caplog: pytest.LogCaptureFixture,
    misbehave: Callable[[RecordingProtocol], None],
    reason: str,
) -> None:
    server = await start_node(cluster.credentials("s"))
    good = await start_node(cluster.credentials("g"))
    await good.transport.connect(server.address)
    with no_error_logs(caplog):
        async with member(server, cluster.credentials("m")) as bad:
            misbehave(bad)
            closed = await bad.closed_with()
        assert closed.error_code == CloseCode.PROTOCOL_ERROR
        assert reason in closed.reason_phrase
        await still_serves(server, good)
    assert good.peer_events == [("s", True)]  # the good peer's connection never dropped


async def test_a_stream_opened_before_the_hello_waits_for_it(
    start_node: StartNode, cluster: Cluster
) -> None:
    server = await start_node(cluster.credentials("s"))
    async with raw_client(server.address, credentials=cluster.credentials("m")) as client:
        stream = client.new_stream()
        client.send(stream, encode_frame(b"rpc") + encode_frame(b"early"))
        # A ping answered: the server has processed the stream, and holds it for now.
        await asyncio.wait_for(client.ping(), WAIT)
        assert server.streams == [] and server.transport.peers() == []
        client.send(client.new_stream(unidirectional=True), hello())
        await eventually(
            lambda: any(
                isinstance(e, events.StreamDataReceived)
                and e.stream_id == stream
                and e.data == encode_frame(b"early")
                for e in client.events
            ),
            "the echo",
        )
    assert server.streams == [("m", "rpc")]


async def test_udp_garbage_is_ignored(start_node: StartNode, cluster: Cluster) -> None:
    server = await start_node(cluster.credentials("s"))
    good = await start_node(cluster.credentials("g"))
    await good.transport.connect(server.address)
    loop = asyncio.get_running_loop()
    sender, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, remote_addr=server.address
    )
    try:
        for data in GARBAGE:
            sender.sendto(data)
        await still_serves(server, good)
    finally:
        sender.close()
    # Garbage that looked like an Initial never became a peer.
    await eventually(lambda: server.transport.peers() == ["g"], "only the good peer")


GARBAGE = [
    b"",
    b"\x00",
    b"\xff" * 20,
    bytes(1200),
    b"\xc0\x00\x00\x00\x01\x08" + bytes(1300),  # an Initial header, then zeros
    b"\xc0\x00\x00\x00\x01\x08" + secrets.token_bytes(1400),
    b"\x40" + secrets.token_bytes(100),  # a short header for an unknown connection
    secrets.token_bytes(1500),
    *[secrets.token_bytes(n) for n in (1, 7, 40, 1199, 1200, 1201, 9000)],
]


async def test_a_bad_hello_closes_the_connection(start_node: StartNode, cluster: Cluster) -> None:
    server = await start_node(cluster.credentials("s"))
    async with raw_client(server.address, credentials=cluster.credentials("m")) as bad:
        bad.send(bad.new_stream(unidirectional=True), encode_frame(b'{"v": 2}'))
        closed = await bad.closed_with()
    assert closed.error_code == CloseCode.PROTOCOL_ERROR and "hello" in closed.reason_phrase
    assert server.saw_nothing


async def test_a_peer_that_is_not_read_cannot_fill_our_memory(
    start_node: StartNode, cluster: Cluster
) -> None:
    stuck = asyncio.Event()

    async def never_reads(peer: str, kind: str, stream: FramedStream) -> None:
        await stuck.wait()

    config = TransportConfig(max_buffered_bytes=256 * 1024)
    server = await start_node(cluster.credentials("s"), handler=never_reads, config=config)
    good = await start_node(cluster.credentials("g"))
    flood = await start_node(cluster.credentials("f"))
    await good.transport.connect(server.address)
    await flood.transport.connect(server.address)
    stream = await flood.transport.open_stream("s", "flood")
    with pytest.raises(StreamClosed):
        for _ in range(64):
            await stream.write_frame(bytes(64 * 1024))
        await stream.read_frame()
    await eventually(lambda: ("s", False) in flood.peer_events, "the flood to be cut")
    good.transport.send("s", 1, b"fine")
    assert await server.message() == ("g", 1, b"fine")
    stuck.set()


@dataclass
class FuzzSetup:
    server: Node
    good: Node
    bad: identity.NodeCredentials


@pytest.fixture
async def fuzz_setup(start_node: StartNode, cluster: Cluster) -> FuzzSetup:
    # Function-scoped, so shared by all of one test's hypothesis examples: one server, one good
    # peer, and a fresh misbehaving connection per example.
    server = await start_node(cluster.credentials("s"))
    good = await start_node(cluster.credentials("g"))
    await good.transport.connect(server.address)
    return FuzzSetup(server, good, cluster.credentials("m"))


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    header=st.binary(max_size=80) | st.just(encode_frame(b"rpc")),
    body=st.binary(max_size=3000),
    control=st.binary(max_size=200),
    datagram=st.none() | st.binary(max_size=300),
    fin=st.booleans(),
)
async def test_fuzzed_frames_never_break_the_node(
    fuzz_setup: FuzzSetup,
    header: bytes,
    body: bytes,
    control: bytes,
    datagram: bytes | None,
    fin: bool,
) -> None:
    async with member(fuzz_setup.server, fuzz_setup.bad) as bad:
        bad.send(2, control)  # more on the control stream, after the hello
        if datagram is not None:
            bad.datagram(datagram)
        bad.send(bad.new_stream(), header + body, fin)
        # Whatever the bytes were, the node served them or closed this connection; a ping
        # answered means it has processed everything sent before.
        try:
            await asyncio.wait_for(bad.ping(), WAIT)
        except ConnectionError:
            assert bad.terminated.done()
    await still_serves(fuzz_setup.server, fuzz_setup.good)
    assert fuzz_setup.good.peer_events == [("s", True)]


@given(st.lists(st.binary(max_size=300), max_size=8), st.integers(min_value=1, max_value=50))
def test_frame_decoder_reassembles_any_split(frames: list[bytes], step: int) -> None:
    wire = b"".join(encode_frame(f) for f in frames)
    decoder = FrameDecoder(max_size=300)
    out: list[bytes] = []
    for i in range(0, len(wire), step):
        out.extend(decoder.feed(wire[i : i + step]))
    decoder.end()
    assert out == frames


@given(st.binary(max_size=500))
def test_frame_decoder_fuzz_only_raises_frame_errors(data: bytes) -> None:
    decoder = FrameDecoder(max_size=64, first_max_size=8)
    try:
        for frame in decoder.feed(data):
            assert len(frame) <= 64
        decoder.end()
    except FrameError:
        pass


# --- enrolment ------------------------------------------------------------------------------------


class Ledger:
    def __init__(self) -> None:
        self.used: set[str] = set()
        self.admitted: list[str] = []

    def record(self, claims: tokens.TokenClaims, name: str, cert: x509.Certificate) -> None:
        self.used.add(claims.token_id)
        self.admitted.append(name)


@dataclass
class Admitting:
    node: Node
    ledger: Ledger
    credentials: identity.NodeCredentials

    def token(self, ttl: timedelta = timedelta(minutes=10), now: datetime | None = None) -> str:
        assert self.credentials.root_key is not None
        return tokens.create_token(
            self.credentials.root_key,
            cluster=self.credentials.cluster_name,
            addresses=[self.node.address],
            ttl=ttl,
            now=now or datetime.now(UTC),
        )


async def admitting_node(
    start_node: StartNode, data_dir: Path, clock: Callable[[], datetime] | None = None, **kw: Any
) -> Admitting:
    identity.init_data_dir(data_dir, cluster_name="c1", node_name="seed")
    credentials = identity.load_credentials(data_dir)
    assert credentials.root_key is not None
    ledger = Ledger()
    admitter = tokens.Admitter(
        credentials.root_key,
        credentials.ca_certificate,
        used=ledger.used.__contains__,
        on_admitted=ledger.record,
    )
    extra: dict[str, Any] = {"clock": clock} if clock else {}
    node = await start_node(credentials, admitter=admitter, **extra, **kw)
    return Admitting(node, ledger, credentials)


async def test_enrolment_yields_a_certificate_that_authenticates(
    start_node: StartNode, tmp_path: Path
) -> None:
    seed = await admitting_node(start_node, tmp_path / "seed")
    joined = await mt.join_data_dir(tmp_path / "n2", seed.token(), "n2")
    assert joined.node_name == "n2" and joined.cluster_name == "c1" and not joined.can_admit
    assert seed.ledger.admitted == ["n2"]
    n2 = await start_node(identity.load_credentials(tmp_path / "n2"))
    conn = await n2.transport.connect(seed.node.address, expected_peer="seed")
    n2.transport.send("seed", 1, b"hello from n2")
    assert await seed.node.message() == ("n2", 1, b"hello from n2")
    assert conn.certificate is not None
    # Enrolment connections never show up as peers.
    assert seed.node.peer_events == [("n2", True)]


async def test_a_token_is_spent_once(start_node: StartNode, tmp_path: Path) -> None:
    seed = await admitting_node(start_node, tmp_path / "seed")
    token = seed.token()
    await mt.join_data_dir(tmp_path / "n2", token, "n2")
    with pytest.raises(
        tokens.EnrolmentError, match="refused: the join token has already been used"
    ):
        await mt.join_data_dir(tmp_path / "n3", token, "n3")
    assert not (tmp_path / "n3").exists()
    assert seed.ledger.admitted == ["n2"]


async def test_an_expired_token_is_refused_before_dialling(
    start_node: StartNode, tmp_path: Path
) -> None:
    seed = await admitting_node(start_node, tmp_path / "seed")
    token = seed.token(now=datetime.now(UTC) - timedelta(hours=2), ttl=timedelta(hours=1))
    with pytest.raises(tokens.TokenError, match="expired"):
        await mt.join_data_dir(tmp_path / "n2", token, "n2")
    assert not (tmp_path / "n2").exists()
    assert seed.ledger.admitted == []


async def test_the_admitting_node_checks_expiry_with_its_own_clock(
    start_node: StartNode, tmp_path: Path
) -> None:
    seed = await admitting_node(
        start_node, tmp_path / "seed", clock=lambda: datetime.now(UTC) + timedelta(hours=2)
    )
    with pytest.raises(tokens.EnrolmentError, match="refused: the join token expired"):
        await mt.join_data_dir(tmp_path / "n2", seed.token(ttl=timedelta(hours=1)), "n2")
    assert not (tmp_path / "n2").exists()
    assert seed.ledger.admitted == [] and seed.ledger.used == set()


async def test_a_forged_token_is_refused_by_the_admitting_node(
    start_node: StartNode, tmp_path: Path
) -> None:
    seed = await admitting_node(start_node, tmp_path / "seed")
    genuine = seed.token()
    claims = tokens.verify_token(genuine, datetime.now(UTC))
    forged = genuine[:-4] + ("AAAA" if not genuine.endswith("AAAA") else "BBBB")
    # A hand-made joiner that skips its own check of the token.
    answer = await mt._enrol_at(
        *seed.node.address,
        claims,
        forged,
        "n2",
        Ed25519PrivateKey.generate(),
        WAIT,
        lambda: datetime.now(UTC),
        1200,
    )
    with pytest.raises(tokens.EnrolmentError, match="signature is invalid"):
        tokens.decode_answer(answer)
    assert seed.ledger.admitted == []


async def test_a_joiner_shows_its_token_only_to_the_tokens_cluster(
    start_node: StartNode, tmp_path: Path
) -> None:
    seed = await admitting_node(start_node, tmp_path / "seed")
    impostor = await admitting_node(start_node, tmp_path / "impostor")  # another cluster "c1"
    assert seed.credentials.root_key is not None
    token = tokens.create_token(
        seed.credentials.root_key,
        cluster="c1",
        addresses=[impostor.node.address, seed.node.address],
        ttl=timedelta(minutes=5),
        now=datetime.now(UTC),
    )
    result = await mt.enrol(token, "n2")
    assert "is not a node of cluster 'c1'" in result.errors[0]
    assert impostor.ledger.admitted == [] and seed.ledger.admitted == ["n2"]


async def test_nodes_without_the_root_key_do_not_offer_enrolment(
    start_node: StartNode, tmp_path: Path, cluster: Cluster
) -> None:
    plain = await start_node(cluster.credentials("plain"))
    token = tokens.create_token(
        cluster.root,
        cluster="c1",
        addresses=[plain.address],
        ttl=timedelta(minutes=5),
        now=datetime.now(UTC),
    )
    with pytest.raises(tokens.EnrolmentError, match="no node of the join token could admit"):
        await mt.join_data_dir(tmp_path / "n2", token, "n2")
    assert not (tmp_path / "n2").exists()
    assert plain.saw_nothing


async def test_join_refuses_an_initialised_data_dir_before_dialling(tmp_path: Path) -> None:
    identity.init_data_dir(tmp_path / "d", cluster_name="c1", node_name="n1")
    with pytest.raises(identity.IdentityError, match="already holds a node"):
        await mt.join_data_dir(tmp_path / "d", "pollen1.not.checked", "n2")


@pytest.mark.parametrize(
    ("misbehave", "reason"),
    [
        (lambda c: c.send(c.new_stream(), b"hello"), "only the enrolment exchange"),
        (lambda c: c.datagram(b"x"), "only the enrolment exchange"),
        (lambda c: c.send(1, b"\x00\x01\x00\x00"), "exceeds the limit"),
        (lambda c: c.send(1, encode_frame(b"{}") * 2), "more than one"),
    ],
)
async def test_before_admission_only_the_enrolment_exchange_is_served(
    start_node: StartNode,
    tmp_path: Path,
    misbehave: Callable[[RecordingProtocol], None],
    reason: str,
) -> None:
    seed = await admitting_node(start_node, tmp_path / "seed")
    async with raw_client(seed.node.address, alpn=ALPN_ENROL) as client:
        await eventually(lambda: client.received_data, "the challenge")
        misbehave(client)
        closed = await client.closed_with()
    assert closed.error_code == CloseCode.PROTOCOL_ERROR and reason in closed.reason_phrase
    assert seed.ledger.admitted == [] and seed.node.saw_nothing


async def test_an_idle_enrolment_is_cut_off(start_node: StartNode, tmp_path: Path) -> None:
    seed = await admitting_node(
        start_node, tmp_path / "seed", config=TransportConfig(enrol_timeout=0.3)
    )
    async with raw_client(seed.node.address, alpn=ALPN_ENROL) as client:
        closed = await client.closed_with()
    assert closed.error_code == CloseCode.TIMEOUT


async def test_an_enrolment_cannot_reach_the_mesh(start_node: StartNode, tmp_path: Path) -> None:
    # Without a certificate, the mesh protocol is refused and enrolment serves nothing else.
    seed = await admitting_node(start_node, tmp_path / "seed")
    async with raw_client(seed.node.address, alpn=ALPN_MESH) as client:
        client.send(client.new_stream(unidirectional=True), hello())
        closed = await client.closed_with()
    assert closed.error_code == CloseCode.UNAUTHENTICATED
    assert seed.node.saw_nothing
