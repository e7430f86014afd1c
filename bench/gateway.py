"""Gateway benchmark: hello through a node's gateway against a plain aiohttp hello, same run.

Two real ``pollen node`` processes from ``pollen up``; hello is pushed and its one replica
pinned to node-1. wrk then measures, in alternating rounds with the same settings as the
runtime section (``bench/runtime.py``):

- node-1's gateway, ``/hello/``: served by node-1's own instance (SPEC section 7's figure);
- node-2's gateway, ``/hello/``: node-2 has no instance, so every request is forwarded over
  the mesh (QUIC on loopback) to node-1 and the answer comes back the same way;
- a plain aiohttp hello handler, the baseline.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from bench.report import Row, Section
from bench.runtime import (
    _AIOHTTP_HELLO,
    WRK_CONNECTIONS,
    WRK_ROUNDS,
    WRK_SECONDS,
    _examples,
    _free_port,
    _start_server,
    _wrk,
)
from pollen.api.client import ApiClient
from pollen.cli.config import CONFIG_ENV
from pollen.cli.localnode import tool
from pollen.cli.swarm import SwarmError, SwarmNode, down, up

#: Seconds the replica may take to be Ready, and the forwarding node to see it so.
READY_TIMEOUT = 60.0
PATH = "/hello/"


def _port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


def _wait_serving(port: int, deadline: float) -> None:
    """Until the gateway on ``port`` answers hello (the replica is Ready in its view)."""
    import http.client

    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", PATH)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        if time.monotonic() > deadline:
            raise RuntimeError(f"the gateway on port {port} did not serve hello in time")
        time.sleep(0.1)  # polling a server that is coming up; not a benchmarked figure


def _deploy(nodes: list[SwarmNode], hello: Path, env: dict[str, str]) -> None:
    subprocess.run(
        [tool("pctl"), "--context", nodes[0].context, "push", str(hello), "--name", "hello"],
        env=env,
        capture_output=True,
        timeout=60,
        check=True,
    )
    token = (Path(nodes[0].data_dir) / "api-token").read_text().strip()
    ApiClient(nodes[0].api, token).apply(
        [
            {
                "apiVersion": "pollen.dev/v1alpha1",
                "kind": "Workload",
                "metadata": {"name": "hello"},
                "spec": {
                    "artifact": "hello",
                    "replicas": 1,
                    "placement": {"nodeSelector": {"pollen.dev/hostname": nodes[0].name}},
                },
            }
        ]
    )


def _measure(local: int, forwarded: int, plain: int) -> dict[str, list[tuple[float, float]]]:
    samples: dict[str, list[tuple[float, float]]] = {"local": [], "forwarded": [], "plain": []}
    for port, path in ((local, PATH), (forwarded, PATH), (plain, "/")):
        _wrk(port, path)  # warm-up: instances, connections, the mesh stream path
    # Everything stays up (the idle side costs little) and takes turns, so that a noisy
    # machine slows every side alike.
    for _ in range(WRK_ROUNDS):
        samples["local"].append(_wrk(local, PATH))
        samples["forwarded"].append(_wrk(forwarded, PATH))
        samples["plain"].append(_wrk(plain, "/"))
    return samples


def _rows(samples: dict[str, list[tuple[float, float]]]) -> tuple[list[Row], str]:
    rate = {key: statistics.median(r for r, _ in values) for key, values in samples.items()}
    p99 = {key: statistics.median(p for _, p in values) for key, values in samples.items()}
    baseline = (
        f"plain aiohttp hello handler: {rate['plain']:,.0f} req/s (p99 {p99['plain']:.1f} ms)"
    )
    settings = f"{WRK_CONNECTIONS} connections, {WRK_SECONDS} s, median of {WRK_ROUNDS} rounds"
    local_ratio = rate["local"] / rate["plain"]
    rows = [
        Row(
            f"gateway hello, the node's own instance ({settings})",
            f"{rate['local']:,.0f} req/s (p99 {p99['local']:.1f} ms)",
            baseline,
            f"{local_ratio:.2f}",
            ">= 0.5",
            local_ratio >= 0.5,
        ),
        Row(
            "gateway hello forwarded over the mesh to the node with the replica (same settings)",
            f"{rate['forwarded']:,.0f} req/s (p99 {p99['forwarded']:.1f} ms)",
            baseline,
            f"{rate['forwarded'] / rate['plain']:.2f}",
        ),
    ]
    rounds = "; ".join(
        f"{l_[0]:,.0f}/{f[0]:,.0f}/{p[0]:,.0f}"
        for l_, f, p in zip(samples["local"], samples["forwarded"], samples["plain"], strict=True)
    )
    notes = f"wrk rounds, local/forwarded/aiohttp req/s: {rounds}."
    if local_ratio < 0.5:
        notes += (
            " The local figure misses the 0.5 target: the node serves its gateway from one "
            "process, so each request's Python (HTTP parsing, routing, the CGI environment, "
            "the WAGI answer) runs under one GIL, next to the node's mesh, gossip and "
            "reconcilers; it is on a par with `pollen run` served from one process (runtime "
            "section, ADR 0010)."
        )
    return rows, notes


def run() -> Section:
    """The gateway figures, as one report section."""
    title = "Gateway: hello through a node, locally and forwarded"
    if shutil.which("wrk") is None:
        return Section(title, [], notes="wrk is not installed: throughput not measured.")
    hello = _examples()["hello"]
    with tempfile.TemporaryDirectory(prefix="pollen-bench-gateway-") as tmp:
        work = Path(tmp)
        env = dict(os.environ, **{CONFIG_ENV: str(work / "pctl-config.yaml")})
        saved = os.environ.get(CONFIG_ENV)
        os.environ[CONFIG_ENV] = env[CONFIG_ENV]  # up() writes the contexts here
        nodes: list[SwarmNode] = []
        plain_port = _free_port()
        plain = _start_server(
            [sys.executable, "-c", _AIOHTTP_HELLO, str(plain_port)], plain_port, env
        )
        try:
            nodes = up(2, work / "swarm")
            _deploy(nodes, hello, env)
            gateways = [n.gateway for n in nodes]
            assert all(gateways), "pollen up wrote no gateway addresses"
            local, forwarded = (_port(str(g)) for g in gateways)
            deadline = time.monotonic() + READY_TIMEOUT
            _wait_serving(local, deadline)
            _wait_serving(forwarded, deadline)
            samples = _measure(local, forwarded, plain_port)
        finally:
            plain.terminate()
            plain.wait(timeout=30)
            _teardown(work / "swarm", nodes)
            if saved is None:
                os.environ.pop(CONFIG_ENV, None)
            else:
                os.environ[CONFIG_ENV] = saved
    rows, rounds = _rows(samples)
    notes = (
        "Two node processes from `pollen up` on the same 2 cores as wrk and the aiohttp "
        "server; hello's one replica is pinned to node-1. The local row is node-1's gateway "
        "(parse, route, a fresh instance per request, answer); the forwarded row is node-2's "
        "gateway, which holds no instance and sends every request to node-1 over a mesh "
        "stream (QUIC on loopback, one stream per request), so both node processes work for "
        "each request. " + rounds
    )
    return Section(title, rows, notes=notes)


def _teardown(directory: Path, nodes: list[SwarmNode]) -> None:
    with contextlib.suppress(SwarmError, OSError):
        down(directory)
    for node in nodes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(node.pid, signal.SIGKILL)


if __name__ == "__main__":
    from bench.report import render

    print(render([run()]))
