"""Rogue modules placed on a real node: each ends as a condition on its Replica, contained,
while a healthy workload on the same node keeps serving through the gateway."""

from __future__ import annotations

import hashlib
import http.client
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from pollen.api.client import ApiClient
from pollen.api.errors import ApiError
from tests.conftest import NodeProcess
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MODULES = ("hello", "missing-import", "trap", "spin")


def workload(name: str, digest: str, executor: str = "http", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "pollen.dev/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": name},
        "spec": {"artifact": digest, "executor": executor, "replicas": 1, **spec},
    }


def upload(client: ApiClient, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    client.put_blob(digest, data)
    return digest


def replica_of(client: ApiClient, name: str) -> dict[str, Any] | None:
    try:
        replicas = client.list("replicas")
    except ApiError:
        return None
    found = [r for r in replicas if r["spec"]["workload"] == name]
    return found[0] if found else None


def ready_condition(replica: dict[str, Any] | None) -> dict[str, Any] | None:
    if replica is None:
        return None
    found = [c for c in replica.get("status", {}).get("conditions", []) if c["type"] == "Ready"]
    return found[0] if found else None


def test_rogue_modules_fail_their_replica_and_nothing_else(
    node_factory: Callable[..., NodeProcess],
) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "examples/build.py"), "--out", "build/examples", *MODULES],
        cwd=ROOT, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    node = node_factory("node-1")
    client = ApiClient(node.url, node.token, timeout=30)
    digests = {m: upload(client, (ROOT / f"build/examples/{m}.wasm").read_bytes()) for m in MODULES}
    not_wasm = upload(client, b"#!/bin/sh\necho this is not WebAssembly\n")
    client.apply(
        [
            workload("healthy", digests["hello"]),
            workload("unlinkable", digests["missing-import"]),
            workload("garbage", not_wasm),
            workload("crashing", digests["trap"], executor="command"),
        ]
    )
    expected = {"unlinkable": "MissingImport", "garbage": "InvalidModule", "crashing": "Trapped"}
    for name, reason in expected.items():
        wait_for(
            lambda name=name, reason=reason: (
                (r := replica_of(client, name)) is not None
                and r["status"].get("phase") == "Failed"
                and (c := ready_condition(r)) is not None
                and c["status"] == "False"
                and c["reason"] == reason
            ),
            timeout=60,
            what=f"replica of {name} Failed with reason {reason}",
        )
        message = ready_condition(replica_of(client, name))["message"]  # type: ignore[index]
        assert message, f"{name}: the condition says what went wrong"
    wait_for(
        lambda: (
            (r := replica_of(client, "healthy")) is not None and r["status"].get("phase") == "Ready"
        ),
        timeout=60,
        what="the healthy replica Ready beside the rogue ones",
    )
    gateway = node.endpoints["gateway"]
    assert isinstance(gateway, str)
    conn = http.client.HTTPConnection(urlsplit(gateway).netloc, timeout=10)
    try:
        conn.request("GET", "/healthy/")
        response = conn.getresponse()
        assert response.status == 200 and response.read()
    finally:
        conn.close()
    assert client.health()["status"] == "ok"
