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
from pathlib import Path

import orjson

from pollen.cli.localnode import tool

REPO = Path(__file__).resolve().parents[2]
DEMO_DIR = REPO / "build" / "demo"
MANIFESTS = REPO / "manifests" / "examples"


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
        _say("2. Apply the example manifests on node-1 ...")
        if _run("pctl", "--context", "node-1", "apply", "-f", str(MANIFESTS)) != 0:
            return 1
        _say("... and read them on node-3: the document is gossiped")
        _run(
            "pctl",
            "--context",
            "node-3",
            "wait",
            "workload/hello",
            "--for=create",
            "--timeout",
            "30s",
        )
        _run("pctl", "--context", "node-3", "get", "workloads", "-o", "wide")
        _run("pctl", "describe", "workload", "hello")
        _say("3. Change one and see the difference first")
        changed = DEMO_DIR / "hello-3-replicas.yaml"
        changed.write_text(
            (MANIFESTS / "hello.yaml").read_text().replace("replicas: 2", "replicas: 3")
        )
        _run("pctl", "diff", "-f", str(changed))
        _run("pctl", "apply", "-f", str(changed))
        _run("pctl", "get", "workload", "hello", "-o", "yaml")
        _say("4. Kill node-3 with SIGKILL: membership declares it NotReady everywhere")
        _kill(DEMO_DIR, "node-3")
        _run(
            "pctl",
            "--context",
            "node-2",
            "wait",
            "node/node-3",
            "--for=condition=Ready=False",
            "--timeout",
            "30s",
        )
        _run("pctl", "--context", "node-2", "get", "nodes")
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
