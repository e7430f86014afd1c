"""``pollen up`` and ``pollen down``: a local swarm of real node processes on 127.0.0.1.

``up`` does what a user would do by hand: ``pollen init`` the first node, start it, then for
every other node ``pollen token create`` and ``pollen node --join``. It writes one pctl context
per node (the first one current) and ``DIR/swarm.json``, and returns once every node is Ready
in the first node's view (with ``--detach``), or keeps the swarm running until Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from pollen.cli.config import Context, load_config, remove_context, save_context
from pollen.cli.localnode import LocalNode, NodeStartError, init_node, tool

SWARM_FILE = "swarm.json"
READY_TIMEOUT = 60.0


class SwarmError(Exception):
    """The swarm could not be started or stopped; one sentence."""


@dataclass(frozen=True)
class SwarmNode:
    name: str
    context: str
    listen: str
    api: str
    gateway: str | None
    data_dir: str
    pid: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "context": self.context,
            "listen": self.listen,
            "api": self.api,
            "gateway": self.gateway,
            "dataDir": self.data_dir,
            "pid": self.pid,
        }


def _token(first: Path, env: dict[str, str]) -> str:
    result = subprocess.run(
        [tool("pollen"), "token", "create", "--data-dir", str(first), "--ttl", "10m"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise SwarmError(result.stderr.decode(errors="replace").strip() or "token create failed")
    return result.stdout.decode().strip()


def _all_ready(node: LocalNode, names: list[str]) -> bool:
    from pollen.api.client import ApiClient
    from pollen.api.errors import ApiError

    try:
        items = ApiClient(node.url, node.token, timeout=5).list("nodes")
    except ApiError:
        return False
    ready = set()
    for item in items:
        # Ready, and described by the node itself (its own write, gossiped to the first node),
        # not only the stub that admission wrote.
        if not item.get("status", {}).get("api"):
            continue
        for cond in item.get("status", {}).get("conditions", []):
            if cond.get("type") == "Ready" and cond.get("status") == "True":
                ready.add(item["metadata"]["name"])
    return all(name in ready for name in names)


def up(
    count: int, directory: Path, *, cluster: str = "pollen", plugins: Sequence[str] = ()
) -> list[SwarmNode]:
    """Start ``count`` nodes in ``directory`` and wait until all are Ready; see the module doc.

    Every node is started with ``--plugin`` for each of ``plugins``.
    """
    if count < 1:
        raise SwarmError("--nodes must be at least 1")
    if (directory / SWARM_FILE).exists():
        raise SwarmError(f"{directory / SWARM_FILE} exists: run 'pollen down --dir {directory}'")
    directory.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    names = [f"node-{i}" for i in range(1, count + 1)]
    started: list[LocalNode] = []
    try:
        first_dir = directory / names[0]
        init_node(first_dir, names[0], env=env, cluster=cluster)
        for index, name in enumerate(names):
            args = ["--listen", "127.0.0.1:0", "--name", name]
            for plugin in plugins:
                args += ["--plugin", plugin]
            if index > 0:
                args += ["--join", _token(first_dir, env)]
            node = LocalNode(
                data_dir=directory / name,
                log_path=directory / f"{name}.log",
                env=env,
                extra_args=args,
            )
            node.spawn()
            started.append(node)
            if index == 0:
                # The others' tokens carry the first node's mesh address: wait for it.
                node.wait_serving()
        for node in started[1:]:
            node.wait_serving()
        deadline = time.monotonic() + READY_TIMEOUT
        while not _all_ready(started[0], names):
            if time.monotonic() > deadline:
                raise SwarmError(f"not every node was Ready within {READY_TIMEOUT:.0f}s")
            if any(not n.running() for n in started):
                raise SwarmError("a node exited while the swarm was starting; see its log")
            time.sleep(0.1)
    except (NodeStartError, SwarmError) as exc:
        for node in started:
            node.kill()
        raise SwarmError(str(exc)) from exc
    swarm: list[SwarmNode] = []
    for index, (name, node) in enumerate(zip(names, started, strict=True)):
        save_context(Context(name, node.url, node.token), make_current=index == 0)
        swarm.append(
            SwarmNode(
                name=name,
                context=name,
                listen=str(node.endpoints.get("listen")),
                api=node.url,
                gateway=str(node.endpoints["gateway"]) if node.endpoints.get("gateway") else None,
                data_dir=str(node.data_dir.resolve()),
                pid=node.pid,
            )
        )
    path = directory / SWARM_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(
        orjson.dumps({"nodes": [n.to_json() for n in swarm]}, option=orjson.OPT_INDENT_2)
    )
    os.replace(tmp, path)
    return swarm


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs; a zombie (exited, not yet reaped by its new parent) does not."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def down(directory: Path, timeout: float = 30.0) -> list[str]:
    """Stop the swarm described by ``DIR/swarm.json`` and remove its pctl contexts."""
    path = directory / SWARM_FILE
    try:
        data = orjson.loads(path.read_bytes())
        nodes = [(str(n["name"]), str(n["context"]), int(n["pid"])) for n in data["nodes"]]
    except FileNotFoundError as exc:
        raise SwarmError(f"no swarm in {directory} ({SWARM_FILE} is missing)") from exc
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise SwarmError(f"{path} is not a swarm file written by pollen up") from exc
    for _, _, pid in nodes:
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for _, _, pid in nodes:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    known = {c.name for c in load_config().contexts}
    for _, context, _ in nodes:
        if context in known:
            remove_context(context)
    path.unlink()
    return [name for name, _, _ in nodes]
