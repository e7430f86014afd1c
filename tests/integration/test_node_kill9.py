"""kill -9 of the daemon during a stream of applies loses nothing it acknowledged."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import pytest

from pollen.api.client import ApiClient
from pollen.api.errors import ApiError
from tests.conftest import NodeProcess
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

ROUNDS = 4


def _workload(name: str, replicas: int) -> dict[str, object]:
    return {
        "apiVersion": "pollen.dev/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": name, "labels": {"round": name.split("-")[1]}},
        "spec": {"artifact": "sha256:" + "1" * 64, "replicas": replicas},
    }


def _apply_until_refused(
    client: ApiClient, round_number: int, acknowledged: dict[str, int], stop: threading.Event
) -> None:
    """Apply new objects and updates one at a time, recording each acknowledged one."""
    i = 0
    while not stop.is_set():
        name = f"w-{round_number}-{i}"
        replicas = i % 7
        try:
            client.apply([_workload(name, replicas)])
        except ApiError:
            return  # the node died under us; what it acknowledged before is recorded
        acknowledged[name] = replicas
        i += 1


def test_acknowledged_applies_survive_sigkill_at_random_points(
    node_factory: Callable[..., NodeProcess],
) -> None:
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    node = node_factory()
    acknowledged: dict[str, int] = {}
    for round_number in range(ROUNDS):
        client = ApiClient(node.url, node.token, timeout=10)
        stop = threading.Event()
        before = len(acknowledged)
        writer = threading.Thread(
            target=_apply_until_refused, args=(client, round_number, acknowledged, stop)
        )
        writer.start()
        # Kill after a random number of acknowledged writes, so the kill lands at a random
        # point of the apply path (decode, store, fsync, answer).
        target = before + rng.randrange(5, 60)
        wait_for(lambda t=target: len(acknowledged) >= t, timeout=60, what="acknowledged writes")
        node.kill()
        stop.set()
        writer.join(timeout=30)
        assert not writer.is_alive()
        node.start()
        wait_for(node.healthy, what="the restarted node")
        present = {
            item["metadata"]["name"]: item["spec"]["replicas"]
            for item in node.client().list("workloads")
        }
        missing = {k: v for k, v in acknowledged.items() if present.get(k) != v}
        assert not missing, f"seed {seed}: acknowledged but lost after kill -9: {missing}"
