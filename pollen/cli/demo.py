"""``pollen demo``: one command from a fresh clone to a node with the example manifests applied.

It drives the same commands a user would type (``pollen init``, ``pollen node``, ``pctl``) as
separate processes, and prints each command before its output, so the demo doubles as a tour.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from pollen.cli.localnode import LocalNode, NodeStartError, tool

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
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    DEMO_DIR.mkdir(parents=True)
    data_dir = DEMO_DIR / "node-1"
    os.environ.setdefault("POLLEN_CONFIG", str(DEMO_DIR / "pctl-config.yaml"))
    _say("1. A new cluster with one node")
    if _run("pollen", "init", "--data-dir", str(data_dir), "--name", "node-1") != 0:
        return 1
    node = LocalNode(data_dir=data_dir, log_path=DEMO_DIR / "node-1.log")
    try:
        try:
            node.start()
        except NodeStartError as exc:
            print(node.log_path.read_text(), file=sys.stderr)
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"\nnode-1 serving its API at {node.url} (log: {node.log_path})")
        _run("pctl", "wait", "node/node-1", "--for=condition=Ready", "--timeout", "30s")
        _run("pctl", "get", "nodes", "-o", "wide")
        _say("2. Apply the example manifests")
        if _run("pctl", "apply", "-f", str(MANIFESTS)) != 0:
            return 1
        _run("pctl", "get", "workloads", "-o", "wide")
        _run("pctl", "describe", "workload", "hello")
        _say("3. Change one and see the difference first")
        changed = DEMO_DIR / "hello-3-replicas.yaml"
        changed.write_text(
            (MANIFESTS / "hello.yaml").read_text().replace("replicas: 2", "replicas: 3")
        )
        _run("pctl", "diff", "-f", str(changed))
        _run("pctl", "apply", "-f", str(changed))
        _run("pctl", "get", "workload", "hello", "-o", "yaml")
        _run("pctl", "events")
        if sys.stdin.isatty():
            _say("The node keeps running; in another shell:")
            print(f"  export POLLEN_CONFIG={os.environ['POLLEN_CONFIG']}")
            print("  pctl get workloads")
            print("Press Ctrl-C to stop it.")
            try:
                assert node.proc is not None
                node.proc.wait()
            except KeyboardInterrupt:
                pass
        return 0
    finally:
        if node.running():
            node.stop()
