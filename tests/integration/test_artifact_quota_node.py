"""A node's artifact quota (``pollen node --artifact-quota``): uploads over it refused with a
clear status, the least recently used collected, and never what a local replica needs."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytest

from pollen.api.errors import ApiError
from tests.conftest import NodeProcess
from tests.helpers import wait_for

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
