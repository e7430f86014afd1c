"""A node's artifact quota (``pollen node --artifact-quota``): uploads over it refused with a
clear status, the least recently used collected, and never what a local replica needs."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pollen.api.errors import ApiError
from tests.conftest import NodeProcess
from tests.helpers import wait_for
from tests.integration.test_mesh_nodes import Swarm

pytestmark = pytest.mark.integration


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def module(tag: int, size: int = 600) -> bytes:
    return b"\0asm\x01\0\0\0" + bytes([tag]) * (size - 8)


def held(node: NodeProcess) -> list[str]:
    return [blob["digest"] for blob in node.client().list_blobs()]


def test_an_upload_over_the_quota_is_refused_and_old_blobs_make_room(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory("node-1", "--artifact-quota", "1KiB")
    client = node.client()
    big = module(1, 2000)
    with pytest.raises(ApiError, match="over this node's artifact quota of 1024 bytes") as info:
        client.put_blob(digest_of(big), big)
    assert info.value.code == 413
    first, second = module(2), module(3)
    client.put_blob(digest_of(first), first)
    client.put_blob(digest_of(second), second)  # 1200 bytes: the first one goes
    assert held(node) == [digest_of(second)]
    assert not list((node.data_dir / "artifacts" / "sha256").glob(".incoming-*"))


def _replica_using(node: NodeProcess, digest: str) -> dict[str, Any] | None:
    for replica in node.client().list("replicas"):
        spec = replica["spec"]
        if spec.get("node") == "node-1" and spec.get("artifact") == digest:
            return replica
    return None


def test_what_a_local_replica_needs_is_never_collected(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory("node-1", "--artifact-quota", "1KiB")
    client = node.client()
    needed = module(4)
    client.put_blob(digest_of(needed), needed)
    client.apply(
        [
            {
                "apiVersion": "pollen.dev/v1alpha1",
                "kind": "Workload",
                "metadata": {"name": "pinned"},
                "spec": {"artifact": digest_of(needed), "replicas": 1},
            }
        ]
    )
    wait_for(lambda: _replica_using(node, digest_of(needed)), 30, "node-1 to claim the replica")
    other = module(5)
    with pytest.raises(ApiError, match="artifacts this node's replicas use") as info:
        client.put_blob(digest_of(other), other)
    assert info.value.code == 507
    assert held(node) == [digest_of(needed)]


def test_a_replica_whose_artifact_is_over_the_quota_says_so(
    tmp_path: Path, pollen_env: dict[str, str]
) -> None:
    swarm = Swarm(tmp_path, pollen_env)
    try:
        swarm.first("n1")
        swarm.join("n2", extra=["--label", "disk=small", "--artifact-quota", "1KiB"])
        big = module(6, 2000)
        digest = digest_of(big)
        swarm.client("n1").put_blob(digest, big)
        swarm.client("n1").apply(
            [
                {
                    "apiVersion": "pollen.dev/v1alpha1",
                    "kind": "Workload",
                    "metadata": {"name": "too-big"},
                    "spec": {
                        "artifact": digest,
                        "replicas": 1,
                        "placement": {"nodeSelector": {"disk": "small"}},
                    },
                }
            ]
        )

        def message() -> str | None:
            for replica in swarm.client("n2").list("replicas"):
                text = replica.get("status", {}).get("message", "")
                if replica["spec"].get("node") == "n2" and "quota" in text:
                    return str(text)
            return None

        text = wait_for(message, 60, "n2's replica to say why it cannot start")
        assert f"{digest} is 2000 bytes, over this node's artifact quota of 1024 bytes" in text
        assert swarm.client("n2").blob_size(digest) is None
    finally:
        for node in swarm.nodes.values():
            node.kill()
