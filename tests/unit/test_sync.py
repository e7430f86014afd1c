"""Document gossip: convergence, loss, hostile payloads, reconnection, and quiet when idle."""

from __future__ import annotations

import contextlib
import heapq
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pollen.mesh.sync import (
    DIGEST,
    RESET,
    SYNC,
    DocumentGossip,
    GossipConfig,
    SyncError,
    heads_digest,
)
from pollen.resources.models import from_dict
from pollen.state.document import StateDocument
from pollen.state.store import ChangeEvent, ChangeType, ResourceStore


def workload(name: str, replicas: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "pollen.dev/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": name, "generation": 1, "uid": f"uid-{name}"},
        "spec": {"artifact": "sha256:" + "a" * 64, "replicas": replicas, "executor": "http"},
    }


class Net:
    """Gossip instances wired by an in-memory channel with delay, loss and a drop hook."""

    def __init__(
        self,
        names: Iterable[str],
        *,
        seed: int = 1,
        loss: float = 0.0,
        links: dict[str, list[str]] | None = None,
        config: GossipConfig | None = None,
    ) -> None:
        self.rng = random.Random(seed)
        self.names = list(names)
        self.loss = loss
        self.now = 0.0
        self.docs = {n: StateDocument.new(actor_id=self.rng.randbytes(16)) for n in self.names}
        self.gossip = {
            n: DocumentGossip(self.docs[n], 0.0, config=config, rng=random.Random(seed + i))
            for i, n in enumerate(self.names)
        }
        self.queue: list[tuple[float, int, str, str, bytes]] = []
        self.seq = 0
        self.log: list[tuple[float, str, str, bytes]] = []
        #: Returns True to drop a payload (src, dst, payload).
        self.drop: Callable[[str, str, bytes], bool] = lambda src, dst, payload: False
        for name in self.names:
            peers = links[name] if links is not None else [p for p in self.names if p != name]
            self.gossip[name].set_peers(peers, 0.0)
            self.pump(name)

    def pump(self, name: str) -> None:
        for dst, payload in self.gossip[name].drain_outgoing():
            self.log.append((self.now, name, dst, payload))
            if self.rng.random() < self.loss or self.drop(name, dst, payload):
                continue
            self.seq += 1
            delay = self.rng.uniform(0.01, 0.05)
            heapq.heappush(self.queue, (self.now + delay, self.seq, name, dst, payload))

    def write(self, name: str, obj_name: str, replicas: int = 1) -> None:
        self.docs[name].write("Workload", obj_name, workload(obj_name, replicas))
        self.gossip[name].on_local_change(self.now)
        self.pump(name)

    def run(self, duration: float) -> None:
        end = self.now + duration
        while True:
            at = min(g.next_deadline() for g in self.gossip.values())
            if self.queue:
                at = min(at, self.queue[0][0])
            if at > end:
                self.now = end
                return
            self.now = max(self.now, at)
            while self.queue and self.queue[0][0] <= self.now:
                _, _, src, dst, payload = heapq.heappop(self.queue)
                self.gossip[dst].receive(src, payload, self.now)
                self.pump(dst)
            for name, gossip in self.gossip.items():
                if gossip.next_deadline() <= self.now:
                    gossip.tick(self.now)
                    self.pump(name)

    def converged(self) -> bool:
        return len({heads_digest(doc.heads()) for doc in self.docs.values()}) == 1

    def sent_since(self, start: float) -> list[tuple[float, str, str, bytes]]:
        return [entry for entry in self.log if entry[0] >= start]


def test_two_documents_converge_after_concurrent_writes() -> None:
    net = Net(["a", "b"])
    net.run(1.0)
    net.docs["a"].write("Workload", "from-a", workload("from-a"))
    net.docs["b"].write("Workload", "from-b", workload("from-b"))
    net.docs["a"].write("Workload", "shared", workload("shared", replicas=2))
    net.docs["b"].write("Workload", "shared", workload("shared", replicas=3))
    for name in ("a", "b"):
        net.gossip[name].on_local_change(net.now)
        net.pump(name)
    net.run(1.0)
    assert net.converged()
    for doc in net.docs.values():
        assert doc.names("Workload") == ["from-a", "from-b", "shared"]
    a, b = (net.docs[n].read("Workload", "shared") for n in ("a", "b"))
    assert a == b  # the conflict resolved the same way on both sides


def test_three_documents_converge_through_a_middle_node() -> None:
    # a and c never talk: every change between them goes through b.
    net = Net(["a", "b", "c"], links={"a": ["b"], "b": [], "c": ["b"]})
    for i in range(5):
        net.write("a", f"a-{i}")
        net.write("c", f"c-{i}")
        net.run(0.003)
    net.run(2.0)
    assert net.converged()
    assert len(net.docs["b"].names("Workload")) == 10
    assert not any(src == "a" and dst == "c" for _, src, dst, _ in net.log)


def test_a_change_is_pushed_without_waiting_for_anti_entropy() -> None:
    net = Net(["a", "b", "c"], config=GossipConfig(anti_entropy_interval=60.0))
    net.run(0.5)
    net.write("a", "fast")
    net.run(0.2)
    assert all(doc.names("Workload") == ["fast"] for doc in net.docs.values())


@pytest.mark.parametrize("seed", range(6))
def test_sync_over_a_lossy_channel(seed: int) -> None:
    names = [f"n{i}" for i in range(5)]
    ring = {n: [names[(i + 1) % len(names)]] for i, n in enumerate(names)}
    net = Net(names, seed=seed, loss=0.3, links=ring)
    for i in range(8):
        net.write(net.rng.choice(names), f"w-{i}")
        net.run(net.rng.uniform(0.0, 0.5))
    net.run(120.0)
    assert net.converged()
    assert all(len(doc.names("Workload")) == 8 for doc in net.docs.values())


def test_a_lost_push_is_repaired_by_anti_entropy() -> None:
    # The single push of a change is lost and nothing else is written: without the digest
    # exchange and the mutual reset, the two sync states would stay silent for ever.
    net = Net(["a", "b"])
    net.run(1.0)
    lost: list[bytes] = []

    def drop_first_sync(src: str, dst: str, payload: bytes) -> bool:
        if payload[0] == SYNC and not lost:
            lost.append(payload)
            return True
        return False

    net.drop = drop_first_sync
    net.write("a", "lost-once")
    net.run(0.5)
    assert lost and not net.converged()
    net.run(10.0)
    assert net.converged()
    assert net.docs["b"].names("Workload") == ["lost-once"]


def test_an_exchange_going_round_in_circles_stops() -> None:
    # Lose a push, then keep writing: automerge alone ping-pongs the same request for ever
    # (its state never re-sends a change it believes sent). The gossip must notice the
    # repetition, reset both sides and converge, and the message count must stay bounded.
    net = Net(["a", "b"], config=GossipConfig(anti_entropy_interval=100.0))
    net.run(0.1)
    dropped: list[bytes] = []

    def drop_one(src: str, dst: str, payload: bytes) -> bool:
        if src == "a" and payload[0] == SYNC and not dropped:
            dropped.append(payload)
            return True
        return False

    net.drop = drop_one
    net.write("a", "first")
    net.run(0.2)
    net.write("a", "second")
    before = len(net.log)
    net.run(5.0)
    assert net.converged()
    assert len(net.log) - before < 20
    assert net.gossip["a"].stats.resets + net.gossip["b"].stats.resets >= 1


def test_idle_peers_go_quiet() -> None:
    names = [f"n{i}" for i in range(4)]
    net = Net(names)
    for i, name in enumerate(names):
        net.write(name, f"w-{i}")
    net.run(5.0)
    assert net.converged()
    start = net.now
    net.run(60.0)
    idle = net.sent_since(start)
    # Only digests, one per node per anti-entropy interval; each is 9 bytes.
    assert {payload[0] for _, _, _, payload in idle} == {DIGEST}
    per_node_per_s = sum(len(p) for _, _, _, p in idle) / len(names) / 60.0
    assert per_node_per_s <= 9 * 1.3
    assert all(g.stats.resets == 0 for g in net.gossip.values())


def test_peer_up_resets_and_a_restarted_peer_catches_up() -> None:
    net = Net(["a", "b"])
    for i in range(3):
        net.write("a", f"w-{i}")
    net.run(2.0)
    assert net.converged()
    # b loses everything (a fresh disk) and comes back with new gossip state.
    net.docs["b"] = StateDocument.new()
    net.gossip["b"] = DocumentGossip(net.docs["b"], net.now, rng=random.Random(9))
    net.gossip["b"].set_peers(["a"], net.now)
    start = net.now
    net.gossip["a"].peer_up("b", net.now)
    net.pump("a")
    net.run(0.02)
    first = [p for t, src, dst, p in net.log if src == "a" and dst == "b" and t >= start]
    assert first and first[0][0] == RESET
    net.run(2.0)
    assert net.docs["b"].names("Workload") == ["w-0", "w-1", "w-2"]


def test_a_stale_state_on_the_other_side_is_reset_by_the_first_message() -> None:
    # a restarts its gossip (new process, same document) but b keeps its old state for a:
    # a's first message is a RESET, so b starts over too instead of trusting stale state.
    net = Net(["a", "b"])
    net.write("a", "one")
    net.run(1.0)
    net.gossip["a"] = DocumentGossip(net.docs["a"], net.now, rng=random.Random(5))
    net.gossip["a"].set_peers(["b"], net.now)
    net.docs["b"].write("Workload", "two", workload("two"))
    net.gossip["b"].on_local_change(net.now)
    net.pump("b")
    net.run(0.01)
    net.pump("a")
    net.run(2.0)
    assert net.converged()


def test_garbage_is_a_sync_error_and_the_node_goes_on() -> None:
    net = Net(["a", "b"])
    gossip = net.gossip["a"]
    for payload in (
        b"",
        b"\x00",
        b"\x01",
        b"\x01garbage",
        b"\x02\x42\x00",
        bytes([DIGEST]) + b"short",
        bytes([DIGEST]) + b"x" * 20,
        b"\x09" + b"\x00" * 30,
    ):
        with pytest.raises(SyncError):
            gossip.receive("mallory", payload, net.now)
    assert gossip.stats.errors == 8
    net.write("b", "after-garbage")
    net.run(1.0)
    assert net.docs["a"].names("Workload") == ["after-garbage"]


def test_an_oversized_payload_is_refused_before_decoding() -> None:
    gossip = DocumentGossip(StateDocument.new(), 0.0, config=GossipConfig(max_message_bytes=100))
    with pytest.raises(SyncError, match="101 bytes"):
        gossip.receive("mallory", bytes([SYNC]) + b"\x42" * 100, 0.0)


def _valid_messages() -> list[bytes]:
    net = Net(["a", "b"])
    net.write("a", "x")
    net.write("b", "y")
    net.run(1.0)
    return [payload for _, _, _, payload in net.log]


_VALID = _valid_messages()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_fuzz_arbitrary_bytes_raise_only_sync_error(payload: bytes) -> None:
    doc = StateDocument.new()
    gossip = DocumentGossip(doc, 0.0, rng=random.Random(0))
    with contextlib.suppress(SyncError):
        gossip.receive("fuzz", payload, 1.0)
    gossip.tick(5.0)
    gossip.drain_outgoing()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(_VALID),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    st.sampled_from([SYNC, RESET]),
)
def test_fuzz_corrupted_sync_messages_raise_only_sync_error(
    valid: bytes, flips: list[tuple[int, int]], kind: int
) -> None:
    data = bytearray(valid)
    data[0] = kind
    for position, value in flips:
        if len(data) > 1:
            data[1 + position % (len(data) - 1)] = value
    doc = StateDocument.new()
    doc.write("Workload", "mine", workload("mine"))
    gossip = DocumentGossip(doc, 0.0, rng=random.Random(0))
    gossip.set_peers(["fuzz"], 0.0)
    with contextlib.suppress(SyncError):
        gossip.receive("fuzz", bytes(data), 1.0)
    # Whatever happened, the document is still readable and the gossip still works.
    assert "mine" in doc.names("Workload")
    gossip.tick(5.0)
    gossip.drain_outgoing()


def test_sync_through_the_store_feeds_the_change_feed(tmp_path: Path) -> None:
    store = ResourceStore.open(tmp_path / "state")
    events: list[ChangeEvent] = []
    store.subscribe(events.append)
    remote = StateDocument.new()
    remote.write("Workload", "from-peer", workload("from-peer"))
    local = DocumentGossip(store, 0.0, rng=random.Random(1))
    peer = DocumentGossip(remote, 0.0, rng=random.Random(2))
    local.set_peers(["remote"], 0.0)
    peer.set_peers(["local"], 0.0)
    now = 0.0
    for _ in range(10):
        now += 0.05
        local.tick(now)
        peer.tick(now)
        for _, payload in local.drain_outgoing():
            peer.receive("local", payload, now)
        for _, payload in peer.drain_outgoing():
            local.receive("remote", payload, now)
    assert [(e.type, e.name) for e in events] == [(ChangeType.ADDED, "from-peer")]
    assert store.get("Workload", "from-peer") == from_dict(remote.read("Workload", "from-peer"))
    store.close()
    # The merged change was journaled: it is there after reopening.
    with ResourceStore.open(tmp_path / "state") as reopened:
        assert reopened.get("Workload", "from-peer") is not None


def test_set_peers_syncs_a_new_peer_at_once_and_links_expire() -> None:
    config = GossipConfig(inbound_ttl=5.0)
    net = Net(["a", "b", "c"], links={"a": ["b"], "b": [], "c": []}, config=config)
    net.run(0.5)
    assert net.gossip["b"].links() == ["a"]  # a talked to b, so b announces changes to a
    net.gossip["a"].set_peers(["c"], net.now)
    net.pump("a")
    net.run(0.5)
    assert net.gossip["a"].persistent_peers == ("c",)
    net.run(10.0)
    assert net.gossip["a"].links() == ["c"]
    assert net.gossip["b"].links() == []


def test_config_is_checked() -> None:
    with pytest.raises(ValueError):
        GossipConfig(anti_entropy_interval=0)
    with pytest.raises(ValueError):
        GossipConfig(anti_entropy_jitter=1.0)


def test_a_peer_that_chose_us_gets_a_digest_and_pulls() -> None:
    # b chose nobody; a chose b. A change on b reaches a by a lazy push: b sends a digest,
    # a pulls with a sync message, b answers with the change.
    config = GossipConfig(anti_entropy_interval=60)
    net = Net(["a", "b"], links={"a": ["b"], "b": []}, config=config)
    net.run(0.5)
    start = net.now
    net.write("b", "from-b")
    net.run(0.5)
    assert net.docs["a"].names("Workload") == ["from-b"]
    sent = [(src, payload[0]) for _, src, _, payload in net.sent_since(start)]
    assert sent[0] == ("b", DIGEST)
    assert ("a", SYNC) in sent
