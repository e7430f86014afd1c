"""The node's HTTP API against a real node process: auth, CRUD, watch, and hostile bodies."""

from __future__ import annotations

import http.client
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pollen.api.client import ApiClient
from pollen.api.errors import ApiError
from pollen.cli.localnode import LocalNode, init_node
from tests.helpers import wait_for

PREFIX = "/apis/pollen.dev/v1alpha1"
DIGEST = "sha256:" + "0" * 64


def workload(name: str, replicas: int = 1, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "pollen.dev/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": name},
        "spec": {"artifact": DIGEST, "replicas": replicas, **spec},
    }


@pytest.fixture(scope="module")
def api_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNode]:
    """One node shared by this module's tests (hypothesis runs many requests against it)."""
    work = tmp_path_factory.mktemp("api")
    env = dict(os.environ, POLLEN_CONFIG=str(work / "config.yaml"))
    init_node(work / "n1", "n1", env=env)
    node = LocalNode(
        data_dir=work / "n1",
        log_path=work / "n1.log",
        env=env,
        extra_args=["--listen", "127.0.0.1:0"],
    )
    node.start()
    yield node
    node.kill()


def raw(
    node: LocalNode,
    method: str,
    path: str,
    body: bytes | None = None,
    token: str | None = "",
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One HTTP request with full control over what is sent."""
    parts = urlsplit(node.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    all_headers = dict(headers or {})
    if token == "":
        token = node.token
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=body, headers=all_headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, orjson.loads(data) if data else None


def names(node: LocalNode) -> list[str]:
    client = ApiClient(node.url, node.token)
    return [item["metadata"]["name"] for item in client.list("workloads")]


def clear(node: LocalNode) -> None:
    client = ApiClient(node.url, node.token)
    for name in names(node):
        client.delete("workloads", name)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/healthz"),
        ("GET", f"{PREFIX}/workloads"),
        ("GET", f"{PREFIX}/workloads/x"),
        ("POST", f"{PREFIX}/apply"),
        ("DELETE", f"{PREFIX}/workloads/x"),
        ("GET", f"{PREFIX}/events"),
        ("GET", "/no/such/route"),
    ],
)
@pytest.mark.parametrize("token", [None, "wrong", "Bearer", ""])
def test_every_route_refuses_requests_without_the_token(
    api_node: LocalNode, method: str, path: str, token: str | None
) -> None:
    body = orjson.dumps(
        {"apiVersion": "pollen.dev/v1alpha1", "kind": "List", "items": [workload("sneaky")]}
    )
    headers = {}
    if token == "":
        headers["Authorization"] = "Basic " + api_node.token  # right secret, wrong scheme
        token = None
    status, answer = raw(api_node, method, path, body, token=token, headers=headers)
    assert status == 401
    assert answer["kind"] == "Status"
    assert answer["reason"] == "Unauthorized"
    assert "sneaky" not in names(api_node)


def test_apply_get_list_delete_round_trip(api_node: LocalNode) -> None:
    clear(api_node)
    client = ApiClient(api_node.url, api_node.token)
    results = client.apply([workload("web", 2), workload("api", 1)])
    assert [(r["name"], r["action"]) for r in results] == [("web", "created"), ("api", "created")]
    web = client.get("workloads", "web")
    assert web["metadata"]["generation"] == 1
    assert web["metadata"]["uid"]
    assert names(api_node) == ["api", "web"]

    again = client.apply([workload("web", 2)])
    assert again[0]["action"] == "unchanged"
    changed = client.apply([workload("web", 3)])
    assert changed[0]["action"] == "configured"
    assert changed[0]["object"]["metadata"]["generation"] == 2
    assert changed[0]["object"]["metadata"]["uid"] == web["metadata"]["uid"]

    dry = client.apply([workload("web", 5), workload("new-one")], dry_run=True)
    assert [r["action"] for r in dry] == ["configured", "created"]
    assert client.get("workloads", "web")["spec"]["replicas"] == 3
    assert "new-one" not in names(api_node)

    client.delete("workloads", "web")
    with pytest.raises(ApiError) as err:
        client.get("workloads", "web")
    assert err.value.code == 404
    # The API's own events, in order (placement adds its own about the Workload too).
    api_reasons = {"Created", "Configured", "Deleted"}
    reasons = [e["reason"] for e in client.events(kind="Workload", name="web")]
    assert [r for r in reasons if r in api_reasons] == ["Created", "Configured", "Deleted"]


def test_label_selector_filters(api_node: LocalNode) -> None:
    clear(api_node)
    client = ApiClient(api_node.url, api_node.token)
    a, b = workload("a"), workload("b")
    a["metadata"]["labels"] = {"tier": "front"}
    b["metadata"]["labels"] = {"tier": "back"}
    client.apply([a, b])
    got = client.list("workloads", label_selector="tier=front")
    assert [item["metadata"]["name"] for item in got] == ["a"]


def test_one_bad_item_writes_nothing_and_names_the_item(api_node: LocalNode) -> None:
    clear(api_node)
    body = orjson.dumps(
        {
            "apiVersion": "pollen.dev/v1alpha1",
            "kind": "List",
            "items": [workload("good"), workload("bad", -1)],
        }
    )
    status, answer = raw(api_node, "POST", f"{PREFIX}/apply", body)
    assert status == 422
    assert answer["details"] == {"index": 1, "field": "spec.replicas"}
    assert answer["message"].startswith('items[1] (Workload "bad"): spec.replicas:')
    assert names(api_node) == []


def test_duplicate_names_in_one_apply_are_refused(api_node: LocalNode) -> None:
    clear(api_node)
    body = orjson.dumps(
        {
            "apiVersion": "pollen.dev/v1alpha1",
            "kind": "List",
            "items": [workload("twice"), workload("twice", 2)],
        }
    )
    status, answer = raw(api_node, "POST", f"{PREFIX}/apply", body)
    assert status == 400
    assert "twice" in answer["message"]
    assert names(api_node) == []


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b"\xff\xfe\x00garbage", 400),
        (b'"a string"', 400),
        (b'{"kind": "List", "items": {}}', 400),
        (b'{"kind": "List", "items": [1, 2]}', 422),
        (b'{"kind": "List", "items": [{"kind": "Pod"}]}', 422),
        (b"", 400),
    ],
)
def test_malformed_bodies_get_a_clear_error(api_node: LocalNode, body: bytes, status: int) -> None:
    got, answer = raw(api_node, "POST", f"{PREFIX}/apply", body)
    assert got == status
    assert answer["kind"] == "Status"
    assert answer["message"] and "\n" not in answer["message"]


def test_an_object_over_one_mib_is_refused(api_node: LocalNode) -> None:
    clear(api_node)
    big = workload("big")
    big["metadata"]["annotations"] = {f"k{i}": "x" * 200_000 for i in range(6)}
    status, answer = raw(
        api_node,
        "POST",
        f"{PREFIX}/apply",
        orjson.dumps({"apiVersion": "pollen.dev/v1alpha1", "kind": "List", "items": [big]}),
    )
    assert status == 413
    assert answer["reason"] == "RequestEntityTooLarge"
    assert "1 MiB" in answer["message"] or "1048576" in answer["message"]
    assert "big" not in names(api_node)


def test_unknown_kind_and_object_are_404(api_node: LocalNode) -> None:
    status, answer = raw(api_node, "GET", f"{PREFIX}/pods")
    assert status == 404
    assert "pods" in answer["message"]
    status, answer = raw(api_node, "DELETE", f"{PREFIX}/workloads/nope")
    assert status == 404
    assert answer["message"] == 'workload "nope" not found'


def test_watch_streams_existing_then_changes(api_node: LocalNode) -> None:
    clear(api_node)
    client = ApiClient(api_node.url, api_node.token)
    client.apply([workload("before")])
    seen: list[tuple[str, str]] = []
    stream = client.watch("workloads")

    def consume() -> None:
        for event in stream:
            if event["type"] == "BOOKMARK":
                seen.append(("BOOKMARK", ""))
                continue
            seen.append((event["type"], event["object"]["metadata"]["name"]))
            if event["type"] == "DELETED" and event["object"]["metadata"]["name"] == "after":
                return

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    wait_for(lambda: ("BOOKMARK", "") in seen, what="the initial list")
    client.apply([workload("after")])
    client.apply([workload("after", 2)])
    client.delete("workloads", "after")
    reader.join(timeout=20)
    assert seen[:2] == [("ADDED", "before"), ("BOOKMARK", "")]
    # Placement writes the status of both Workloads too: more MODIFIED events may come; the
    # changes of "after", with repeats folded, are still exactly these.
    changes = [kind for kind, name in seen[2:] if name == "after"]
    folded = [kind for i, kind in enumerate(changes) if i == 0 or changes[i - 1] != kind]
    assert folded == ["ADDED", "MODIFIED", "DELETED"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)

near_valid = st.builds(
    lambda name, replicas, extra, kind, version: {
        "apiVersion": version,
        "kind": kind,
        "metadata": {"name": name},
        "spec": {"artifact": DIGEST, "replicas": replicas, **extra},
    },
    st.text(max_size=70),
    st.one_of(st.integers(), st.text(max_size=5), st.none()),
    st.dictionaries(st.sampled_from(["bogus", "executor", "env", "args"]), json_values, max_size=2),
    st.sampled_from(["Workload", "Pod", "workload", ""]),
    st.sampled_from(["pollen.dev/v1alpha1", "pollen.dev/v2", "v1"]),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    payload=st.one_of(
        json_values,
        st.builds(
            lambda items: {"kind": "List", "items": items}, st.lists(json_values, max_size=3)
        ),
        st.builds(lambda items: {"kind": "List", "items": items}, st.lists(near_valid, max_size=3)),
    )
)
def test_hypothesis_api_bodies_never_break_the_node(api_node: LocalNode, payload: Any) -> None:
    """Any JSON body: success or a 4xx Status; never a 500; the node keeps serving."""
    before = names(api_node)
    # json, not orjson: the body may hold integers beyond 64 bits, which the node must refuse.
    body = json.dumps(payload).encode()
    status, answer = raw(api_node, "POST", f"{PREFIX}/apply?dryRun=true", body)
    assert status in (200, 400, 409, 413, 422), answer
    if status != 200:
        assert answer["kind"] == "Status" and answer["message"]
    assert names(api_node) == before  # dry run, or refused: nothing written


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=st.binary(max_size=300))
def test_hypothesis_random_bytes_are_refused_cleanly(api_node: LocalNode, body: bytes) -> None:
    status, answer = raw(api_node, "POST", f"{PREFIX}/apply", body)
    assert status in (400, 422, 409, 200), answer
    assert raw(api_node, "GET", "/healthz")[0] == 200


def test_node_survives_a_client_that_disconnects_mid_watch(api_node: LocalNode) -> None:
    parts = urlsplit(api_node.url)
    for _ in range(5):
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        conn.request(
            "GET",
            f"{PREFIX}/workloads?watch=true",
            headers={"Authorization": f"Bearer {api_node.token}"},
        )
        response = conn.getresponse()
        response.readline()
        conn.close()
    ApiClient(api_node.url, api_node.token).apply([workload("after-disconnects")])
    assert "after-disconnects" in names(api_node)


def test_data_dir_holds_token_readable_by_owner_only(api_node: LocalNode) -> None:
    mode = (Path(api_node.data_dir) / "api-token").stat().st_mode & 0o777
    assert mode == 0o600
