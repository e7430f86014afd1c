"""The gateway's forwarding target and its edge, in one process: real QUIC between two mesh
services, real wasm instances, hostile frames (fuzzed), and a drain under a request.

The parts run on an event loop of their own thread, so that hypothesis (which drives
synchronous tests) can send example after example to the same target.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import threading
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
import wasmtime
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pollen.api.forward import GATEWAY_STREAM, ForwardedAnswer, ForwardedRequest, exchange
from pollen.api.gateway import Gateway
from pollen.mesh import identity, pki
from pollen.mesh.service import MeshService
from pollen.mesh.sync import LocalDocument
from pollen.mesh.transport import TransportError
from pollen.resources import ObjectMeta, Workload
from pollen.resources.models import (
    Replica,
    ReplicaPhase,
    ReplicaSpec,
    ReplicaStatus,
    WorkloadSpec,
)
from pollen.runtime.executors import HttpExecutor
from pollen.runtime.host import InstanceHost
from pollen.runtime.runtime import Runtime
from pollen.runtime.wagi import HttpRequest, HttpResponse
from pollen.state import ResourceStore
from pollen.state.document import StateDocument
from tests.helpers import wait_for, wait_until
from tests.runtime.modules import FD_WRITE

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NODES = ("a", "b", "c", "d")
T = TypeVar("T")


def slow_hello(iterations: int) -> bytes:
    """An http module that counts down from ``iterations`` before answering ``slow hello``."""
    output = b"Content-Type: text/plain\n\nslow hello\n"
    data = "".join(f"\\{byte:02x}" for byte in output)
    return bytes(
        wasmtime.wat2wasm(
            f"""
            (module
              {FD_WRITE}
              (memory (export "memory") 1)
              (data (i32.const 64) "{data}")
              (func (export "_start") (local $i i32)
                (local.set $i (i32.const {iterations}))
                (block $done (loop $again
                  (br_if $done (i32.eqz (local.get $i)))
                  (local.set $i (i32.sub (local.get $i) (i32.const 1)))
                  (br $again)))
                (i32.store (i32.const 0) (i32.const 64))
                (i32.store (i32.const 4) (i32.const {len(output)}))
                (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
            """
        )
    )


class Harness:
    """Mesh services on a loop thread: ``b`` runs a gateway with instances (hello); ``c`` a
    gateway without any (it refuses); ``d`` serves no gateway streams at all (they are reset);
    ``a`` runs a gateway whose document says where replicas are, to route from."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.mesh: dict[str, MeshService] = {}

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def start(self) -> None:
        root = Ed25519PrivateKey.generate()
        ca = pki.create_ca_certificate(root, "c1", datetime.now(UTC))
        for name in NODES:
            key = Ed25519PrivateKey.generate()
            cert = pki.issue_node_certificate(
                root, ca, name, key.public_key(), datetime.now(UTC), pki.NODE_VALIDITY
            )
            credentials = identity.NodeCredentials("c1", name, key, cert, ca, None)
            service = MeshService(credentials, LocalDocument(StateDocument.new()))
            await service.start()
            self.mesh[name] = service
        for name in NODES[1:]:
            await self.mesh[name].join([self.mesh["a"].transport.bound_address])
        await wait_until(
            lambda: all(s.alive() == list(NODES) for s in self.mesh.values()),
            15.0,
            "every node to see every node alive",
        )
        self.store = ResourceStore.open(self.work / "state")
        self.runtime = Runtime()
        self.instances = InstanceHost(self.runtime, on_change=lambda replica: None)
        hello = (ROOT / "build/examples/hello.wasm").read_bytes()
        await self.add("hello", hello)
        self.gateway = Gateway("b", store=self.store, instances=self.instances, mesh=self.mesh["b"])
        self.mesh["b"].handle_streams(GATEWAY_STREAM, self.gateway.serve_forwarded)
        await self.gateway.start()
        self.empty = InstanceHost(self.runtime, on_change=lambda replica: None)
        self.others: list[Gateway] = []
        self.stores = {name: ResourceStore.open(self.work / f"state-{name}") for name in "ac"}
        for name, store in self.stores.items():
            other = Gateway(name, store=store, instances=self.empty, mesh=self.mesh[name])
            self.mesh[name].handle_streams(GATEWAY_STREAM, other.serve_forwarded)
            await other.start()
            self.others.append(other)
        self.origin = self.others[0]

    async def add(self, name: str, wasm: bytes, replica: str | None = None) -> None:
        spec = WorkloadSpec(artifact="sha256:" + "0" * 64, replicas=1)
        self.store.apply([Workload(metadata=ObjectMeta(name=name), spec=spec)])
        hosted = self.instances.create(replica or f"{name}-0", name, 1, "", spec.artifact, spec)
        assert await hosted.instance.start(wasm) is ReplicaPhase.READY

    async def stop(self) -> None:
        for other in self.others:
            await other.close()
        for store in self.stores.values():
            store.close()
        await self.gateway.close()
        await self.instances.close()
        await asyncio.to_thread(self.runtime.close)
        for service in self.mesh.values():
            await service.stop()
        self.store.close()

    async def forward(self, workload: str, request: HttpRequest) -> ForwardedAnswer:
        opened = await self.mesh["a"].open_stream("b", GATEWAY_STREAM)
        return await exchange(opened.stream, ForwardedRequest(workload, request))

    async def send_raw(self, frames: list[bytes]) -> str:
        """Send ``frames`` as they are; what came back: ``reset``, or the answer's status."""
        opened = await self.mesh["a"].open_stream("b", GATEWAY_STREAM)
        stream = opened.stream
        try:
            for frame in frames:
                await stream.write_frame(frame)
            await stream.finish()
            first = await stream.read_frame()
            if first is None:
                return "ended"
            answer = ForwardedAnswer.decode_head(first)
            while await stream.read_frame() is not None:
                pass
        except TransportError:
            return "reset"
        finally:
            stream.reset()
        return "refused" if answer.response is None else str(answer.response.status)


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    if not (ROOT / "build/examples/hello.wasm").exists():
        pytest.skip("build/examples/hello.wasm is missing: run make examples")
    harness = Harness(tmp_path_factory.mktemp("gateway"))
    harness.run(harness.start())
    try:
        yield harness
    finally:
        harness.run(harness.stop())
        harness.loop.call_soon_threadsafe(harness.loop.stop)
        harness.thread.join(10)


def test_a_forwarded_request_is_served_by_an_instance_of_the_target(harness: Harness) -> None:
    answer = harness.run(harness.forward("hello", HttpRequest(path="/")))
    assert answer.response is not None
    assert (answer.response.status, answer.response.body) == (200, b"Hello from Pollen!\n")


def test_a_target_without_an_instance_refuses_and_never_forwards_again(harness: Harness) -> None:
    answer = harness.run(harness.forward("elsewhere", HttpRequest(path="/")))
    assert answer.response is None
    assert answer.refused is not None and "no Ready instance" in answer.refused


VALID_HEAD = orjson.loads(ForwardedRequest("hello", HttpRequest(path="/x")).encode())
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
mutated_heads = st.tuples(st.sampled_from(sorted(VALID_HEAD)), json_values).map(
    lambda change: json.dumps({**VALID_HEAD, change[0]: change[1]}).encode()
)
frames = st.lists(st.binary(max_size=300) | mutated_heads, min_size=1, max_size=3)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(frames)
def test_fuzzed_frames_reset_the_stream_and_the_target_keeps_serving(
    harness: Harness, frames: list[bytes]
) -> None:
    outcome = harness.run(harness.send_raw(frames), timeout=30)
    # A malformed head is reset; a head that happens to be valid is served (the frames after
    # it are its body) or refused, never anything else.
    assert outcome in ("reset", "200", "refused")
    answer = harness.run(harness.forward("hello", HttpRequest(path="/")))
    assert answer.response is not None and answer.response.status == 200


def test_a_request_in_flight_during_a_drain_completes(harness: Harness) -> None:
    harness.run(harness.add("slow", slow_hello(600_000_000)))
    hosted = harness.instances.ready("slow")[0]
    executor = hosted.instance.executor
    assert isinstance(executor, HttpExecutor)
    port = int(harness.gateway.url.rsplit(":", 1)[1])

    def get(path: str) -> tuple[int, bytes, str | None]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read(), response.getheader("Retry-After")
        finally:
            conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(get, "/slow/")
        wait_for(lambda: executor.in_flight == 1, 30, "the request to run in the instance")
        draining = asyncio.run_coroutine_threadsafe(
            harness.instances.stop(hosted.replica), harness.loop
        )
        wait_for(lambda: hosted.phase is not ReplicaPhase.READY, 30, "the drain to begin")
        # A request that comes during the drain finds no Ready replica: 503, try again later.
        status, _, retry_after = get("/slow/")
        assert (status, retry_after) == (503, "1")
        assert in_flight.result(60)[:2] == (200, b"slow hello\n")
        draining.result(60)
    assert hosted.phase is ReplicaPhase.STOPPED


def place(harness: Harness, workload: str, nodes: list[str]) -> None:
    """Write into the origin's document: ``workload`` has a Ready replica on each of ``nodes``."""
    store = harness.stores["a"]
    spec = WorkloadSpec(artifact="sha256:" + "0" * 64, replicas=len(nodes))
    store.apply([Workload(metadata=ObjectMeta(name=workload), spec=spec)])
    for node in nodes:
        name = f"{workload}-{node}"
        replica = Replica(
            metadata=ObjectMeta(name=name),
            spec=ReplicaSpec(workload=workload, artifact=spec.artifact, node=node),
        )
        store.apply([replica])
        store.update_status("Replica", name, ReplicaStatus(phase=ReplicaPhase.READY, node=node))


def via_origin(harness: Harness, path: str, method: str = "GET") -> HttpResponse:
    request = HttpRequest(method=method, path=path)

    async def handle() -> HttpResponse:
        answer = harness.origin.handle(request)
        return answer if isinstance(answer, HttpResponse) else await answer

    return harness.run(handle())


def test_a_node_that_refuses_is_passed_over_for_the_next_holder(harness: Harness) -> None:
    # c runs no instance of hello although the document says so (its view was ahead of it).
    place(harness, "hello", ["c", "b"])
    response = via_origin(harness, "/hello/")
    assert (response.status, response.body) == (200, b"Hello from Pollen!\n")
    assert response.header("Via") == "1.1 b, 1.1 a"


def test_every_holder_refusing_is_503_and_every_holder_failing_is_502(harness: Harness) -> None:
    place(harness, "refused", ["c"])
    response = via_origin(harness, "/refused/")
    assert (response.status, response.header("Retry-After")) == (503, "1")
    assert b"c: no Ready instance" in response.body
    # d resets every gateway stream: a GET may be tried elsewhere, and there is nowhere else.
    place(harness, "broken", ["d"])
    response = via_origin(harness, "/broken/")
    assert response.status == 502
    assert b'no node holding a Ready replica of "broken" answered (d: ' in response.body
    # A POST that d may have received whole is not sent to another node.
    place(harness, "once", ["d", "b"])
    response = via_origin(harness, "/once/x", method="POST")
    if response.status == 502:  # d was nearer: the POST stops there
        assert b"request is not sent to another node" in response.body
    else:  # b was nearer, and served it (hello answers any path)
        assert response.status == 200


def test_a_get_is_tried_on_the_next_holder_after_a_reset(harness: Harness) -> None:
    place(harness, "retried", ["d", "b"])
    harness.run(harness.add("retried", (ROOT / "build/examples/hello.wasm").read_bytes()))
    response = via_origin(harness, "/retried/")
    assert (response.status, response.header("Via")) == (200, "1.1 b, 1.1 a")
