"""Runtime benchmarks: per-request cost, ``pollen run`` throughput, module cache warm start.

Every figure is set beside a baseline measured in the same run, interleaved where it can be,
so that a busy machine slows both sides alike:

- a request through the http executor (CGI environment, fresh store with limits and epoch
  deadline, response parsing) against bare wasmtime-py doing the least it can for the same
  module: a store, a WASI config with the same environment and a stdout callback,
  instantiate, call ``_start``;
- ``pollen run`` serving hello under wrk (with its default worker processes, and with one)
  against a plain aiohttp hello handler in one process (the SPEC's baseline) and in as many
  processes as pollen has workers, all up at once and measured in alternating rounds;
- loading a ~1 MB module from a warm cache against compiling it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import wasmtime

from bench.report import Row, Section, ms
from pollen.cli.localnode import tool
from pollen.runtime.cache import ModuleCache
from pollen.runtime.engine import Engine
from pollen.runtime.pool import default_workers
from pollen.runtime.runtime import Runtime
from pollen.runtime.sandbox import Limits
from pollen.runtime.wagi import HttpRequest, cgi_environ

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 7
PER_ROUND = 300
WRK_SECONDS = 5
WRK_CONNECTIONS = 16
WRK_ROUNDS = 5


def _examples() -> dict[str, Path]:
    """Build (if stale) and return the example modules, with ``examples/build.py``."""
    spec = importlib.util.spec_from_file_location(
        "pollen_examples_build", ROOT / "examples/build.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    targets: dict[str, Path] = module.build(names=["hello"])
    return targets


def _bench_per_request(hello: Path) -> list[Row]:
    wasm = hello.read_bytes()
    request = HttpRequest()
    env = list(cgi_environ(request).items())

    # Bare wasmtime-py, as its documentation would have it.
    bare_engine = wasmtime.Engine()
    bare_linker = wasmtime.Linker(bare_engine)
    bare_linker.define_wasi()
    bare_module = wasmtime.Module(bare_engine, wasm)

    def bare() -> bytes:
        out: list[bytes] = []
        store = wasmtime.Store(bare_engine)
        wasi = wasmtime.WasiConfig()
        wasi.env = env
        wasi.stdout_custom = out.append
        store.set_wasi(wasi)
        instance = bare_linker.instantiate(store, bare_module)
        start = instance.exports(store)["_start"]
        assert isinstance(start, wasmtime.Func)
        start(store)
        return b"".join(out)

    with Runtime() as runtime:
        executor = runtime.http_executor(
            "hello", runtime.load(wasm, name="hello"), limits=Limits(timeout_ms=5000)
        )
        assert executor.invoke(request).status == 200
        assert b"Hello" in bare()

        def ours() -> None:
            executor.invoke(request)

        def pooled() -> None:
            executor.submit(request).result()

        samples: dict[str, list[float]] = {"bare": [], "ours": [], "pooled": []}
        for _ in range(ROUNDS):
            for name, fn in (("bare", bare), ("ours", ours), ("pooled", pooled)):
                started = time.perf_counter()
                for _ in range(PER_ROUND):
                    fn()
                samples[name].append((time.perf_counter() - started) / PER_ROUND)
    bare_s = statistics.median(samples["bare"])
    ours_s = statistics.median(samples["ours"])
    pooled_s = statistics.median(samples["pooled"])
    return [
        Row(
            "hello: instantiate + handle through the http executor",
            f"{ours_s * 1e6:.0f} µs",
            f"bare wasmtime-py instantiate + `_start`: {bare_s * 1e6:.0f} µs",
            f"{ours_s / bare_s:.2f}x",
            "<= 1.5x",
            ours_s / bare_s <= 1.5,
        ),
        Row(
            "hello: the same, queued through the worker pool",
            f"{pooled_s * 1e6:.0f} µs",
            f"bare: {bare_s * 1e6:.0f} µs",
            f"{pooled_s / bare_s:.2f}x",
        ),
    ]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)  # polling for a port to open; not synchronising tests
    raise RuntimeError(f"nothing listens on {port}")


def _wrk(port: int, path: str = "/") -> tuple[float, float]:
    """Requests per second and p99 latency (ms) of wrk against ``path`` on ``port``."""
    result = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{WRK_CONNECTIONS}",
            f"-d{WRK_SECONDS}s",
            "--latency",
            f"http://127.0.0.1:{port}{path}",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=WRK_SECONDS + 60,
    )
    rate = re.search(r"Requests/sec:\s+([\d.]+)", result.stdout)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", result.stdout)
    if rate is None:
        raise RuntimeError(f"cannot read wrk's output: {result.stdout}")
    latency = 0.0
    if p99 is not None:
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
        latency = float(p99.group(1)) * scale
    if "Non-2xx" in result.stdout:
        raise RuntimeError(f"wrk saw errors: {result.stdout}")
    return float(rate.group(1)), latency


_AIOHTTP_HELLO = """
import sys
from aiohttp import web
async def hello(request):
    return web.Response(text="Hello from Pollen!\\n")
app = web.Application()
app.router.add_get("/", hello)
reuse_port = len(sys.argv) > 2 or None
web.run_app(
    app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None,
    reuse_port=reuse_port,
)
"""


def _start_server(
    commands: list[list[str]], port: int, env: dict[str, str]
) -> list[subprocess.Popen[bytes]]:
    """Start ``commands`` (the processes of one server, all on ``port``), wait for the port,
    warm it up."""
    procs = [
        subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for command in commands
    ]
    try:
        for proc in procs:
            _wait_port(port, proc)
        _wrk(port)  # warm-up: caches, the first instances, the module cache
    except BaseException:
        _stop(procs)
        raise
    return procs


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=60)


def _bench_pollen_run(hello: Path, cache: Path) -> tuple[list[Row], str]:
    if shutil.which("wrk") is None:
        return [], "wrk is not installed (`apt-get install -y wrk`): throughput not measured."
    env = dict(os.environ, POLLEN_CACHE_DIR=str(cache))
    workers = default_workers()
    ports = {name: _free_port() for name in ("pollen", "pollen1", "plain", "plainN")}

    def pollen(count: int, port: int) -> list[list[str]]:
        command = [tool("pollen"), "run", str(hello), "--port", str(port)]
        return [[*command, "--workers", str(count)]]

    def plain(count: int, port: int) -> list[list[str]]:
        # Several processes share the port as pollen's workers do (SO_REUSEPORT); one
        # process is the plain handler the SPEC names.
        extra = ["reuse_port"] if count > 1 else []
        return [[sys.executable, "-c", _AIOHTTP_HELLO, str(port), *extra]] * count

    commands = {
        "pollen": pollen(workers, ports["pollen"]),
        "pollen1": pollen(1, ports["pollen1"]),
        "plain": plain(1, ports["plain"]),
        "plainN": plain(workers, ports["plainN"]),
    }
    servers: list[subprocess.Popen[bytes]] = []
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    try:
        for name, command in commands.items():
            servers += _start_server(command, ports[name], env)
        # Every server stays up (the idle ones cost nothing) and they take turns, so that a
        # noisy machine slows all alike.
        for _ in range(WRK_ROUNDS):
            for name in commands:
                results[name].append(_wrk(ports[name]))
    finally:
        _stop(servers)

    def rate(name: str) -> float:
        return statistics.median(r for r, _ in results[name])

    def p99(name: str) -> float:
        return statistics.median(p for _, p in results[name])

    ratio = rate("pollen") / rate("plain")
    ratio1 = rate("pollen1") / rate("plain")
    ratio_n = rate("pollen") / rate("plainN")
    wrk = f"wrk {WRK_CONNECTIONS} connections, {WRK_SECONDS} s, median of {WRK_ROUNDS} rounds"
    rows = [
        Row(
            f"`pollen run` hello, {workers} worker processes (the default: one per core; {wrk})",
            f"{rate('pollen'):,.0f} req/s (p99 {p99('pollen'):.1f} ms)",
            f"plain aiohttp hello handler, one process: {rate('plain'):,.0f} req/s "
            f"(p99 {p99('plain'):.1f} ms)",
            f"{ratio:.2f}",
            ">= 0.5",
            ratio >= 0.5,
        ),
        Row(
            "`pollen run --workers 1` hello (one process)",
            f"{rate('pollen1'):,.0f} req/s (p99 {p99('pollen1'):.1f} ms)",
            f"plain aiohttp, one process: {rate('plain'):,.0f} req/s",
            f"{ratio1:.2f}",
        ),
        Row(
            f"`pollen run` hello, {workers} worker processes, against aiohttp with as many",
            f"{rate('pollen'):,.0f} req/s",
            f"plain aiohttp hello in {workers} processes on one port (SO_REUSEPORT): "
            f"{rate('plainN'):,.0f} req/s (p99 {p99('plainN'):.1f} ms)",
            f"{ratio_n:.2f}",
        ),
    ]
    rounds = "; ".join(
        f"{name} " + ", ".join(f"{r:,.0f}" for r, _ in results[name]) for name in commands
    )
    note = (
        f"wrk rounds in req/s ({workers} workers or processes where N): {rounds}. "
        "The SPEC's baseline is the single-process aiohttp handler; the N-process row shows "
        "what the same number of processes gives a plain handler."
    )
    return rows, note


def big_module(functions: int = 3300) -> bytes:
    """A valid module of about 1 MB: many small exported functions with loops and locals."""
    body = " ".join(
        f"(local.set $x (i32.add (i32.mul (local.get $x) (i32.const {k * 7 + 3})) (i32.const {k})))"
        for k in range(24)
    )
    funcs = "\n".join(
        f'(func (export "f{i}") (param $x i32) (result i32) '
        f"(block $done (loop $again {body} "
        f"(br_if $done (i32.gt_u (local.get $x) (i32.const {i}))) (br $again))) "
        f"(local.get $x))"
        for i in range(functions)
    )
    wat = f'(module (memory (export "memory") 1) (func (export "_start")) {funcs})'
    return bytes(wasmtime.wat2wasm(wat))


def _bench_cache() -> list[Row]:
    wasm = big_module()
    cold: list[float] = []
    warm: list[float] = []
    with Engine() as engine, tempfile.TemporaryDirectory(prefix="pollen-bench-cache-") as tmp:
        for run in range(3):
            directory = Path(tmp) / f"run{run}"
            started = time.perf_counter()
            assert ModuleCache(engine, directory).get(wasm).source == "compiled"
            cold.append(time.perf_counter() - started)
            for _ in range(3):
                # A new cache object over the same folder: what a restarted node does.
                started = time.perf_counter()
                assert ModuleCache(engine, directory).get(wasm).source == "disk"
                warm.append(time.perf_counter() - started)
        code_size = sum(p.stat().st_size for p in Path(tmp).glob("run0/*/*.cwasm"))
    cold_s = statistics.median(cold)
    warm_s = statistics.median(warm)
    return [
        Row(
            f"start a {len(wasm) / 1e6:.2f} MB module from a warm cache "
            f"({code_size / 1e6:.1f} MB of machine code, checksum verified)",
            ms(warm_s),
            f"cold: compile, serialize, write: {ms(cold_s)}",
            f"{cold_s / warm_s:.0f}x faster",
        )
    ]


def run() -> Section:
    """Every runtime figure, as one report section."""
    hello = _examples()["hello"]
    rows = _bench_per_request(hello)
    with tempfile.TemporaryDirectory(prefix="pollen-bench-run-") as tmp:
        served, note = _bench_pollen_run(hello, Path(tmp))
    rows += served
    rows += _bench_cache()
    notes = (
        "The executor's figure includes building the CGI environment, a store with a memory "
        "limit and an epoch deadline, stdout capture, closing the store and parsing the "
        "response; the bare figure uses the same environment. wrk runs on the same 2 cores as "
        "the server, so both throughput figures are lower than on a separate client. " + note
    )
    return Section("Runtime: sandbox, executors, module cache", rows, notes=notes)


if __name__ == "__main__":
    from bench.report import render

    print(render([run()]))
