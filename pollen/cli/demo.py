"""``pollen demo``: one command from a fresh clone to a swarm running the example manifests.

It drives the same commands a user would type (``pollen init``, ``pollen node``, ``pctl``) as
separate processes, and prints each command before its output, so the demo doubles as a tour.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import orjson

from pollen.cli.localnode import tool

REPO = Path(__file__).resolve().parents[2]
DEMO_DIR = REPO / "build" / "demo"
MANIFESTS = REPO / "manifests" / "examples"
BUILT = REPO / "build" / "examples"
#: The modules the example manifests name (``make examples`` builds them).
EXAMPLES = ("hello", "echo", "cpu")


def _say(text: str) -> None:
    print(f"\n\033[1m{text}\033[0m", flush=True)


def _run(*args: str) -> int:
    print(f"\n$ {shlex.join(args)}", flush=True)
    return subprocess.run([tool(args[0]), *args[1:]], check=False).returncode


def run_demo() -> int:
    """Run the demo; returns the exit status."""
    if not MANIFESTS.is_dir():
        print(f"error: {MANIFESTS} not found; run the demo from a clone", file=sys.stderr)
        return 1
    missing = [name for name in EXAMPLES if not (BUILT / f"{name}.wasm").exists()]
    if missing:
        print(f"error: {', '.join(missing)} not built; run 'make examples'", file=sys.stderr)
        return 1
    if (DEMO_DIR / "swarm.json").exists():
        _run("pollen", "down", "--dir", str(DEMO_DIR))
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    DEMO_DIR.mkdir(parents=True)
    os.environ.setdefault("POLLEN_CONFIG", str(DEMO_DIR / "pctl-config.yaml"))
    _say("1. A local swarm of three nodes: init, tokens, join over QUIC")
    if _run("pollen", "up", "--nodes", "3", "--dir", str(DEMO_DIR), "--detach") != 0:
        return 1
    try:
        _run("pctl", "get", "nodes", "-o", "wide")
        _say("2. Push the example modules: every node becomes a registry for what it holds")
        for name in EXAMPLES:
            if _run("pctl", "push", str(BUILT / f"{name}.wasm"), "--name", name) != 0:
                return 1
        _say("3. Apply the example manifests on node-1; nodes claim replicas by scoring themselves")
        if _run("pctl", "--context", "node-1", "apply", "-f", str(MANIFESTS)) != 0:
            return 1
        _run("pctl", "--context", "node-3", "wait", "workload/hello",
             "--for=condition=Ready", "--timeout", "60s")  # fmt: skip
        _run("pctl", "--context", "node-3", "get", "workloads", "-o", "wide")
        _run("pctl", "get", "replicas", "-o", "wide")
        _run("pctl", "describe", "workload", "hello")
        _say("4. Any node's gateway answers for any workload, locally or over the mesh")
        gateways = _gateways(DEMO_DIR)
        _curl(f"{gateways['node-3']}/hello/")
        _curl(f"{gateways['node-2']}/echo/demo?from=pollen")
        _say("5. Change one and see the difference first")
        changed = DEMO_DIR / "hello-3-replicas.yaml"
        changed.write_text(
            (MANIFESTS / "hello.yaml").read_text().replace("replicas: 2", "replicas: 3")
        )
        _run("pctl", "diff", "-f", str(changed))
        _run("pctl", "apply", "-f", str(changed))
        _run("pctl", "wait", "workload/hello", "--for=condition=Ready", "--timeout", "60s")
        _run("pctl", "get", "replicas", "-o", "wide")
        _say("6. Kill node-3 with SIGKILL: NotReady everywhere, its replicas claimed elsewhere")
        _kill(DEMO_DIR, "node-3")
        _run("pctl", "--context", "node-2", "wait", "node/node-3",
             "--for=condition=Ready=False", "--timeout", "30s")  # fmt: skip
        _run("pctl", "--context", "node-2", "get", "nodes")
        _run("pctl", "--context", "node-2", "wait", "workload/echo",
             "--for=condition=Ready", "--timeout", "30s")  # fmt: skip
        _run("pctl", "--context", "node-2", "get", "replicas", "-o", "wide")
        _curl(f"{gateways['node-1']}/echo/after-the-kill")
        _run("pctl", "events")
        if sys.stdin.isatty():
            _say("The swarm keeps running; in another shell:")
            print(f"  export POLLEN_CONFIG={os.environ['POLLEN_CONFIG']}")
            print("  pctl get nodes -o wide")
            print("Press Ctrl-C to stop it.")
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
        return 0
    finally:
        _run("pollen", "down", "--dir", str(DEMO_DIR))


def _kill(directory: Path, name: str) -> None:
    swarm = orjson.loads((directory / "swarm.json").read_bytes())
    for node in swarm["nodes"]:
        if node["name"] == name:
            print(f"\n$ kill -9 {node['pid']}  # {name}", flush=True)
            os.kill(int(node["pid"]), signal.SIGKILL)


def _gateways(directory: Path) -> dict[str, str]:
    swarm = orjson.loads((directory / "swarm.json").read_bytes())
    return {node["name"]: str(node["gateway"]) for node in swarm["nodes"]}


def _curl(url: str) -> None:
    """What ``curl -s URL`` prints, without needing curl."""
    print(f"\n$ curl -s {url}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            print(response.read().decode(errors="replace").rstrip(), flush=True)
    except (OSError, urllib.error.URLError) as exc:
        print(f"curl: {exc}", flush=True)
