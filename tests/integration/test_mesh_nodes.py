"""A swarm of real node processes on loopback: join with tokens, gossip, failure detection."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from pollen.api.client import ApiClient
from pollen.api.errors import ApiError
from pollen.cli.localnode import LocalNode, init_node, tool
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

MESH = ["--listen", "127.0.0.1:0"]
ROOT = Path(__file__).resolve().parents[2]


def build_examples(*names: str) -> dict[str, Path]:
    """``build/examples/NAME.wasm`` for each name, built as ``make examples`` builds them."""
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "build.py"), "--out", "build/examples", *names],
        cwd=ROOT, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return {name: ROOT / "build" / "examples" / f"{name}.wasm" for name in names}


@contextlib.contextmanager
def running_swarm(
    work: Path,
    names: Sequence[str],
    *,
    push: Sequence[str] = (),
    extra: Mapping[str, Sequence[str]] | None = None,
) -> Iterator[Swarm]:
    """``names[0]`` initialised and the others joined (with ``extra`` arguments each), every
    node Ready in every view, the example modules ``push`` pushed under their names with pctl
    (whose current context is the first node); every node killed at the end."""
    modules = build_examples(*push) if push else {}
    swarm = Swarm(work, {**os.environ, "POLLEN_CONFIG": str(work / "pctl-config.yaml")})
    try:
        swarm.first(names[0])
        for name in names[1:]:
            swarm.join(name, extra=(extra or {}).get(name, ()))
        expected = dict.fromkeys(names, "True")
        wait_for(
            lambda: all(swarm.ready_view(n) == expected for n in names),
            timeout=60,
            what=f"{len(names)} nodes Ready everywhere",
        )
        for name, path in modules.items():
            subprocess.run(
                [tool("pctl"), "push", str(path), "--name", name],
                env=swarm.env, capture_output=True, timeout=60, check=True,
            )  # fmt: skip
        yield swarm
    finally:
        for node in swarm.nodes.values():
            node.kill()


def _workload(name: str, replicas: int = 1) -> dict[str, object]:
    return {
        "apiVersion": "pollen.dev/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": name},
        "spec": {"artifact": "sha256:" + "2" * 64, "replicas": replicas},
    }


class Swarm:
    """Nodes started the way users start them: init, token create, node --join."""

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.work = work
        self.env = env
        self.nodes: dict[str, LocalNode] = {}

    def first(self, name: str = "n1") -> LocalNode:
        init_node(self.work / name, name, env=self.env)
        node = LocalNode(self.work / name, self.work / f"{name}.log", self.env, list(MESH))
        node.start()
        self.nodes[name] = node
        return node

    def token(self, ttl: str = "10m") -> str:
        result = subprocess.run(
            [tool("pollen"), "token", "create", "--data-dir", str(self.work / "n1"), "--ttl", ttl],
            env=self.env,
            capture_output=True,
            check=True,
            timeout=60,
        )
        return result.stdout.decode().strip()

    def join(self, name: str, token: str | None = None, extra: Sequence[str] = ()) -> LocalNode:
        args = [*MESH, "--name", name, "--join", token or self.token(), *extra]
        node = LocalNode(self.work / name, self.work / f"{name}.log", self.env, args)
        node.start()
        self.nodes[name] = node
        return node

    def client(self, name: str) -> ApiClient:
        node = self.nodes[name]
        return ApiClient(node.url, node.token, timeout=10)

    def ready_view(self, observer: str) -> dict[str, str]:
        """Each Node's Ready status as ``observer`` sees it."""
        try:
            items = self.client(observer).list("nodes")
        except ApiError:
            return {}
        view = {}
        for item in items:
            conditions = item.get("status", {}).get("conditions", [])
            ready = [c["status"] for c in conditions if c["type"] == "Ready"]
            view[item["metadata"]["name"]] = ready[0] if ready else "Unknown"
        return view


@pytest.fixture
def swarm(tmp_path: Path, pollen_env: dict[str, str]) -> Iterator[Swarm]:
    swarm = Swarm(tmp_path, pollen_env)
    yield swarm
    for node in swarm.nodes.values():
        node.kill()


def _all_see(swarm: Swarm, expected: dict[str, str]) -> Callable[[], bool]:
    def check() -> bool:
        return all(
            swarm.ready_view(observer) == expected
            for observer, node in swarm.nodes.items()
            if node.running()
        )

    return check


def test_nodes_join_with_tokens_and_share_the_document(tmp_path: Path) -> None:
    with running_swarm(tmp_path, ["n1", "n2", "n3"]) as swarm:
        swarm.client("n2").apply([_workload("from-n2", 2)])
        for observer in ("n1", "n3"):
            wait_for(
                lambda o=observer: any(
                    w["metadata"]["name"] == "from-n2" for w in swarm.client(o).list("workloads")
                ),
                timeout=15,
                what=f"the workload applied on n2 to reach {observer}",
            )
        # Each node describes itself in its Node: addresses, capacity (not what admission wrote).
        node3 = swarm.client("n1").get("nodes", "n3")
        assert any(a.startswith("quic://") for a in node3["spec"]["addresses"])
        assert node3["spec"]["capacity"]["cpuMillis"] > 0


def test_a_killed_node_becomes_not_ready_everywhere_and_comes_back(tmp_path: Path) -> None:
    with running_swarm(tmp_path, ["n1", "n2", "n3"]) as swarm:
        swarm.nodes["n3"].kill()
        wait_for(
            _all_see(swarm, {"n1": "True", "n2": "True", "n3": "False"}),
            timeout=30,
            what="n3 NotReady on n1 and n2",
        )
        # While n3 is away the others keep working, and n3 catches up when it is back.
        swarm.client("n1").apply([_workload("while-away")])
        swarm.nodes["n3"].start()
        wait_for(
            _all_see(swarm, {"n1": "True", "n2": "True", "n3": "True"}),
            timeout=30,
            what="n3 Ready again everywhere",
        )
        wait_for(
            lambda: any(
                w["metadata"]["name"] == "while-away" for w in swarm.client("n3").list("workloads")
            ),
            timeout=15,
            what="n3 to catch up with what was applied while it was away",
        )


def _ready_events(swarm: Swarm, observer: str, subject: str) -> list[tuple[str, int]]:
    """(reason, count) of the Ready events ``observer`` recorded about ``subject``'s Node."""
    return [
        (e["reason"], e["count"])
        for e in swarm.client(observer).list("events")
        if e["involvedObject"] == {"kind": "Node", "name": subject}
        and e["reason"] in ("NodeReady", "NodeUnreachable")
    ]


def test_a_paused_node_is_declared_dead_and_ready_again_by_its_peer_alone(
    tmp_path: Path,
) -> None:
    """A node frozen for a while (SIGSTOP: a stalled VM, a long pause) is declared dead; once
    it runs again and refutes, the peer that wrote NotReady writes Ready. The node itself does
    not overwrite its Ready: each such write used to start a tug of war with that peer (a
    document change everywhere each time), which on a busy machine fed more false deaths."""
    with running_swarm(tmp_path, ["n1", "n2", "n3"]) as swarm:
        paused = swarm.nodes["n3"]
        assert _ready_events(swarm, "n3", "n3") == [("NodeReady", 1)]
        os.kill(paused.pid, signal.SIGSTOP)
        try:
            wait_for(
                lambda: all(swarm.ready_view(o).get("n3") == "False" for o in ("n1", "n2")),
                timeout=30,
                what="n3 NotReady on n1 and n2",
            )
        finally:
            os.kill(paused.pid, signal.SIGCONT)
        wait_for(
            _all_see(swarm, {"n1": "True", "n2": "True", "n3": "True"}),
            timeout=30,
            what="n3 Ready again everywhere",
        )
        # A peer wrote NotReady; n3 wrote nothing about its own Ready after its start (the
        # way back is the peers' write, or n3's own last write winning the merge with the
        # NotReady it had not seen yet when it resumed).
        by_peers = _ready_events(swarm, "n1", "n3") + _ready_events(swarm, "n2", "n3")
        assert ("NodeUnreachable", 1) in by_peers
        assert _ready_events(swarm, "n3", "n3") == [("NodeReady", 1)]


def _join_once(swarm: Swarm, name: str, token: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``pollen node --join`` expecting it to stop (a refused join exits at once)."""
    return subprocess.run(
        [tool("pollen"), "node", "--data-dir", str(swarm.work / name), "--name", name,
         *MESH, "--api", "127.0.0.1:0", "--join", token],
        env=swarm.env, capture_output=True, timeout=60, check=False,
    )  # fmt: skip


def test_a_token_is_spent_once(swarm: Swarm) -> None:
    swarm.first("n1")
    token = swarm.token()
    swarm.join("n2", token)
    reuse = _join_once(swarm, "n3", token)
    assert reuse.returncode != 0
    assert b"error:" in reuse.stderr
    assert not (swarm.work / "n3" / "node.json").exists()


def test_a_forged_token_is_refused(swarm: Swarm) -> None:
    swarm.first("n1")
    token = swarm.token()
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    result = _join_once(swarm, "n4", forged)
    assert result.returncode != 0
    assert b"token" in result.stderr
    assert not (swarm.work / "n4" / "node.json").exists()


def test_pollen_up_detach_and_down(tmp_path: Path, pollen_env: dict[str, str]) -> None:
    import os

    import orjson
    import yaml

    directory = tmp_path / "swarm"
    up = subprocess.run(
        [tool("pollen"), "up", "--nodes", "3", "--dir", str(directory), "--detach"],
        env=pollen_env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    swarm = orjson.loads((directory / "swarm.json").read_bytes()) if up.returncode == 0 else {}
    pids = [n["pid"] for n in swarm.get("nodes", [])]
    try:
        assert up.returncode == 0, up.stderr.decode()
        nodes = swarm["nodes"]
        assert [n["name"] for n in nodes] == ["node-1", "node-2", "node-3"]
        for node in nodes:
            assert set(node) == {"name", "context", "listen", "api", "gateway", "dataDir", "pid"}
            assert node["api"].startswith("http://127.0.0.1:")
            assert node["gateway"].startswith("http://127.0.0.1:")
        config = yaml.safe_load(Path(pollen_env["POLLEN_CONFIG"]).read_text())
        assert config["current-context"] == "node-1"
        assert {c["name"] for c in config["contexts"]} == {"node-1", "node-2", "node-3"}
        listed = subprocess.run(
            [tool("pctl"), "--context", "node-3", "get", "nodes", "-o", "json"],
            env=pollen_env,
            capture_output=True,
            timeout=60,
            check=True,
        )
        items = orjson.loads(listed.stdout)["items"]
        assert len(items) == 3
    finally:
        down = subprocess.run(
            [tool("pollen"), "down", "--dir", str(directory)],
            env=pollen_env,
            capture_output=True,
            timeout=120,
            check=False,
        )
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
    assert down.returncode == 0, down.stderr.decode()
    config = yaml.safe_load(Path(pollen_env["POLLEN_CONFIG"]).read_text())
    assert config["contexts"] == []
    assert not (directory / "swarm.json").exists()


def test_deleting_a_node_revokes_it(swarm: Swarm) -> None:
    swarm.first("n1")
    swarm.join("n2")
    swarm.join("n3")
    wait_for(
        _all_see(swarm, {"n1": "True", "n2": "True", "n3": "True"}),
        timeout=30,
        what="every node Ready everywhere",
    )
    deleted = swarm.client("n1").delete("nodes", "n3")
    assert deleted["metadata"].get("deletionTimestamp"), deleted["metadata"]  # marked: revoked
    wait_for(
        lambda: all(swarm.ready_view(o).get("n3") == "False" for o in ("n1", "n2")),
        timeout=30,
        what="n3 NotReady on n1 and n2 once revoked",
    )
    # n3 comes back with its old certificate: refused in the handshake, so it never hears of
    # anything written afterwards.
    swarm.nodes["n3"].kill()
    swarm.nodes["n3"].start()
    swarm.client("n1").apply([_workload("after-revocation")])
    wait_for(
        lambda: any(
            w["metadata"]["name"] == "after-revocation"
            for w in swarm.client("n2").list("workloads")
        ),
        timeout=15,
        what="the write to reach n2",
    )
    names = {w["metadata"]["name"] for w in swarm.client("n3").list("workloads")}
    assert "after-revocation" not in names
    assert b"refused" in swarm.nodes["n1"].log_path.read_bytes() or b"revoked" in (
        swarm.nodes["n1"].log_path.read_bytes()
    )
