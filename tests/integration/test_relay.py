"""Relayed streams between MeshService instances over real QUIC on 127.0.0.1.

On loopback every node can reach every other, so these tests ask for the relay explicitly
(``open_stream(..., via=...)``); the netns tests cut the direct route for real and check that
the relay is chosen by itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pollen.mesh import identity, pki
from pollen.mesh.relay import RELAY_KIND, RelayAnswer, RelayRequest
from pollen.mesh.service import MeshService
from pollen.mesh.sync import LocalDocument
from pollen.mesh.transport import FramedStream, PeerUnavailable, StreamClosed
from pollen.state.document import StateDocument
from tests.helpers import wait_until

pytestmark = pytest.mark.integration


async def echo(peer: str, stream: FramedStream) -> None:
    async for frame in stream:
        await stream.write_frame(peer.encode() + b":" + frame)


async def fail_after_one(peer: str, stream: FramedStream) -> None:
    await stream.read_frame()
    raise RuntimeError("the handler broke on purpose")


Mesh = dict[str, MeshService]


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    """Nodes a, b and c of one cluster, all alive in every view; c serves ``echo`` streams."""
    root = Ed25519PrivateKey.generate()
    ca = pki.create_ca_certificate(root, "c1", datetime.now(UTC))
    services: Mesh = {}
    for name in ("a", "b", "c"):
        key = Ed25519PrivateKey.generate()
        cert = pki.issue_node_certificate(
            root, ca, name, key.public_key(), datetime.now(UTC), pki.NODE_VALIDITY
        )
        credentials = identity.NodeCredentials("c1", name, key, cert, ca, None)
        service = MeshService(credentials, LocalDocument(StateDocument.new()))
        await service.start()
        services[name] = service
    services["c"].handle_streams("echo", echo)
    services["c"].handle_streams("broken", fail_after_one)
    try:
        for name in ("b", "c"):
            await services[name].join([services["a"].transport.bound_address])
        await wait_until(
            lambda: all(s.alive() == ["a", "b", "c"] for s in services.values()),
            15.0,
            "every node to see every node alive",
        )
        yield services
    finally:
        for service in services.values():
            await service.stop()


async def test_a_stream_goes_through_the_relay_both_ways(mesh: Mesh) -> None:
    opened = await mesh["a"].open_stream("c", "echo", via="b")
    assert (opened.peer, opened.via) == ("c", "b")
    big = bytes(range(256)) * 4096  # 1 MiB: several QUIC flow-control windows
    for payload in (b"one", big, b"three"):
        await opened.stream.write_frame(payload)
        # c sees the origin a, not the relay b.
        assert await opened.stream.read_frame() == b"a:" + payload
    await opened.stream.finish()
    assert await opened.stream.read_frame() is None


async def test_direct_streams_are_used_when_there_is_a_route(mesh: Mesh) -> None:
    opened = await mesh["a"].open_stream("c", "echo")
    assert opened.via is None
    await opened.stream.write_frame(b"hi")
    assert await opened.stream.read_frame() == b"a:hi"
    await opened.stream.finish()


@pytest.mark.parametrize(
    ("target", "kind", "reason"),
    [
        ("c", "nothing-here", "serves no 'nothing-here' streams"),
        ("ghost", "echo", "ghost is not an alive member"),
        ("b", "echo", "or to itself"),
        ("c", "gossip", "is not relayed"),
        ("c", "relay", "is not relayed"),
    ],
)
async def test_a_relay_refuses_with_a_reason(
    mesh: Mesh, target: str, kind: str, reason: str
) -> None:
    with pytest.raises(PeerUnavailable, match=reason):
        await mesh["a"].open_stream(target, kind, via="b")
    # The relay keeps relaying.
    opened = await mesh["a"].open_stream("c", "echo", via="b")
    await opened.stream.write_frame(b"still")
    assert await opened.stream.read_frame() == b"a:still"


async def test_a_relay_does_not_send_a_stream_back_to_its_origin(mesh: Mesh) -> None:
    stream = await mesh["a"].transport.open_stream("b", RELAY_KIND)
    await stream.write_frame(RelayRequest("a", "echo").encode())
    reply = await stream.read_frame()
    assert reply is not None
    assert "back to its origin" in (RelayAnswer.decode(reply).error or "")


async def test_a_target_that_fails_resets_the_origin_stream(mesh: Mesh) -> None:
    opened = await mesh["a"].open_stream("c", "broken", via="b")
    await opened.stream.write_frame(b"x")
    with pytest.raises(StreamClosed):
        await opened.stream.read_frame()


async def test_an_origin_that_resets_frees_the_relay(mesh: Mesh) -> None:
    opened = await mesh["a"].open_stream("c", "echo", via="b")
    await opened.stream.write_frame(b"x")
    assert await opened.stream.read_frame() == b"a:x"
    opened.stream.reset()
    await wait_until(lambda: mesh["b"]._relaying == 0, 15.0, "the relay to drop the spliced stream")


@pytest.mark.parametrize(
    "frame",
    [b"", b"not json", b"[1]", b'{"to": "c"}', b'{"to": "C", "kind": "echo"}', b"\xff" * 2000],
)
async def test_a_garbled_relay_request_gets_an_error_answer(mesh: Mesh, frame: bytes) -> None:
    stream = await mesh["a"].transport.open_stream("b", RELAY_KIND)
    await stream.write_frame(frame)
    reply = await stream.read_frame()
    assert reply is not None
    answer = RelayAnswer.decode(reply)
    assert not answer.ok and "bad relay request" in (answer.error or "")
    opened = await mesh["a"].open_stream("c", "echo", via="b")
    await opened.stream.write_frame(b"after")
    assert await opened.stream.read_frame() == b"a:after"


async def test_streams_to_oneself_are_refused(mesh: Mesh) -> None:
    with pytest.raises(ValueError, match="itself"):
        await mesh["a"].open_stream("a", "echo")


async def test_mesh_kinds_cannot_be_taken_by_handlers(mesh: Mesh) -> None:
    handler: Callable[[str, FramedStream], Awaitable[None]] = echo
    for kind in ("gossip", "relay", "relayed"):
        with pytest.raises(ValueError, match="the mesh's own"):
            mesh["a"].handle_streams(kind, handler)
