"""Mesh benchmarks on real node processes on loopback: spread, failure detection, idle cost.

Swarms are started with ``pollen up`` (``pollen.cli.swarm.up``): real ``pollen node`` processes
on 127.0.0.1 that join over QUIC with tokens, exactly as a user's local swarm does. Every swarm
is torn down with ``pollen down`` afterwards, and any process still running from the
benchmark's directory is then killed by pid.

Baselines from the same run: the apply's own HTTP round trip on the node it is sent to (what
gossip adds on top of the write), and the loopback traffic of the machine with no swarm running
(the noise under the idle-traffic figure).
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
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil

from bench.report import Row, Section, kib, ms
from pollen.api.client import ApiClient
from pollen.api.errors import ApiError
from pollen.cli.config import CONFIG_ENV
from pollen.cli.swarm import SwarmError, SwarmNode, down, up

#: Nodes in the swarm for the spread and failure-detection figures.
NODES = 10
#: New Workloads applied on node-1, one after the other.
SPREAD_RUNS = 5
#: Nodes killed with SIGKILL, one after the other (the swarm shrinks by one each time).
KILLS = ("node-10", "node-6", "node-3")
#: Nodes in the idle swarm.
IDLE_NODES = 3
#: Seconds of idle traffic measured; ``POLLEN_BENCH_IDLE_SECONDS`` overrides (600 for the full
#: ten minutes the target speaks of).
IDLE_SECONDS = 120.0
IDLE_ENV = "POLLEN_BENCH_IDLE_SECONDS"
#: Seconds the idle swarm runs before the window opens, so start-up writes are not counted.
IDLE_SETTLE = 10.0
#: Seconds of loopback traffic measured with no swarm running: the noise baseline.
NOISE_SECONDS = 10.0
#: Seconds one observation may take before it counts as not reached.
OBSERVE_TIMEOUT = 30.0

SPREAD_TARGET = 1.0
NOT_READY_TARGET = 5.0
GROWTH_TARGET = 10 * 1024  # bytes per node per ten minutes
TEN_MINUTES = 600.0
JOURNAL = Path("state") / "state.journal"


def _idle_seconds() -> float:
    raw = os.environ.get(IDLE_ENV)
    if not raw:
        return IDLE_SECONDS
    try:
        value = float(raw)
    except ValueError:
        return IDLE_SECONDS
    return value if value > 0 else IDLE_SECONDS


def _workload(name: str) -> dict[str, object]:
    return {
        "apiVersion": "pollen.dev/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": name, "labels": {"tier": "bench"}},
        "spec": {"artifact": "sha256:" + "cd" * 32, "replicas": 1},
    }


def _client(node: SwarmNode, timeout: float = 10) -> ApiClient:
    token = (Path(node.data_dir) / "api-token").read_text().strip()
    return ApiClient(node.api, token, timeout=timeout)


# --- swarm lifecycle -----------------------------------------------------------------------------


def _leftovers(work: Path) -> list[psutil.Process]:
    """Processes still running whose command line names the benchmark's directory."""
    mark = str(work)
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = proc.info.get("cmdline") or []
            if (
                proc.pid != os.getpid()
                and any(mark in part for part in cmdline)
                and proc.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _reap(pid: int) -> None:
    """Collect the exit status of our own child ``pid`` if it has exited; never blocks long."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


@contextlib.contextmanager
def _swarm(count: int) -> Iterator[list[SwarmNode]]:
    """``pollen up`` ``count`` nodes in a private directory and config; always torn down."""
    work = Path(tempfile.mkdtemp(prefix="pollen-bench-mesh-"))
    saved = os.environ.get(CONFIG_ENV)
    os.environ[CONFIG_ENV] = str(work / "pctl-config.yaml")
    nodes: list[SwarmNode] = []
    try:
        nodes = up(count, work)
        yield nodes
    finally:
        try:
            with contextlib.suppress(SwarmError, OSError):
                down(work, timeout=15)
            for proc in _leftovers(work):
                with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
            for node in nodes:
                _reap(node.pid)
        finally:
            if saved is None:
                os.environ.pop(CONFIG_ENV, None)
            else:
                os.environ[CONFIG_ENV] = saved
            shutil.rmtree(work, ignore_errors=True)


# --- watching ----------------------------------------------------------------------------------


class Watcher(threading.Thread):
    """Watches one node and stamps ``time.perf_counter()`` at the first event matching ``match``.

    ``listed`` is set once the initial listing is over (the first bookmark), so the caller can
    make its change only after every watch is in place.
    """

    def __init__(
        self,
        node: SwarmNode,
        kind: str,
        name: str | None,
        match: Callable[[dict[str, Any]], bool],
    ) -> None:
        super().__init__(daemon=True, name=f"watch-{node.name}")
        self.node = node
        self.kind = kind
        self.object_name = name
        self.match = match
        self.listed = threading.Event()
        self.done = threading.Event()
        self.at: float | None = None
        self.error: str | None = None

    def run(self) -> None:
        try:
            client = _client(self.node, timeout=OBSERVE_TIMEOUT)
            for event in client.watch(self.kind, self.object_name, timeout=OBSERVE_TIMEOUT * 2):
                if event.get("type") == "BOOKMARK":
                    self.listed.set()
                    continue
                if event.get("type") != "DELETED" and self.match(event):
                    self.at = time.perf_counter()
                    break
        except (ApiError, TimeoutError, OSError) as exc:
            self.error = str(exc)
        finally:
            self.listed.set()
            self.done.set()


def _start_watchers(watchers: list[Watcher]) -> None:
    for watcher in watchers:
        watcher.start()
    deadline = time.monotonic() + OBSERVE_TIMEOUT
    for watcher in watchers:
        watcher.listed.wait(max(0.0, deadline - time.monotonic()))


def _finish(watchers: list[Watcher], since: float) -> list[float | None]:
    """Seconds from ``since`` to each watcher's stamp, ``None`` where it never matched."""
    deadline = time.monotonic() + OBSERVE_TIMEOUT
    for watcher in watchers:
        watcher.done.wait(max(0.0, deadline - time.monotonic()))
    return [None if w.at is None else w.at - since for w in watchers]


def _named(name: str) -> Callable[[dict[str, Any]], bool]:
    def match(event: dict[str, Any]) -> bool:
        return bool(event.get("object", {}).get("metadata", {}).get("name") == name)

    return match


def _not_ready(event: dict[str, Any]) -> bool:
    conditions = event.get("object", {}).get("status", {}).get("conditions", [])
    return any(c.get("type") == "Ready" and c.get("status") == "False" for c in conditions)


# --- 1. spread of a new Workload ----------------------------------------------------------------


def _bench_spread(nodes: list[SwarmNode]) -> tuple[list[Row], str]:
    first = _client(nodes[0])
    spreads: list[float] = []
    applies: list[float] = []
    missed = 0
    for run in range(SPREAD_RUNS):
        name = f"spread-{run}-{os.getpid()}"
        watchers = [Watcher(node, "workloads", None, _named(name)) for node in nodes]
        _start_watchers(watchers)
        start = time.perf_counter()
        first.apply([_workload(name)])
        applies.append(time.perf_counter() - start)
        seen = _finish(watchers, start)
        if any(s is None for s in seen):
            missed += 1
            continue
        spreads.append(max(s for s in seen if s is not None))
        time.sleep(0.5)  # let the anti-entropy of this write settle before the next one
    first.close()
    apply_s = statistics.median(applies)
    if spreads:
        median_s = statistics.median(spreads)
        worst = max(spreads)
        value = f"median {ms(median_s)}, max {ms(worst)}"
        ratio = f"{median_s / apply_s:.1f}x"
        met = missed == 0 and worst < SPREAD_TARGET
    else:
        value, ratio, met = "not reached", "—", False
    if missed:
        value += f" ({missed} of {SPREAD_RUNS} runs not reached in {OBSERVE_TIMEOUT:.0f} s)"
    row = Row(
        f"new Workload on node-1 listed by all {len(nodes)} real nodes (loopback, "
        f"{SPREAD_RUNS} runs)",
        value,
        f"the apply's HTTP round trip on node-1: {ms(apply_s)}",
        ratio,
        f"< {SPREAD_TARGET:.0f} s",
        met,
    )
    note = (
        f"Spread: {len(nodes)} nodes from `pollen up`; before each apply every node has a watch "
        "on workloads open (initial listing over), and each watch stamps the first event naming "
        "the new Workload; the figure is the last node's stamp minus the moment the apply request "
        "was sent, node-1 included."
    )
    return [row], note


# --- 2. kill -9 to NotReady everywhere ----------------------------------------------------------


def _bench_kill(nodes: list[SwarmNode]) -> tuple[list[Row], str]:
    alive = {node.name: node for node in nodes}
    times: list[float] = []
    missed = 0
    for victim_name in KILLS:
        victim = alive.pop(victim_name)
        observers = list(alive.values())
        watchers = [Watcher(node, "nodes", victim_name, _not_ready) for node in observers]
        _start_watchers(watchers)
        start = time.perf_counter()
        os.kill(victim.pid, signal.SIGKILL)
        seen = _finish(watchers, start)
        _reap(victim.pid)
        if any(s is None for s in seen):
            missed += 1
            continue
        times.append(max(s for s in seen if s is not None))
    if times:
        median_s = statistics.median(times)
        worst = max(times)
        value = f"median {ms(median_s)}, max {ms(worst)}"
        met = missed == 0 and worst < NOT_READY_TARGET
    else:
        value, met = "not reached", False
    if missed:
        value += f" ({missed} of {len(KILLS)} kills not seen in {OBSERVE_TIMEOUT:.0f} s)"
    samples = ", ".join(ms(t) for t in times)
    row = Row(
        f"kill -9 of one of {len(nodes)} nodes → its Node NotReady on every other node "
        f"({len(KILLS)} kills)",
        value,
        "memberlist suspicion floor at N ≤ 10: 4 s",
        f"{statistics.median(times) / 4.0:.2f}x" if times else "—",
        f"< {NOT_READY_TARGET:.0f} s",
        met,
    )
    note = (
        f"Failure detection: {', '.join(KILLS)} were killed with SIGKILL one after the other "
        f"(the swarm shrinking to {len(nodes) - len(KILLS)}); every surviving node watched the "
        "victim's Node and stamped the first event with Ready status False; the figure is the "
        f"last survivor's stamp minus the kill. Samples: {samples or 'none'}."
    )
    return [row], note


# --- 3. idle traffic and document growth --------------------------------------------------------

#: First argument of ``python -m bench.mesh_real`` for the idle measurement in its own namespace.
IDLE_CHILD = "idle-child"


def _lo_counters() -> tuple[int, int] | None:
    """Loopback bytes and packets transmitted in this process's network namespace."""
    try:
        text = Path("/proc/self/net/dev").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            fields = rest.split()
            return int(fields[8]), int(fields[9])
    return None


def _lo_noise() -> float | None:
    """Loopback bytes per second over ``NOISE_SECONDS`` with no swarm of ours running."""
    start = _lo_counters()
    time.sleep(NOISE_SECONDS)
    end = _lo_counters()
    return None if start is None or end is None else (end[0] - start[0]) / NOISE_SECONDS


class JournalMeter:
    """Bytes appended to each node's journal, sampled every second so a compaction is seen."""

    def __init__(self, nodes: list[SwarmNode]) -> None:
        self.paths = [Path(n.data_dir) / JOURNAL for n in nodes]
        self.missing = [p for p in self.paths if not p.is_file()]
        self.last = [self._size(p) for p in self.paths]
        self.initial = list(self.last)
        self.written = [0 for _ in self.paths]
        self.compactions = 0

    @staticmethod
    def _size(path: Path) -> int:
        try:
            return path.stat().st_size
        except OSError:
            return 0

    def sample(self) -> None:
        for i, path in enumerate(self.paths):
            size = self._size(path)
            if size >= self.last[i]:
                self.written[i] += size - self.last[i]
            else:
                self.compactions += 1  # replaced by a snapshot: count on from the new size
            self.last[i] = size


def _measure_idle(seconds: float) -> dict[str, Any]:
    """Start the idle swarm here, let it settle, then measure journals and loopback."""
    with _swarm(IDLE_NODES) as nodes:
        time.sleep(IDLE_SETTLE)
        meter = JournalMeter(nodes)
        lo_start = _lo_counters()
        start = time.monotonic()
        while (left := seconds - (time.monotonic() - start)) > 0:
            time.sleep(min(1.0, left))
            meter.sample()
        lo_end = _lo_counters()
        elapsed = time.monotonic() - start
        alive = all(psutil.pid_exists(n.pid) for n in nodes)
    lo = None
    if lo_start is not None and lo_end is not None:
        lo = [lo_end[0] - lo_start[0], lo_end[1] - lo_start[1]]
    return {
        "elapsed": elapsed,
        "written": meter.written,
        "initial": meter.initial,
        "missing": len(meter.missing),
        "compactions": meter.compactions,
        "alive": alive,
        "lo": lo,
    }


def _idle_in_namespace(seconds: float) -> tuple[dict[str, Any] | None, str]:
    """Run :func:`_measure_idle` in a child in a private network namespace (needs root).

    Returns the figures, or ``None`` and why not. The child and the nodes it starts share one
    process group, which is killed by its id if the child overruns.
    """
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return None, "unshare or ip is missing"
    root = Path(__file__).resolve().parent.parent
    child = subprocess.Popen(
        [
            "unshare",
            "--net",
            "--",
            sys.executable,
            "-m",
            "bench.mesh_real",
            IDLE_CHILD,
            str(seconds),
        ],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        out, err = child.communicate(timeout=seconds + IDLE_SETTLE + 180)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return None, "the namespaced run overran"
    if child.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        return None, lines[-1] if lines else f"unshare exited with {child.returncode}"
    try:
        figures = orjson.loads(out.strip().splitlines()[-1])
    except (IndexError, orjson.JSONDecodeError):
        return None, "the namespaced run printed no figures"
    return (figures if isinstance(figures, dict) else None), "no figures"


def _bench_idle() -> tuple[list[Row], str]:
    seconds = _idle_seconds()
    figures, why = _idle_in_namespace(seconds)
    isolated = figures is not None
    noise: float | None = 0.0
    if figures is None:
        noise_before = _lo_noise()
        figures = _measure_idle(seconds)
        noise_after = _lo_noise()
        if noise_before is None or noise_after is None:
            noise = None
        else:
            noise = (noise_before + noise_after) / 2
    elapsed = float(figures["elapsed"])
    written = [int(n) for n in figures["written"]]
    per_node_written = statistics.mean(written)
    per_ten = per_node_written * TEN_MINUTES / elapsed
    scaled = elapsed < TEN_MINUTES - 1
    growth_value = f"{kib(int(per_ten))} per node per 10 min" + (
        f" (extrapolated from {elapsed:.0f} s: {kib(int(per_node_written))})" if scaled else ""
    )
    rows = [
        Row(
            f"document growth of {IDLE_NODES} idle nodes (journal bytes appended, per node)",
            growth_value,
            f"max node: {kib(int(max(written) * TEN_MINUTES / elapsed))} per 10 min",
            "—",
            "< 10 KB per 10 min",
            per_ten < GROWTH_TARGET and bool(figures["alive"]) and not figures["missing"],
        )
    ]
    lo = figures["lo"]
    what = f"idle membership + gossip traffic of {IDLE_NODES} nodes, per node"
    if lo is not None and noise is not None:
        rate = lo[0] / elapsed / IDLE_NODES
        packets = lo[1] / elapsed / IDLE_NODES
        if isolated:
            value = f"{rate:.0f} B/s ({packets:.1f} packets/s)"
            baseline = "private network namespace: nothing else on its loopback"
        else:
            net = max(0.0, rate - noise / IDLE_NODES)
            value = f"{net:.0f} B/s ({rate:.0f} B/s before subtracting the noise)"
            baseline = f"host loopback with no swarm: {noise:.0f} B/s"
        rows.append(Row(what, value, baseline))
    else:
        rows.append(Row(what, "not measured (no loopback counters)"))
    if isolated:
        lo_note = (
            "Idle traffic: the idle swarm runs in a private network namespace (`unshare --net`, "
            "loopback brought up, nothing else in it), and the loopback transmit counters of "
            "that namespace (`/proc/self/net/dev`) over the window are divided by nodes and "
            "seconds. Whole frames are counted: IP and UDP headers, QUIC encryption and "
            "acknowledgements included. No API request is made during the window."
        )
    else:
        lo_note = (
            f"Idle traffic: no private network namespace ({why}), so the host's loopback "
            "transmit counter over the window, divided by nodes and seconds. It counts whole "
            "frames (IP and UDP headers, QUIC overhead included) and every process on the "
            f"machine using loopback: the same counter over {NOISE_SECONDS:.0f} s before and "
            f"after the idle swarm is averaged as the noise baseline and subtracted; other "
            "loopback users still add noise. No API request is made during the window."
        )
    initial = ", ".join(kib(int(n)) for n in figures["initial"])
    missing = f"; journals missing: {figures['missing']}" if figures["missing"] else ""
    note = (
        f"Document growth: {IDLE_NODES} nodes from `pollen up`, left {IDLE_SETTLE:.0f} s to "
        f"settle, then the size of each node's `state/state.journal` sampled every second for "
        f"{elapsed:.0f} s (set {IDLE_ENV}=600 for the full ten minutes); the journal is "
        "append-only between compactions, so its growth is exactly the document changes each "
        f"node stored (journals at the start: {initial}; compactions seen: "
        f"{figures['compactions']}{missing}). Mean over nodes"
        + (", scaled linearly to ten minutes. " if scaled else ". ")
        + lo_note
    )
    return rows, note


def run() -> Section:
    rows: list[Row] = []
    notes: list[str] = []
    with _swarm(NODES) as nodes:
        spread_rows, spread_note = _bench_spread(nodes)
        kill_rows, kill_note = _bench_kill(nodes)
    rows += spread_rows + kill_rows
    notes += [spread_note, kill_note]
    idle_rows, idle_note = _bench_idle()
    rows += idle_rows
    notes.append(idle_note)
    return Section(
        "Mesh on real processes: 10 nodes on loopback",
        rows,
        notes="\n\n".join(notes),
    )


def _idle_child(argv: list[str]) -> int:
    """``python -m bench.mesh_real idle-child SECONDS``: run by :func:`_idle_in_namespace`."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    figures = _measure_idle(float(argv[0]))
    sys.stdout.write(orjson.dumps(figures).decode() + "\n")
    return 0


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == IDLE_CHILD:
    raise SystemExit(_idle_child(sys.argv[2:]))
