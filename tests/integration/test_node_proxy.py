"""The node proxy: any node's API through the node pctl talks to, over the mesh (real nodes)."""

from __future__ import annotations

import http.client
import os
from collections.abc import Iterator
from urllib.parse import urlsplit

import orjson
import pytest

from pollen.api.proxy import PROXIED_HEADER
from pollen.api.server import PREFIX
from tests.helpers import wait_for
from tests.integration.test_mesh_nodes import Swarm

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    work = tmp_path_factory.mktemp("proxy")
    swarm = Swarm(work, {**os.environ, "POLLEN_CONFIG": str(work / "pctl-config.yaml")})
    try:
        swarm.first("n1")
        swarm.join("n2")
        swarm.join("n3")
        expected = {"n1": "True", "n2": "True", "n3": "True"}
        wait_for(
            lambda: all(swarm.ready_view(n) == expected for n in swarm.nodes),
            timeout=60,
            what="three nodes Ready everywhere",
        )
        yield swarm
    finally:
        for node in swarm.nodes.values():
            node.kill()


def test_a_request_reaches_the_named_node(trio: Swarm) -> None:
    answer = trio.client("n1").proxy("n3", "/healthz")
    assert answer.status == 200
    assert orjson.loads(answer.body)["node"] == "n3"
    assert answer.headers["Via"] == "1.1 n3, 1.1 n1"


def test_a_node_proxies_to_itself(trio: Swarm) -> None:
    answer = trio.client("n2").proxy("n2", "/healthz")
    assert (answer.status, orjson.loads(answer.body)["node"]) == (200, "n2")


def test_writes_and_query_strings_pass_through(trio: Swarm) -> None:
    manifest = {
        "apiVersion": "pollen.dev/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": "via-proxy", "labels": {"made": "proxied"}},
        "spec": {"artifact": "sha256:" + "3" * 64},
    }
    body = orjson.dumps({"apiVersion": "pollen.dev/v1alpha1", "kind": "List", "items": [manifest]})
    answer = trio.client("n1").proxy("n2", f"{PREFIX}/apply", method="POST", body=body)
    assert answer.status == 200, answer.body
    listed = trio.client("n1").proxy("n2", f"{PREFIX}/workloads?labelSelector=made%3Dproxied")
    assert [i["metadata"]["name"] for i in orjson.loads(listed.body)["items"]] == ["via-proxy"]
    wait_for(
        lambda: trio.client("n3").list("workloads", "made=proxied"),
        timeout=30,
        what="the proxied write to reach n3 by gossip",
    )


def test_error_answers_come_back_as_they_are(trio: Swarm) -> None:
    answer = trio.client("n1").proxy("n3", f"{PREFIX}/workloads/does-not-exist")
    assert answer.status == 404
    status = orjson.loads(answer.body)
    assert (status["kind"], status["reason"]) == ("Status", "NotFound")


def test_an_unknown_node_is_not_found(trio: Swarm) -> None:
    answer = trio.client("n1").proxy("ghost", "/healthz")
    assert answer.status == 404
    assert "ghost" in orjson.loads(answer.body)["message"]


def test_a_proxied_request_is_not_proxied_again(trio: Swarm) -> None:
    path = f"{PREFIX}/nodes/n1/proxy/healthz"
    answer = trio.client("n2").proxy("n3", path)
    assert answer.status == 400
    assert "proxied once" in orjson.loads(answer.body)["message"]
    node = trio.nodes["n1"]
    conn = http.client.HTTPConnection(urlsplit(node.url).netloc, timeout=10)
    try:
        conn.request(
            "GET",
            f"{PREFIX}/nodes/n2/proxy/healthz",
            headers={"Authorization": f"Bearer {node.token}", PROXIED_HEADER: "n9"},
        )
        assert conn.getresponse().status == 400
    finally:
        conn.close()


def test_the_proxy_needs_the_token(trio: Swarm) -> None:
    from pollen.api.client import ApiClient

    node = trio.nodes["n1"]
    answer = ApiClient(node.url, "wrong-token").proxy("n2", "/healthz")
    assert answer.status == 401
