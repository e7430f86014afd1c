"""A new artifact rolled out blue/green under steady requests: not one request fails.

Three real nodes; Workload ``site`` runs ``hello`` with two replicas. A client thread sends
requests to one node's gateway without pause while ``site`` is re-pointed at ``echo``: the new
generation is placed and started beside the old one, traffic moves to it, the old replicas drain.
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from pollen.api.errors import ApiError
from tests.helpers import wait_for
from tests.integration.test_mesh_nodes import Swarm, running_swarm

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["n1", "n2", "n3"]


def site(artifact: str) -> dict[str, Any]:
    return {
        "apiVersion": "pollen.dev/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": "site"},
        "spec": {"artifact": artifact, "replicas": 2, "executor": "http"},
    }


@pytest.fixture
def trio(tmp_path: Path) -> Iterator[Swarm]:
    with running_swarm(tmp_path, NAMES, push=["hello", "echo"]) as swarm:
        yield swarm


class Traffic(threading.Thread):
    """GET /site/ on one gateway, back to back, on a kept-alive connection; tallies answers."""

    def __init__(self, gateway: str) -> None:
        super().__init__(daemon=True)
        self.netloc = urlsplit(gateway).netloc
        self.stop = threading.Event()
        self.answers: Counter[str] = Counter()
        self.failures: list[str] = []

    def run(self) -> None:
        conn = http.client.HTTPConnection(self.netloc, timeout=10)
        while not self.stop.is_set():
            try:
                conn.request("GET", "/site/roll?x=1")
                response = conn.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection(self.netloc, timeout=10)
                continue
            if response.status != 200:
                self.failures.append(f"{response.status}: {body[:200]!r}")
            else:
                # echo answers with the request it saw; hello with its greeting.
                self.answers["echo" if b"/roll" in body else "hello"] += 1
        conn.close()


def phases(swarm: Swarm) -> Counter[tuple[int, str]]:
    try:
        replicas = swarm.client("n1").list("replicas")
    except ApiError:
        return Counter()
    return Counter(
        (r["spec"]["workloadGeneration"], r.get("status", {}).get("phase", ""))
        for r in replicas
        if r["spec"]["workload"] == "site"
    )


def test_a_new_artifact_rolls_out_with_zero_failed_requests(trio: Swarm) -> None:
    trio.client("n1").apply([site("hello")])
    wait_for(lambda: phases(trio) == Counter({(1, "Ready"): 2}), 60, what="hello x2 Ready")
    gateway = trio.nodes["n3"].endpoints["gateway"]
    assert isinstance(gateway, str)
    traffic = Traffic(gateway)
    traffic.start()
    try:
        wait_for(lambda: traffic.answers["hello"] >= 20, 30, what="traffic to the old version")
        trio.client("n2").apply([site("echo")])
        wait_for(
            lambda: phases(trio) == Counter({(2, "Ready"): 2}),
            90,
            what="the new generation Ready and the old one gone",
        )
        served = traffic.answers["echo"]
        wait_for(lambda: traffic.answers["echo"] >= served + 20, 30, what="traffic to the new one")
    finally:
        traffic.stop.set()
        traffic.join(15)
    assert traffic.failures == [], f"{len(traffic.failures)} failed: {traffic.failures[:5]}"
    print(f"\nrollout: {dict(traffic.answers)} answers, none failed")
