"""Foundation benchmarks: apply and get through pctl, document size, idle RSS.

Baselines from the same run: ``curl`` doing the same HTTP request (what the node alone costs,
without pctl), and a plain aiohttp server process for memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import psutil
import yaml

from bench.report import Row, Section, kib, median_time, mib, ms
from pollen.api.client import ApiClient
from pollen.cli.localnode import LocalNode, init_node, tool

RUNS = 5
COUNT = 1000
PREFIX = "/apis/pollen.dev/v1alpha1"


def _workload(name: str, replicas: int = 1) -> dict[str, object]:
    return {
        "apiVersion": "pollen.dev/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": name, "labels": {"app": name, "tier": "bench"}},
        "spec": {
            "artifact": "sha256:" + "ab" * 32,
            "replicas": replicas,
            "executor": "http",
            "resources": {"memoryMB": 32, "cpuMillis": 100},
            "env": {"GREETING": "hello"},
        },
    }


def _manifest(prefix: str) -> tuple[str, bytes]:
    objects = [_workload(f"{prefix}-{i:04d}") for i in range(COUNT)]
    text = yaml.safe_dump_all(objects, sort_keys=False)
    body = orjson.dumps({"apiVersion": "pollen.dev/v1alpha1", "kind": "List", "items": objects})
    return text, body


def _curl(node: LocalNode, *args: str) -> None:
    subprocess.run(
        ["curl", "-sf", "-o", "/dev/null", "-H", f"Authorization: Bearer {node.token}", *args],
        check=True,
    )


def _state_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in (data_dir / "state").rglob("*") if p.is_file())


def _start(work: Path, name: str, env: dict[str, str]) -> LocalNode:
    init_node(work / name, name, env=env)
    node = LocalNode(data_dir=work / name, log_path=work / f"{name}.log", env=env)
    node.start()
    return node


def _pctl(env: dict[str, str], *args: str) -> None:
    subprocess.run([tool("pctl"), *args], env=env, check=True, stdout=subprocess.DEVNULL)


def _bench_apply(work: Path, env: dict[str, str]) -> list[Row]:
    node = _start(work, "apply-node", env)
    try:
        files = []
        bodies = []
        for run in range(RUNS):
            text, _ = _manifest(f"p{run}")
            path = work / f"apply-{run}.yaml"
            path.write_text(text)
            files.append(path)
            _, body = _manifest(f"c{run}")
            body_path = work / f"apply-{run}.json"
            body_path.write_bytes(body)
            bodies.append(body_path)
        ctx = ["--context", "apply-node"]
        it = iter(files)
        pctl_s, _ = median_time(lambda: _pctl(env, *ctx, "apply", "-f", str(next(it))), RUNS)
        it2 = iter(bodies)
        curl_s, _ = median_time(
            lambda: _curl(
                node,
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                f"@{next(it2)}",
                f"{node.url}{PREFIX}/apply",
            ),
            RUNS,
        )
    finally:
        node.stop()
    return [
        Row(
            f"`pctl apply -f` of {COUNT} Workloads in one file (created)",
            ms(pctl_s),
            f"curl POST of the same objects as JSON: {ms(curl_s)}",
            f"{pctl_s / curl_s:.2f}x",
            "< 2 s",
            pctl_s < 2.0,
        )
    ]


def _bench_get_and_size(work: Path, env: dict[str, str]) -> list[Row]:
    node = _start(work, "get-node", env)
    ctx = ["--context", "get-node"]
    text, _ = _manifest("w")
    (work / "get.yaml").write_text(text)
    _pctl(env, *ctx, "apply", "-f", str(work / "get.yaml"))
    get_s, _ = median_time(lambda: _pctl(env, *ctx, "get", "workloads"), RUNS + 2)
    curl_s, _ = median_time(lambda: _curl(node, f"{node.url}{PREFIX}/workloads"), RUNS + 2)
    python_s, _ = median_time(
        lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), RUNS
    )
    journal_1000 = _state_bytes(node.data_dir)
    node.stop()
    node.start()
    compacted_1000 = _state_bytes(node.data_dir)
    client = ApiClient(node.url, node.token)
    one = _workload("w-0000")
    spec = one["spec"]
    assert isinstance(spec, dict)
    for i in range(COUNT):
        spec["env"] = {"GREETING": "hello", "REVISION": str(i)}
        client.apply([one])
    journal_updates = _state_bytes(node.data_dir)
    node.stop()
    node.start()
    compacted_updates = _state_bytes(node.data_dir)
    node.stop()
    growth = compacted_updates - compacted_1000
    return [
        Row(
            f"`pctl get workloads` with {COUNT} present",
            ms(get_s),
            f"curl GET of the list: {ms(curl_s)}; `python -c pass`: {ms(python_s)}",
            f"{get_s / curl_s:.1f}x curl",
            "< 300 ms",
            get_s < 0.3,
        ),
        Row(
            f"document on disk, {COUNT} Workloads",
            f"{kib(compacted_1000)} compacted",
            f"journal before compaction: {kib(journal_1000)}",
            f"{compacted_1000 / COUNT:.0f} B per Workload",
        ),
        Row(
            f"document on disk after {COUNT} updates of one Workload's spec",
            f"{kib(compacted_updates)} compacted (+{kib(growth)})",
            f"journal before compaction: {kib(journal_updates)}",
            f"{growth / COUNT:.0f} B per update",
        ),
    ]


_AIOHTTP_HELLO = """
from aiohttp import web
async def hello(request):
    return web.Response(text="hello")
app = web.Application()
app.router.add_get("/", hello)
web.run_app(app, host="127.0.0.1", port=0, print=lambda *a: print("ready", flush=True))
"""


def _settled_rss(pid: int, seconds: float = 3.0) -> int:
    time.sleep(seconds)  # let start-up garbage settle before reading idle memory
    return int(psutil.Process(pid).memory_info().rss)


def _bench_rss(work: Path, env: dict[str, str]) -> list[Row]:
    node = _start(work, "idle-node", env)
    try:
        node_rss = _settled_rss(node.pid)
    finally:
        node.stop()
    base = subprocess.Popen(
        [sys.executable, "-c", _AIOHTTP_HELLO], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert base.stdout is not None
        base.stdout.readline()
        base_rss = _settled_rss(base.pid)
    finally:
        base.kill()
        base.wait()
    return [
        Row(
            "idle node RSS",
            mib(node_rss),
            f"plain aiohttp hello server: {mib(base_rss)}",
            f"{node_rss / base_rss:.2f}x",
            "< 80 MB",
            node_rss < 80 * 1_000_000,
        )
    ]


def run() -> Section:
    with tempfile.TemporaryDirectory(prefix="pollen-bench-") as tmp:
        work = Path(tmp)
        env = dict(os.environ, POLLEN_CONFIG=str(work / "pctl-config.yaml"))
        rows = _bench_apply(work, env) + _bench_get_and_size(work, env) + _bench_rss(work, env)
    return Section(
        "Foundation: one node, its document and pctl",
        rows,
        notes=(
            "pctl figures are whole commands: interpreter start-up, imports, the request and "
            "printing. The curl baseline is the node's share alone."
        ),
    )
