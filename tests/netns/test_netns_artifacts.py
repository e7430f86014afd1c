"""Artifact fetch between real node processes in network namespaces: through a relay where
the fetching node and the holder have no direct route, and from the good holder when another
holder's copy was tampered with on disk. Triggered as a user would: ``GET blobs/DIGEST`` on
the node that lacks the artifact. Needs root; skipped with the reason otherwise.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from pollen.api.client import RawResponse
from pollen.api.errors import ApiError
from tests.helpers import wait_for
from tests.netns.netns import NetnsNode, Topology, missing, swarm

pytestmark = [pytest.mark.root, pytest.mark.integration]

# Two chunks and a bit: the fetch spans several chunk requests (and, between two holders,
# both serve some).
DATA = b"\0asm\x01\0\0\0" + os.urandom(9 * 1024 * 1024)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


@pytest.fixture(autouse=True)
def _needs_netns() -> None:
    reason = missing()
    if reason:
        pytest.skip(reason)


def _ready(node: NetnsNode, names: list[str]) -> bool:
    try:
        with node.client() as client:
            items = client.list("nodes")
    except ApiError:
        return False
    ready = {
        item["metadata"]["name"]
        for item in items
        for condition in item.get("status", {}).get("conditions", [])
        if condition["type"] == "Ready" and condition["status"] == "True"
    }
    return ready == set(names)


def _fetch(node: NetnsNode) -> RawResponse | None:
    """The blob from ``node`` (which fetches it first), or None while it cannot."""
    try:
        with node.client(timeout=120) as client:
            return client.get_blob(DIGEST)
    except ApiError:
        return None


def _holds(node: NetnsNode) -> bool:
    with node.client() as client:
        return client.blob_size(DIGEST) is not None


def test_a_fetch_goes_through_a_relay_where_there_is_no_direct_route(
    tmp_path: Path, pollen_env: dict[str, str]
) -> None:
    names = ["h0", "h1", "h2"]
    with Topology([2, 2, 2]) as topology, swarm(topology, tmp_path, pollen_env) as nodes:
        wait_for(lambda: all(_ready(n, names) for n in nodes), 60, "every node Ready everywhere")
        # h0 and h2 lose their direct route; both still reach h1, which does not hold it.
        topology.partition([0], [2])
        with nodes[2].client(timeout=60) as client:
            client.put_blob(DIGEST, DATA)
        answer = wait_for(lambda: _fetch(nodes[0]), 120, "h0 to fetch the blob from h2")
        assert answer.body == DATA
        assert answer.headers["Pollen-Fetched-From"] == "h2"
        assert answer.headers["Pollen-Fetched-Via"] == "h1"
        assert _holds(nodes[0]) and not _holds(nodes[1])
        print(f"\nrelayed fetch ({topology.backend}): {answer.headers['Pollen-Fetch-Seconds']}s")


def test_a_tampered_holder_is_left_and_the_good_one_serves(
    tmp_path: Path, pollen_env: dict[str, str]
) -> None:
    names = ["h0", "h1", "h2"]
    with Topology([2, 2, 2]) as topology, swarm(topology, tmp_path, pollen_env) as nodes:
        wait_for(lambda: all(_ready(n, names) for n in nodes), 60, "every node Ready everywhere")
        for holder in nodes[1:]:
            with holder.client(timeout=60) as client:
                client.put_blob(DIGEST, DATA)
        # Flip one byte of h1's stored copy in place, as bit rot or an intruder would.
        stored = nodes[1].data_dir / "artifacts" / "sha256" / DIGEST.removeprefix("sha256:")
        with open(stored, "r+b") as file:
            file.seek(len(DATA) // 2)
            byte = file.read(1)
            file.seek(len(DATA) // 2)
            file.write(bytes([byte[0] ^ 0x01]))
        answer = wait_for(lambda: _fetch(nodes[0]), 120, "h0 to fetch the blob")
        assert answer.body == DATA
        # Only h2 sent chunks; h1 found its copy corrupt when asked, dropped it and refused.
        assert answer.headers["Pollen-Fetch-Sources"] == "h2"
        assert not _holds(nodes[1])
        with nodes[0].client() as client:
            assert client.blob_size(DIGEST) == len(DATA)
