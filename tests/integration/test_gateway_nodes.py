"""The gateway across real node processes: every node answers for every workload, locally or
forwarded over the mesh, and ``pollen.call`` reaches a workload on another node."""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
import yaml

from pollen.api.errors import ApiError
from pollen.cli.localnode import tool
from pollen.runtime import abi
from tests.helpers import wait_for
from tests.integration.test_mesh_nodes import Swarm
from tests.runtime.modules import call_loop

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["n1", "n2", "n3"]
EXAMPLES = ["hello", "echo", "caller"]


def workload(name: str, artifact: str, node: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"artifact": artifact, "replicas": 1}
    if node is not None:
        # Every node carries its own name as this label: pin the replica there.
        spec["placement"] = {"nodeSelector": {"pollen.dev/hostname": node}}
    return {
        "apiVersion": "pollen.dev/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": name},
        "spec": spec,
    }


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return orjson.loads(self.body)


def request(gateway: str, path: str, method: str = "GET", body: bytes | None = None) -> Answer:
    conn = http.client.HTTPConnection(urlsplit(gateway).netloc, timeout=30)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return Answer(response.status, dict(response.getheaders()), response.read())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    """Three nodes Ready everywhere, with the example modules pushed to n1 and these
    Workloads: hello (placed anywhere), echo and ping on n2, caller and pong on n3 (ping and
    pong call each other), and stuck, whose artifact nobody has."""
    subprocess.run(
        [sys.executable, str(ROOT / "examples/build.py"), "--out", "build/examples", *EXAMPLES],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    work = tmp_path_factory.mktemp("gateway")
    swarm = Swarm(work, {**os.environ, "POLLEN_CONFIG": str(work / "pctl-config.yaml")})
    try:
        swarm.first("n1")
        swarm.join("n2")
        swarm.join("n3")
        expected = dict.fromkeys(NAMES, "True")
        wait_for(
            lambda: all(swarm.ready_view(n) == expected for n in NAMES),
            timeout=60,
            what="three nodes Ready everywhere",
        )
        modules = {name: ROOT / f"build/examples/{name}.wasm" for name in EXAMPLES}
        for name, callee in (("ping", "pong"), ("pong", "ping")):
            modules[name] = work / f"{name}.wasm"
            modules[name].write_bytes(call_loop(callee))
        for name, path in modules.items():
            subprocess.run(
                [tool("pctl"), "push", str(path), "--name", name],
                env=swarm.env,
                capture_output=True,
                timeout=60,
                check=True,
            )
        manifests = [
            workload("hello", "hello"),
            workload("echo", "echo", "n2"),
            workload("ping", "ping", "n2"),
            workload("caller", "caller", "n3"),
            workload("pong", "pong", "n3"),
            workload("stuck", "sha256:" + "7" * 64),
        ]
        manifest = work / "workloads.yaml"
        manifest.write_text(yaml.safe_dump_all(manifests))
        subprocess.run(
            [tool("pctl"), "apply", "-f", str(manifest)],
            env=swarm.env,
            capture_output=True,
            timeout=60,
            check=True,
        )
        yield swarm
    finally:
        for node in swarm.nodes.values():
            node.kill()


def gateway(swarm: Swarm, name: str) -> str:
    url = swarm.nodes[name].endpoints.get("gateway")
    assert isinstance(url, str) and url.startswith("http://127.0.0.1:"), url
    return url


def ready_holder(swarm: Swarm, name: str) -> str | None:
    """The node holding ``name``'s Ready replica, as n1 sees it."""
    try:
        replicas = swarm.client("n1").list("replicas")
    except ApiError:
        return None
    for replica in replicas:
        if replica["spec"]["workload"] == name and replica["status"].get("phase") == "Ready":
            node = replica["spec"].get("node")
            return node if isinstance(node, str) else None
    return None


def answers(swarm: Swarm, node: str, path: str, method: str = "GET") -> Answer | None:
    """The gateway's answer once the node knows the workload and a Ready replica of it: not a
    404 for a Workload its document has not received yet, nor a 503 for a replica not Ready in
    its view yet (the callers wait for workloads that exist)."""
    answer = request(gateway(swarm, node), path, method)
    not_yet = answer.status == 503 or (
        answer.status == 404 and answer.body.startswith(b"no workload named")
    )
    return None if not_yet else answer


def test_every_gateway_answers_locally_on_the_holder_and_forwards_elsewhere(trio: Swarm) -> None:
    holder = wait_for(lambda: ready_holder(trio, "hello"), 60, "a Ready replica of hello")
    for node in NAMES:
        answer = wait_for(lambda n=node: answers(trio, n, "/hello/"), 30, f"hello through {node}")
        assert isinstance(answer, Answer)
        assert (answer.status, answer.body) == (200, b"Hello from Pollen!\n")
        if node == holder:
            assert "Via" not in answer.headers  # served by this node's own instance
        else:
            assert answer.headers["Via"] == f"1.1 {holder}, 1.1 {node}"
        # Without the trailing slash too: /hello is /hello/.
        assert request(gateway(trio, node), "/hello").body == b"Hello from Pollen!\n"


def test_a_forwarded_request_arrives_as_the_client_sent_it(trio: Swarm) -> None:
    wait_for(lambda: answers(trio, "n1", "/echo/"), 60, "echo through n1")
    url = gateway(trio, "n1")
    conn = http.client.HTTPConnection(urlsplit(url).netloc, timeout=30)
    try:
        conn.request(
            "PUT", "/echo/a/b%20c?x=1&y=%C3%A9", body=b"the body", headers={"X-Trace": "t-1"}
        )
        response = conn.getresponse()
        seen = orjson.loads(response.read())
        assert response.getheader("Via") == "1.1 n2, 1.1 n1"
    finally:
        conn.close()
    env = seen["env"]
    assert (seen["method"], seen["path"], seen["query"]) == ("PUT", "/a/b c", "x=1&y=%C3%A9")
    assert (env["SCRIPT_NAME"], env["PATH_INFO"], env["X_RAW_PATH_INFO"]) == (
        "/echo",
        "/a/b c",
        "/a/b%20c",
    )
    assert seen["body"] == "the body" and env["CONTENT_LENGTH"] == "8"
    assert seen["headers"]["x-trace"] == "t-1"
    # The CGI server variables are the ones of the gateway the client talked to, on n1.
    assert env["HTTP_HOST"] == urlsplit(url).netloc
    assert env["SERVER_PORT"] == str(urlsplit(url).port)
    assert env["X_FULL_URL"] == f"{url}/echo/a/b%20c?x=1&y=%C3%A9"


def test_pollen_call_reaches_a_workload_on_another_node(trio: Swarm) -> None:
    # caller runs on n3 only, echo on n2 only: the call crosses the mesh.
    wait_for(lambda: answers(trio, "n1", "/echo/"), 60, "echo through n1")
    answer = wait_for(lambda: answers(trio, "n1", "/caller/?to=echo/called"), 60, "caller")
    assert isinstance(answer, Answer) and answer.status == 200, answer.body
    result = answer.json()
    assert (result["to"], result["status"]) == ("echo/called", 200)
    assert result["result"] == len(result["response"].encode())
    called = orjson.loads(result["response"])
    assert called["path"] == "/called"
    assert called["headers"]["x-pollen-caller"] == "caller"
    assert called["env"]["SCRIPT_NAME"] == "/echo"


def test_a_call_to_an_unknown_workload_fails_as_not_found(trio: Swarm) -> None:
    answer = wait_for(lambda: answers(trio, "n3", "/caller/?to=no-such-thing"), 60, "caller")
    assert isinstance(answer, Answer)
    assert answer.json()["result"] == abi.ERR_NOT_FOUND


def test_a_cycle_of_calls_across_nodes_stops_at_the_depth_limit(trio: Swarm) -> None:
    # ping (n2) calls pong (n3), which calls ping, ...: every call crosses the mesh, and the
    # depth travels with it, so the chain stops where it would on one node.
    wait_for(lambda: answers(trio, "n1", "/pong/"), 60, "pong through n1")
    answer = wait_for(lambda: answers(trio, "n1", "/ping/"), 60, "ping through n1")
    assert isinstance(answer, Answer)
    assert (answer.status, answer.body) == (200, b"deep" + b"+" * abi.MAX_CALL_DEPTH)


def test_unknown_workloads_and_paths_are_404_with_one_sentence(trio: Swarm) -> None:
    for path in ("/no-such-workload/", "/Not_A_Name/x", "/"):
        answer = request(gateway(trio, "n2"), path)
        assert answer.status == 404
        assert answer.body.decode().count(".") <= 2 and answer.body.endswith(b".\n")
    assert (
        b'no workload named "no-such-workload"'
        in request(gateway(trio, "n2"), "/no-such-workload/").body
    )


def test_a_workload_without_a_ready_replica_is_503_with_retry_after(trio: Swarm) -> None:
    answer = request(gateway(trio, "n1"), "/stuck/")
    assert answer.status == 503
    assert answer.headers["Retry-After"] == "1"
    assert b"no Ready replica" in answer.body


def test_bad_requests_get_400_and_the_gateway_keeps_serving(trio: Swarm) -> None:
    import socket

    netloc = urlsplit(gateway(trio, "n3")).netloc
    host, port = netloc.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GARBAGE \x00\x01 HTTP/9.9\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 400")
    answer = wait_for(lambda: answers(trio, "n3", "/hello/"), 30, "hello through n3")
    assert isinstance(answer, Answer) and answer.status == 200
