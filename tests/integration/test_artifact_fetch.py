"""Artifact fetch between MeshService instances over real QUIC (and the TLS bulk path) on
127.0.0.1.

Three nodes a, b and c, each with its own store, serving artifacts from it on mesh streams and
on its bulk port; holdings travel in membership meta. Where a test needs a holder to misbehave
(lie, stall, be cut off), it replaces that node's ``artifact`` stream handler with a hostile
one that speaks the protocol by hand and announces no bulk port, so every chunk comes through
it: a peer, not our code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pollen.mesh import bulk, identity, pki, wire
from pollen.mesh.bulk import BulkServer, BulkTls
from pollen.mesh.fetch import (
    ARTIFACT_STREAM,
    ArtifactFetcher,
    ArtifactServer,
    ArtifactUnavailable,
    FetchAnswer,
    FetchRequest,
)
from pollen.mesh.service import MeshService, StreamHandler
from pollen.mesh.sync import LocalDocument
from pollen.mesh.transport import FramedStream, StreamClosed
from pollen.runtime.artifacts import (
    MANIFEST_CHUNK_BYTES,
    ArtifactStore,
    ArtifactTooLarge,
    Manifest,
    sha256_digest,
)
from pollen.state.document import StateDocument
from tests.helpers import wait_until

pytestmark = pytest.mark.integration

# Three frames and a bit: the transfer spans several data frames and flow-control windows.
DATA = os.urandom(3 * 1024 * 1024 + 17)
DIGEST = sha256_digest(DATA)
# Four chunks, the last one short: enough to spread over holders and to cut off half way.
BIG = os.urandom(3 * MANIFEST_CHUNK_BYTES + 1000)


@dataclass
class Peer:
    """One node of the test mesh: its mesh service, store and artifact server."""

    mesh: MeshService
    store: ArtifactStore
    server: ArtifactServer
    tls: BulkTls
    bulk: BulkServer


Mesh = dict[str, Peer]


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    root = Ed25519PrivateKey.generate()
    ca = pki.create_ca_certificate(root, "c1", datetime.now(UTC))
    loop = asyncio.get_running_loop()
    peers: Mesh = {}
    try:
        for name in ("a", "b", "c"):
            key = Ed25519PrivateKey.generate()
            cert = pki.issue_node_certificate(
                root, ca, name, key.public_key(), datetime.now(UTC), pki.NODE_VALIDITY
            )
            credentials = identity.NodeCredentials("c1", name, key, cert, ca, None)
            store = ArtifactStore(tmp_path / name)
            service = MeshService(
                credentials,
                LocalDocument(StateDocument.new()),
                held_artifacts=functools.partial(store.recent, wire.MAX_ARTIFACTS),
            )
            announce_changes(store, service, loop)
            await service.start()
            tls = BulkTls(credentials, service.transport.verify_peer)
            bulk_port: list[int] = []
            server = ArtifactServer(store, name, bulk_port=lambda port=bulk_port: port[0])
            bulk_server = BulkServer(tls, server.serve_bulk)
            bulk_port.append(await bulk_server.start())
            service.handle_streams(ARTIFACT_STREAM, server.serve)
            peers[name] = Peer(service, store, server, tls, bulk_server)
        for name in ("b", "c"):
            await peers[name].mesh.join([peers["a"].mesh.transport.bound_address])
        await wait_until(
            lambda: all(p.mesh.alive() == ["a", "b", "c"] for p in peers.values()),
            15.0,
            "every node to see every node alive",
        )
        yield peers
    finally:
        for peer in peers.values():
            await peer.bulk.close()
            await peer.mesh.stop()


def announce_changes(
    store: ArtifactStore, service: MeshService, loop: asyncio.AbstractEventLoop
) -> None:
    """Wire the store's changes to the mesh's meta, as the node does."""

    def changed() -> None:
        loop.call_soon_threadsafe(service.meta_changed)

    store.on_change = changed


def fetcher_on(
    mesh: Mesh, name: str, distances: dict[str, float] | None = None, **options: Any
) -> ArtifactFetcher:
    """A fetcher on ``name`` using the bulk path; ``distances`` stand in for Vivaldi, which
    loopback cannot rank."""
    peer = mesh[name]
    if distances is not None:
        options["distance"] = distances.get
    options.setdefault("bulk", peer.tls)
    return ArtifactFetcher(peer.mesh, peer.store, **options)


def advertised(mesh: Mesh, observer: str, holder: str, digest: str) -> Callable[[], bool]:
    def check() -> bool:
        member = mesh[observer].mesh.members().get(holder)
        return member is not None and digest in member.meta.artifacts

    return check


async def hold(mesh: Mesh, data: bytes, *names: str, observer: str = "a") -> str:
    """Store ``data`` on ``names`` and wait until ``observer`` sees them advertise it."""
    digest = ""
    for name in names:
        digest = mesh[name].store.put(data)
    for name in names:
        await wait_until(advertised(mesh, observer, name, digest), 15.0, f"{name} to advertise")
    return digest


async def test_holdings_travel_in_membership_meta(mesh: Mesh) -> None:
    digest = await hold(mesh, DATA, "b")
    await wait_until(advertised(mesh, "c", "b", digest), 15.0, "c to learn that b holds it")
    mesh["b"].store.remove(digest)
    await wait_until(
        lambda: not advertised(mesh, "a", "b", digest)(), 15.0, "b to stop advertising"
    )


async def test_only_the_most_recently_used_are_announced(mesh: Mesh) -> None:
    store = mesh["b"].store
    digests = [store.put(i.to_bytes(4, "big")) for i in range(wire.MAX_ARTIFACTS + 6)]
    store.read(digests[0])  # used just now: it must be among those announced
    announced = await wait_until(
        lambda: (
            len(mesh["a"].mesh.members()["b"].meta.artifacts) == wire.MAX_ARTIFACTS
            and mesh["a"].mesh.members()["b"].meta.artifacts
        ),
        15.0,
        "b to announce a full list",
    )
    assert isinstance(announced, tuple)
    assert digests[0] in announced
    assert not set(digests[1:7]) & set(announced)  # the oldest, unused, are left out


async def test_fetch_from_the_closest_holder(mesh: Mesh) -> None:
    digest = await hold(mesh, DATA, "b", "c")
    fetcher = fetcher_on(mesh, "a", {"b": 0.050, "c": 0.001})
    assert fetcher.holders(digest) == ["c", "b"]
    path = await fetcher.ensure(digest)
    assert path.read_bytes() == DATA
    # One chunk: it comes from the nearest holder alone, over the bulk path.
    assert (mesh["c"].server.chunks_served, mesh["b"].server.chunks_served) == (1, 0)
    record = fetcher.history[-1]
    assert record.holder == "c" and record.size == len(DATA) and record.sources == ("c",)
    assert record.bulk and record.transferred == len(DATA) and record.resumed == 0
    # Held now: a second ensure fetches nothing.
    assert await fetcher.ensure(digest) == path
    assert mesh["c"].server.chunks_served == 1
    # And the other way round.
    other = await hold(mesh, b"\0asm other", "b", "c")
    await fetcher_on(mesh, "a", {"b": 0.001, "c": 0.050}).ensure(other)
    assert mesh["b"].server.chunks_served == 1


async def test_unknown_distances_come_last(mesh: Mesh) -> None:
    digest = await hold(mesh, DATA, "b", "c")
    assert fetcher_on(mesh, "a", {"c": 0.2}).holders(digest) == ["c", "b"]
    assert fetcher_on(mesh, "a", {"b": 0.2}).holders(digest) == ["b", "c"]


async def test_a_holder_whose_copy_was_tampered_with_is_left_for_the_next(mesh: Mesh) -> None:
    digest = await hold(mesh, DATA, "b", "c")
    tampered = mesh["c"].store.path(digest)
    raw = bytearray(tampered.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    tampered.write_bytes(raw)  # in place: same name, same inode
    fetcher = fetcher_on(mesh, "a", {"b": 0.050, "c": 0.001})
    path = await fetcher.ensure(digest)
    assert path.read_bytes() == DATA
    assert fetcher.history[-1].holder == "b"
    # c noticed when asked for the manifest (its file changed since it was last hashed),
    # refused, dropped its copy and no longer advertises it.
    assert mesh["c"].server.chunks_served == 0
    assert not mesh["c"].store.has(digest)
    await wait_until(
        lambda: not advertised(mesh, "a", "c", digest)(), 15.0, "c to stop advertising"
    )


def manifest_of(data: bytes) -> Manifest:
    """The manifest an honest holder of ``data`` gives."""
    chunk = MANIFEST_CHUNK_BYTES
    hashes = tuple(
        hashlib.sha256(data[offset : offset + chunk]).digest()
        for offset in range(0, len(data), chunk)
    )
    return Manifest(len(data), chunk, hashes)


ChunkSender = Callable[[int, bytes, FramedStream], Awaitable[None]]


async def send_whole(index: int, chunk: bytes, stream: FramedStream) -> None:
    for offset in range(0, len(chunk), 1 << 20):
        await stream.write_frame(chunk[offset : offset + (1 << 20)])


def by_hand(data: bytes, send: ChunkSender = send_whole) -> StreamHandler:
    """A holder of ``data`` speaking the protocol by hand, with no bulk port: an honest
    manifest, then each chunk asked for sent by ``send`` (which may misbehave)."""
    manifest = manifest_of(data)

    async def serve(origin: str, stream: FramedStream) -> None:
        frame = await stream.read_frame()
        assert frame is not None
        request = FetchRequest.decode(frame)
        if request.manifest:
            answer = FetchAnswer(size=manifest.size, chunk=manifest.chunk)
            await stream.write_frame(answer.encode())
            await stream.write_frame(b"".join(manifest.hashes))
            return
        assert request.chunk is not None
        offset, length = manifest.span(request.chunk)
        await stream.write_frame(FetchAnswer(size=len(data), length=length).encode())
        await send(request.chunk, data[offset : offset + length], stream)

    return serve


def liar(data: bytes, only: int | None = None) -> StreamHandler:
    """A holder that sends chunks with one bit flipped half way through (chunk ``only``, or
    every chunk)."""

    async def flipped(index: int, chunk: bytes, stream: FramedStream) -> None:
        if only is None or index == only:
            wrong = bytearray(chunk)
            wrong[len(wrong) // 2] ^= 0x01
            chunk = bytes(wrong)
        await send_whole(index, chunk, stream)

    return by_hand(data, flipped)


async def test_a_holder_that_sends_wrong_bytes_is_penalised(mesh: Mesh) -> None:
    digest = await hold(mesh, DATA, "b", "c")
    mesh["c"].mesh.handle_streams(ARTIFACT_STREAM, liar(DATA))
    fetcher = fetcher_on(mesh, "a", {"b": 0.050, "c": 0.001})
    path = await fetcher.ensure(digest)
    assert path.read_bytes() == DATA
    assert fetcher.history[-1].holder == "b" and fetcher.history[-1].sources == ("b",)
    assert set(fetcher.penalised()) == {"c"}
    # Skipped for a while: another artifact c holds is fetched from b straight away.
    assert fetcher.holders(digest) == ["b"]
    assert not list(mesh["a"].store.directory.glob(".incoming-*"))
    assert not list(mesh["a"].store.directory.glob(".partial-*"))


async def test_a_penalty_ends(mesh: Mesh) -> None:
    digest = await hold(mesh, DATA, "b", "c")
    mesh["c"].mesh.handle_streams(ARTIFACT_STREAM, liar(DATA))
    now = [1000.0]
    a = mesh["a"]
    distances = {"b": 0.050, "c": 0.001}
    fetcher = ArtifactFetcher(a.mesh, a.store, distance=distances.get, clock=lambda: now[0])
    await fetcher.ensure(digest)
    assert fetcher.holders(digest) == ["b"]
    now[0] += 61
    assert fetcher.holders(digest) == ["c", "b"]


def cut_off(data: bytes, how: str, mesh: Mesh) -> StreamHandler:
    """A holder that sends half a chunk, then resets the stream, ends it early or drops the
    connection."""

    async def half(index: int, chunk: bytes, stream: FramedStream) -> None:
        await stream.write_frame(chunk[: 1 << 19])
        if how == "reset":
            raise RuntimeError("the holder broke mid-transfer")
        if how == "finish":
            return  # ends the stream early, cleanly
        mesh["c"].mesh.transport.close_peer(stream.peer, "pulled the plug mid-transfer")

    return by_hand(data, half)


@pytest.mark.parametrize("how", ["reset", "finish", "connection"])
async def test_a_holder_cut_off_mid_transfer(mesh: Mesh, how: str) -> None:
    digest = await hold(mesh, DATA, "b", "c")
    mesh["c"].mesh.handle_streams(ARTIFACT_STREAM, cut_off(DATA, how, mesh))
    fetcher = fetcher_on(mesh, "a", {"b": 0.050, "c": 0.001})
    path = await fetcher.ensure(digest)
    assert path.read_bytes() == DATA
    assert fetcher.history[-1].holder == "b"
    assert fetcher.penalised() == {}  # being cut off is bad luck, not a lie
    assert not list(mesh["a"].store.directory.glob(".incoming-*"))


async def test_a_silent_holder_is_given_up_on(mesh: Mesh) -> None:
    digest = await hold(mesh, DATA, "b", "c")
    stalled = asyncio.Event()

    async def silent(index: int, chunk: bytes, stream: FramedStream) -> None:
        await stream.write_frame(chunk[:1000])
        stalled.set()
        await asyncio.Event().wait()

    mesh["c"].mesh.handle_streams(ARTIFACT_STREAM, by_hand(DATA, silent))
    a = mesh["a"]
    fetcher = ArtifactFetcher(
        a.mesh, a.store, distance={"b": 0.050, "c": 0.001}.get, idle_timeout=0.5
    )
    assert (await fetcher.ensure(digest)).read_bytes() == DATA
    assert stalled.is_set() and fetcher.history[-1].holder == "b"


async def test_concurrent_ensures_share_one_transfer(mesh: Mesh) -> None:
    digest = await hold(mesh, DATA, "b", "c")
    fetcher = fetcher_on(mesh, "a")
    paths = await asyncio.gather(*(fetcher.ensure(digest) for _ in range(10)))
    assert len(set(paths)) == 1
    assert paths[0].read_bytes() == DATA
    assert mesh["b"].server.chunks_served + mesh["c"].server.chunks_served == 1
    assert len(fetcher.history) == 1


async def test_a_caller_giving_up_does_not_cancel_the_shared_fetch(mesh: Mesh) -> None:
    digest = await hold(mesh, DATA, "b")
    fetcher = fetcher_on(mesh, "a")
    impatient = asyncio.create_task(fetcher.ensure(digest))
    patient = asyncio.create_task(fetcher.ensure(digest))
    await asyncio.sleep(0)  # both are waiting on the one fetch
    impatient.cancel()
    assert (await patient).read_bytes() == DATA


async def test_nobody_holds_it(mesh: Mesh) -> None:
    fetcher = fetcher_on(mesh, "a")
    with pytest.raises(ArtifactUnavailable, match="no alive node advertises it") as info:
        await fetcher.ensure(DIGEST)
    assert info.value.attempts == ()
    with pytest.raises(ArtifactUnavailable):
        await fetcher.ensure(DIGEST, wait=0.2)  # waits a little, not forever


async def test_every_holder_failing_is_named(mesh: Mesh) -> None:
    digest = await hold(mesh, DATA, "b", "c")
    for name in ("b", "c"):
        mesh[name].mesh.handle_streams(ARTIFACT_STREAM, liar(DATA))
    fetcher = fetcher_on(mesh, "a", {"b": 0.050, "c": 0.001})
    with pytest.raises(ArtifactUnavailable) as info:
        await fetcher.ensure(digest)
    assert [a.holder for a in info.value.attempts] == ["c", "b"]
    assert "c: sent chunks (0) whose bytes do not match the digest" in str(info.value)
    assert not mesh["a"].store.has(digest)
    assert set(fetcher.penalised()) == {"b", "c"}


async def test_a_refusal_moves_on_to_the_next_holder(mesh: Mesh) -> None:
    digest = await hold(mesh, DATA, "b", "c")
    mesh["c"].store.remove(digest)  # c still advertised it a moment ago
    fetcher = fetcher_on(mesh, "a", {"b": 0.050, "c": 0.001})
    # Whether or not a has heard yet that c dropped it, the fetch succeeds from b.
    assert (await fetcher.ensure(digest)).read_bytes() == DATA
    assert fetcher.history[-1].holder == "b"


async def test_an_artifact_pushed_while_waiting_is_fetched(mesh: Mesh) -> None:
    fetcher = fetcher_on(mesh, "a")
    waiting = asyncio.create_task(fetcher.ensure(DIGEST, wait=15.0))
    await asyncio.sleep(0)
    assert not waiting.done()
    mesh["b"].store.put(DATA)
    assert (await waiting).read_bytes() == DATA


async def test_a_corrupt_local_copy_is_fetched_again(mesh: Mesh) -> None:
    digest = await hold(mesh, DATA, "b")
    local = mesh["a"].store
    local.put(DATA)
    path = local.path(digest)
    raw = bytearray(path.read_bytes())
    raw[0] ^= 0xFF
    path.write_bytes(raw)
    # A later edit: the store hashes again a file whose inode, size or mtime changed.
    os.utime(path, ns=(1, 1))
    fetcher = fetcher_on(mesh, "a")
    assert (await fetcher.ensure(digest)).read_bytes() == DATA
    assert fetcher.history[-1].holder == "b"


async def test_the_fetch_goes_through_a_relay_when_it_must(mesh: Mesh) -> None:
    # On loopback every node reaches every other; ask for the relay as the route table would.
    digest = await hold(mesh, DATA, "c")
    opened = await mesh["a"].mesh.open_stream("c", ARTIFACT_STREAM, via="b")
    await opened.stream.write_frame(FetchRequest(digest).encode())
    await opened.stream.finish()
    header = await opened.stream.read_frame()
    assert header is not None and FetchAnswer.decode(header) == FetchAnswer(size=len(DATA))
    received = b"".join([frame async for frame in opened.stream])
    assert received == DATA


async def test_a_request_for_what_a_node_does_not_hold_gets_an_error(mesh: Mesh) -> None:
    stream = await mesh["a"].mesh.transport.open_stream("b", ARTIFACT_STREAM)
    await stream.write_frame(FetchRequest(DIGEST).encode())
    answer = await stream.read_frame()
    assert answer is not None
    assert FetchAnswer.decode(answer).error == f"b does not hold {DIGEST}"
    assert mesh["b"].server.refused == 1


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'{"digest": "sha256:../../etc/passwd"}',
        b'{"digest": "' + DIGEST.upper().encode() + b'"}',
        b'{"digest": "' + DIGEST.encode() + b'", "more": 1}',
        b"\xff" * 2000,
    ],
)
async def test_a_malformed_request_resets_the_stream_and_the_node_keeps_serving(
    mesh: Mesh, frame: bytes
) -> None:
    digest = await hold(mesh, DATA, "b")
    stream = await mesh["a"].mesh.transport.open_stream("b", ARTIFACT_STREAM)
    await stream.write_frame(frame)
    with pytest.raises(StreamClosed):
        await stream.read_frame()
    assert (await fetcher_on(mesh, "a").ensure(digest)).read_bytes() == DATA


# --- chunks from several holders, resumption, quota, the bulk path -------------------------


@pytest.mark.parametrize("over_bulk", [True, False], ids=["bulk", "mesh-streams"])
async def test_chunks_come_from_several_holders_at_once(mesh: Mesh, over_bulk: bool) -> None:
    digest = await hold(mesh, BIG, "b", "c")
    options: dict[str, Any] = {} if over_bulk else {"bulk": None}
    fetcher = fetcher_on(mesh, "a", {"b": 0.050, "c": 0.001}, **options)
    path = await fetcher.ensure(digest)
    assert path.read_bytes() == BIG
    record = fetcher.history[-1]
    assert record.sources == ("b", "c") and record.bulk == over_bulk
    served = mesh["b"].server.chunks_served + mesh["c"].server.chunks_served
    assert mesh["b"].server.chunks_served > 0 and mesh["c"].server.chunks_served > 0
    # Each chunk once (a chunk is fetched twice only when it is late, at the end).
    assert served == record.transferred // MANIFEST_CHUNK_BYTES + 1 == 4
    assert not list(mesh["a"].store.directory.glob(".partial-*"))


async def test_a_holder_flipping_a_bit_mid_chunk_is_penalised_and_the_others_finish(
    mesh: Mesh,
) -> None:
    digest = await hold(mesh, BIG, "b", "c")
    mesh["c"].mesh.handle_streams(ARTIFACT_STREAM, liar(BIG, only=1))
    fetcher = fetcher_on(mesh, "a", {"b": 0.050, "c": 0.001})
    path = await fetcher.ensure(digest)
    assert path.read_bytes() == BIG
    assert set(fetcher.penalised()) == {"c"}
    record = fetcher.history[-1]
    assert "b" in record.sources
    assert mesh["a"].store.verify(digest)


async def test_a_fetch_cut_off_halfway_resumes_with_what_it_has(mesh: Mesh) -> None:
    digest = await hold(mesh, BIG, "b")
    manifest = manifest_of(BIG)

    async def first_half(index: int, chunk: bytes, stream: FramedStream) -> None:
        if index >= manifest.count // 2:
            raise RuntimeError("the holder went away half way")
        await send_whole(index, chunk, stream)

    mesh["b"].mesh.handle_streams(ARTIFACT_STREAM, by_hand(BIG, first_half))
    # One chunk at a time, so that exactly the first half arrives before the cut.
    fetcher = fetcher_on(mesh, "a", streams=1)
    with pytest.raises(ArtifactUnavailable, match="b: cut off"):
        await fetcher.ensure(digest)
    store = mesh["a"].store
    # Nothing under the digest; the chunks that arrived are kept aside.
    assert not store.has(digest)
    assert len(list(store.directory.glob(".partial-*"))) == 1
    # The holder is back: the second attempt fetches only the second half.
    mesh["b"].mesh.handle_streams(ARTIFACT_STREAM, mesh["b"].server.serve)
    path = await fetcher.ensure(digest)
    assert path.read_bytes() == BIG
    record = fetcher.history[-1]
    half = 2 * MANIFEST_CHUNK_BYTES
    assert record.resumed == half and record.transferred == len(BIG) - half
    assert not list(store.directory.glob(".partial-*"))


async def test_a_resumed_fetch_refetches_chunks_that_rotted_meanwhile(mesh: Mesh) -> None:
    digest = await hold(mesh, BIG, "b")
    store = mesh["a"].store
    partial = store.partial(digest, len(BIG))
    partial.write_at(0, BIG[:MANIFEST_CHUNK_BYTES])
    wrong = bytearray(BIG[MANIFEST_CHUNK_BYTES : 2 * MANIFEST_CHUNK_BYTES])
    wrong[7] ^= 0xFF
    partial.write_at(MANIFEST_CHUNK_BYTES, wrong)
    partial.close()
    fetcher = fetcher_on(mesh, "a")
    assert (await fetcher.ensure(digest)).read_bytes() == BIG
    record = fetcher.history[-1]
    assert record.resumed == MANIFEST_CHUNK_BYTES
    assert record.transferred == len(BIG) - MANIFEST_CHUNK_BYTES


async def test_an_artifact_over_the_quota_is_refused_clearly(mesh: Mesh) -> None:
    digest = await hold(mesh, BIG, "b")
    store = mesh["a"].store
    store.quota = 1 << 20
    fetcher = fetcher_on(mesh, "a")
    with pytest.raises(ArtifactTooLarge, match="over this node's artifact quota of 1048576"):
        await fetcher.ensure(digest)
    assert mesh["b"].server.chunks_served == 0
    assert not store.has(digest)
    assert not list(store.directory.glob(".partial-*"))
    assert fetcher.penalised() == {}  # the holder did nothing wrong


async def test_the_bulk_port_refuses_a_node_of_another_cluster(mesh: Mesh, tmp_path: Path) -> None:
    # Same node name, another cluster's root: the chain check in the handshake refuses it.
    root = Ed25519PrivateKey.generate()
    ca = pki.create_ca_certificate(root, "c1", datetime.now(UTC))
    key = Ed25519PrivateKey.generate()
    cert = pki.issue_node_certificate(
        root, ca, "a", key.public_key(), datetime.now(UTC), pki.NODE_VALIDITY
    )
    stranger = BulkTls(
        identity.NodeCredentials("c1", "a", key, cert, ca, None),
        lambda certificate: pki.verify_node_certificate(certificate, ca, datetime.now(UTC)),
    )
    refused = mesh["b"].bulk.refused
    with pytest.raises(bulk.BulkError):
        conn = await bulk.connect(
            stranger, "127.0.0.1", mesh["b"].bulk.port, "b", executor=_executor()
        )
        conn.close()
    await wait_until(lambda: mesh["b"].bulk.refused > refused, 10.0, "b to refuse it")


async def test_the_bulk_port_must_be_the_holder_it_claims(mesh: Mesh) -> None:
    # c's port, dialled as if it were b's: a's check of the name refuses it before sending.
    with pytest.raises(bulk.BulkError, match="answered as c, not b"):
        await bulk.connect(
            mesh["a"].tls, "127.0.0.1", mesh["c"].bulk.port, "b", executor=_executor()
        )


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=2)


async def test_a_bulk_connection_is_cut_once_its_peer_is_revoked(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bulk, "RECHECK_SECONDS", 0.0)  # check before every request
    digest = await hold(mesh, BIG, "b")
    b = mesh["b"]
    revoked: set[str] = set()

    def verify(certificate: Any) -> str:
        name = b.mesh.transport.verify_peer(certificate)
        if name in revoked:
            raise pki.CertificateError(f"{name} is revoked")
        return name

    server = BulkServer(BulkTls(b.mesh.transport.credentials, verify), b.server.serve_bulk)
    port = await server.start()
    try:
        conn = await bulk.connect(mesh["a"].tls, "127.0.0.1", port, "b", executor=_executor())

        def ask(index: int) -> bytes | None:
            conn.write_frame(FetchRequest(digest, chunk=index).encode())
            return conn.read_frame()

        answer = await asyncio.to_thread(ask, 0)
        assert answer is not None and FetchAnswer.decode(answer).length == MANIFEST_CHUNK_BYTES
        await asyncio.to_thread(conn.recv_into, conn.buffer(MANIFEST_CHUNK_BYTES))
        revoked.add("a")
        with pytest.raises(bulk.BulkError):
            if await asyncio.to_thread(ask, 1) is None:
                raise bulk.BulkError("closed")
        conn.close()
    finally:
        await server.close()
