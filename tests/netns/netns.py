"""Network namespaces for mesh tests: hosts on one switch, per-host delays, partitions.

Topology: one "switch" namespace and one namespace per host, each host with an address in
10.77.0.0/24 (host ``i`` is ``10.77.0.{i + 1}``). Host ``i`` delays every packet it sends by
``delays_ms[i]``, so the round trip between hosts ``a`` and ``b`` is ``d_a + d_b`` (a star
latency model). Two backends give the same topology:

- ``netem``: a bridge in the switch namespace, a veth pair per host, ``tc qdisc ... netem delay``
  on each host's veth; a partition is a set of ``blackhole`` routes in each host.
- ``tap`` (when the kernel has no netem): a tap device per host, and a small switch process
  (``python -m tests.netns.netns``) that forwards Ethernet frames between them after the
  sender's delay, and drops frames between the two groups of a partition.

The test process stays in the root namespace and touches no interface there: it reaches a node's
API (bound to 127.0.0.1 inside the node's namespace) through sockets that a short-lived thread
opens after ``setns`` into that namespace (see :class:`NetnsApiClient`). Sockets keep the
namespace they were made in, so the rest of the process is unaffected.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import heapq
import http.client
import os
import selectors
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pollen.api.client import ApiClient
from pollen.api.errors import ApiError
from pollen.cli.localnode import LocalNode, tool

SUBNET = "10.77.0"
NETNS_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
REPO = Path(__file__).resolve().parents[2]


# ip and tc live in sbin, which the PATH of a non-login shell (a CI runner's) may lack.
for _sbin in ("/usr/sbin", "/sbin"):
    if _sbin not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.environ.get("PATH", "") + os.pathsep + _sbin


class NetnsUnavailable(Exception):
    """Network namespaces cannot be used here; the message says why."""


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {result.stderr.strip()}")
    return result


def missing() -> str | None:
    """Why these tests cannot run here, or None when they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces and tc need root"
    for name in ("ip", "tc"):
        if shutil.which(name) is None:
            return f"'{name}' is not installed (apt-get install -y iproute2)"
    return None


def _probe_netem() -> bool:
    """Whether this kernel has the netem qdisc (tried on a veth in a throwaway namespace)."""
    ns = f"p77{uuid.uuid4().hex[:8]}"
    try:
        _run("ip", "netns", "add", ns)
        _run("ip", "-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        result = subprocess.run(
            ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "v0", "root", "netem",
             "delay", "1ms"],
            capture_output=True, timeout=30, check=False,
        )  # fmt: skip
        return result.returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def in_netns(ns: str, fn):  # type: ignore[no-untyped-def]
    """Call ``fn()`` in a fresh thread that entered namespace ``ns``; return its result.

    Only that thread changes namespace, and it ends afterwards; file descriptors it made
    (sockets, taps) stay bound to ``ns``.
    """
    box: dict[str, object] = {}

    def target() -> None:
        try:
            fd = os.open(NETNS_DIR / ns, os.O_RDONLY)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{ns}")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("value")


class _NetnsConnection(http.client.HTTPConnection):
    def __init__(self, ns: str, host: str, port: int | None, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.ns = ns

    def connect(self) -> None:
        address = (self.host, self.port)
        self.sock = in_netns(self.ns, lambda: socket.create_connection(address, self.timeout))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class NetnsApiClient(ApiClient):
    """An :class:`ApiClient` whose connections are made inside network namespace ``ns``."""

    def __init__(self, ns: str, server: str, token: str, timeout: float = 10) -> None:
        super().__init__(server, token, timeout)
        self.ns = ns

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        return _NetnsConnection(self.ns, self._host, self._port, timeout)


class Topology:
    """Host namespaces on one switch; use as a context manager, which always tears down."""

    def __init__(self, delays_ms: Sequence[float], backend: str = "auto") -> None:
        reason = missing()
        if reason:
            raise NetnsUnavailable(reason)
        if backend == "auto":
            backend = "netem" if _probe_netem() else "tap"
        self.backend = backend
        self.delays_ms = list(delays_ms)
        self.tag = uuid.uuid4().hex[:6]
        self.switch_ns = f"pn{self.tag}sw"
        self.hosts = [f"pn{self.tag}h{i}" for i in range(len(delays_ms))]
        self.created: list[str] = []
        self.switch: subprocess.Popen[bytes] | None = None
        self._blackholes: list[tuple[int, str]] = []

    # --- addresses and delays ---------------------------------------------------------------

    def address(self, host: int) -> str:
        return f"{SUBNET}.{host + 1}"

    def rtt_ms(self, a: int, b: int) -> float:
        """The configured round trip between two hosts."""
        return self.delays_ms[a] + self.delays_ms[b]

    # --- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Topology:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _add_ns(self, ns: str) -> None:
        _run("ip", "netns", "add", ns)
        self.created.append(ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")

    def _build(self) -> None:
        self._add_ns(self.switch_ns)
        for ns in self.hosts:
            self._add_ns(ns)
        if self.backend == "netem":
            self._build_bridge()
        else:
            self._build_taps()

    def _build_bridge(self) -> None:
        _run("ip", "-n", self.switch_ns, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.switch_ns, "link", "set", "br0", "up")
        for i, ns in enumerate(self.hosts):
            port = f"sw{i}"
            _run("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port,
                 "netns", self.switch_ns)  # fmt: skip
            _run("ip", "-n", self.switch_ns, "link", "set", port, "master", "br0", "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root",
                 "netem", "delay", f"{self.delays_ms[i]}ms", "limit", "100000")  # fmt: skip

    def _build_taps(self) -> None:
        for i, ns in enumerate(self.hosts):
            _run("ip", "-n", ns, "tuntap", "add", "dev", "eth0", "mode", "tap")
            _run("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
        args = [f"{ns}:{delay}" for ns, delay in zip(self.hosts, self.delays_ms, strict=True)]
        self.switch = subprocess.Popen(
            [sys.executable, "-m", "tests.netns.netns", *args],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.switch.stdout is not None
        if self.switch.stdout.readline().strip() != b"ready":
            raise RuntimeError("the tap switch did not start")

    def close(self) -> None:
        if self.switch is not None:
            with contextlib.suppress(OSError):
                self.switch.kill()
            self.switch.wait(timeout=10)
            self.switch = None
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self.created.clear()

    # --- partitions ---------------------------------------------------------------------------

    def _command(self, line: str) -> None:
        assert self.switch is not None and self.switch.stdin and self.switch.stdout
        self.switch.stdin.write(line.encode() + b"\n")
        self.switch.stdin.flush()
        if self.switch.stdout.readline().strip() != b"ok":
            raise RuntimeError(f"the tap switch did not apply {line!r}")

    def partition(self, group_a: Sequence[int], group_b: Sequence[int]) -> None:
        """Drop every packet between a host of ``group_a`` and one of ``group_b``."""
        if self.backend == "tap":
            a = ",".join(map(str, group_a))
            b = ",".join(map(str, group_b))
            self._command(f"partition {a} {b}")
            return
        for x, y in [(x, y) for x in group_a for y in group_b] + [
            (y, x) for x in group_a for y in group_b
        ]:
            _run("ip", "-n", self.hosts[x], "route", "add", "blackhole", f"{self.address(y)}/32")
            self._blackholes.append((x, self.address(y)))

    def heal(self) -> None:
        """Undo every partition."""
        if self.backend == "tap":
            self._command("heal")
            return
        for x, address in self._blackholes:
            _run("ip", "-n", self.hosts[x], "route", "del", "blackhole", f"{address}/32")
        self._blackholes.clear()


class NetnsNode(LocalNode):
    """A ``pollen node`` process inside network namespace ``ns`` (via ``ip netns exec``)."""

    def __init__(self, ns: str, data_dir: Path, log_path: Path, env: dict[str, str],
                 extra_args: list[str]) -> None:  # fmt: skip
        super().__init__(data_dir, log_path, env, extra_args, api="127.0.0.1:7070")
        self.ns = ns

    def spawn(self) -> None:
        from pollen.node import ENDPOINTS_FILE

        (self.data_dir / ENDPOINTS_FILE).unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, tool("pollen"), "node", "--data-dir",
                 str(self.data_dir), "--api", self.api, *self.extra_args],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip

    def client(self, timeout: float = 10) -> NetnsApiClient:
        return NetnsApiClient(self.ns, self.url, self.token, timeout)


@contextlib.contextmanager
def swarm(topology: Topology, work: Path, env: dict[str, str]) -> Iterator[list[NetnsNode]]:
    """One node per host, started as users start them; every node is killed at the end.

    Host 0 runs ``pollen init``; the others join with ``pollen token create --address`` tokens
    that point at host 0's mesh address.
    """
    from pollen.cli.localnode import init_node

    nodes: list[NetnsNode] = []
    try:
        for i, ns in enumerate(topology.hosts):
            name = f"h{i}"
            listen = ["--listen", f"{topology.address(i)}:7946"]
            if i == 0:
                init_node(work / name, name, env=env)
                args = listen
            else:
                token = subprocess.run(
                    [tool("pollen"), "token", "create", "--data-dir", str(work / "h0"),
                     "--ttl", "10m", "--address", f"{topology.address(0)}:7946"],
                    env=env, capture_output=True, check=True, timeout=60,
                ).stdout.decode().strip()  # fmt: skip
                args = [*listen, "--name", name, "--join", token]
            node = NetnsNode(ns, work / name, work / f"{name}.log", env, args)
            nodes.append(node)
            node.spawn()
            if i == 0:
                node.wait_serving(60)
        for node in nodes[1:]:
            node.wait_serving(60)
        yield nodes
    finally:
        for node in nodes:
            node.kill()


# --- measuring Vivaldi ------------------------------------------------------------------------


def _node_list(node: NetnsNode) -> list[dict[str, Any]]:
    try:
        with node.client() as client:
            return client.list("nodes")
    except ApiError:
        return []


def rtt_errors(topology: Topology, nodes: list[NetnsNode]) -> list[float] | None:
    """Relative error of every node's estimate to every other; None while one is missing."""
    errors = []
    for i, observer in enumerate(nodes):
        estimates = {
            item["metadata"]["name"]: item.get("status", {}).get("estimatedRTTMs")
            for item in _node_list(observer)
        }
        for j in range(len(nodes)):
            if j == i:
                continue
            estimate = estimates.get(f"h{j}")
            if estimate is None:
                return None
            true = topology.rtt_ms(i, j)
            errors.append(abs(estimate - true) / true)
    return errors


def converge_vivaldi(
    topology: Topology, nodes: list[NetnsNode], target: float, deadline_s: float
) -> tuple[float | None, float]:
    """Poll until the median relative error is at most ``target`` or the deadline passes.

    Returns the last median (None if estimates never all existed) and the seconds it took.
    """
    start = time.monotonic()
    median = None
    while True:
        errors = rtt_errors(topology, nodes)
        if errors is not None:
            median = statistics.median(errors)
            if median <= target:
                break
        if time.monotonic() - start > deadline_s:
            break
        time.sleep(0.5)
    return median, time.monotonic() - start


# --- the tap switch (a process of its own, so that its timing does not depend on the test) ----


def _open_tap(ns: str) -> int:
    def attach() -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", b"eth0", IFF_TAP | IFF_NO_PI))
        return fd

    return in_netns(ns, attach)  # type: ignore[no-any-return]


def _switch_main(specs: list[str]) -> None:
    """Forward frames between hosts' taps, each delayed by its sender's delay."""
    fds: list[int] = []
    delays: list[float] = []
    for spec in specs:
        ns, delay = spec.rsplit(":", 1)
        fds.append(_open_tap(ns))
        delays.append(float(delay) / 1000)
    where: dict[bytes, int] = {}
    side: dict[int, int] = {}
    pending: list[tuple[float, int, int, bytes]] = []
    seq = 0
    sel = selectors.DefaultSelector()
    for port, fd in enumerate(fds):
        sel.register(fd, selectors.EVENT_READ, port)
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, -1)
    print("ready", flush=True)
    while True:
        timeout = max(0.0, pending[0][0] - time.monotonic()) if pending else None
        for key, _ in sel.select(timeout):
            port = key.data
            if port == -1:
                line = sys.stdin.readline().split()
                if not line:
                    return
                if line[0] == "partition":
                    side = {int(h): 0 for h in line[1].split(",")}
                    side.update({int(h): 1 for h in line[2].split(",")})
                else:
                    side = {}
                print("ok", flush=True)
                continue
            while True:
                try:
                    frame = os.read(key.fd, 65536)
                except BlockingIOError:
                    break
                if len(frame) < 14:
                    continue
                where[frame[6:12]] = port
                dst = where.get(frame[0:6]) if not frame[0] & 1 else None
                targets = [dst] if dst is not None else [p for p in range(len(fds)) if p != port]
                due = time.monotonic() + delays[port]
                for target in targets:
                    cut = port in side and target in side and side[port] != side[target]
                    if target != port and not cut:
                        seq += 1
                        heapq.heappush(pending, (due, seq, target, frame))
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _, _, target, frame = heapq.heappop(pending)
            with contextlib.suppress(OSError):
                os.write(fds[target], frame)


if __name__ == "__main__":
    _switch_main(sys.argv[1:])
