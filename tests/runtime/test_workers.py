"""``pollen run --workers N``: worker processes on one port, supervised; real processes and
sockets on 127.0.0.1, real modules from build/examples."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from pollen.cli.localnode import tool
from pollen.runtime.workers import describe_exit, reserve_port, restart_delay
from tests.helpers import wait_for

POLLEN = tool("pollen")


class Served:
    """A ``pollen run`` process whose stderr is read all along (so that the workers never
    block on a full pipe) and kept for the test to look at."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [POLLEN, "run", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        while chunk := os.read(self.proc.stderr.fileno(), 65536):
            with self._lock:
                self._chunks.append(chunk)

    @property
    def stderr(self) -> str:
        with self._lock:
            return b"".join(self._chunks).decode(errors="replace")

    def port(self) -> int:
        found = wait_for(
            lambda: (
                re.search(r"at http://127\.0\.0\.1:(\d+)/", self.stderr)
                or self.proc.poll() is not None
            ),
            timeout=120,
            what="the Serving line",
        )
        assert isinstance(found, re.Match), self.stderr
        return int(found.group(1))

    def workers(self) -> list[psutil.Process]:
        """The worker processes alive now (not zombies)."""
        alive = []
        for child in psutil.Process(self.proc.pid).children():
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    alive.append(child)
            except psutil.NoSuchProcess:
                continue
        return alive

    def finish(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            for child in psutil.Process(self.proc.pid).children():
                child.kill()
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, POLLEN_CACHE_DIR=str(tmp_path / "cache"))


@pytest.fixture
def two_workers(examples: dict[str, Path], env: dict[str, str]) -> Iterator[Served]:
    served = Served(
        [str(examples["hello"]), "--port", "0", "--workers", "2", "-e", "GREETING=Howdy"], env
    )
    try:
        yield served
    finally:
        served.close()


def get(port: int, path: str = "/") -> tuple[int, bytes]:
    """One request on a new connection (so that the kernel picks a worker for each)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited: reaped, or a zombie (an orphan's reaper may be slow)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _reaped(pid: int) -> bool:
    """Whether ``pid`` is gone for good. A process whose main thread has exited already
    shows as a zombie while its other threads still hold its sockets; its parent can only
    reap it once every thread is gone."""
    return not psutil.pid_exists(pid)


def test_two_workers_serve_many_requests(two_workers: Served) -> None:
    port = two_workers.port()
    assert len(two_workers.workers()) == 2
    for i in range(200):
        assert get(port, f"/n/{i}") == (200, b"Howdy!\n")
    assert two_workers.stderr.count("Serving workload") == 1


def test_keep_alive_connections_are_spread_over_the_workers(two_workers: Served) -> None:
    port = two_workers.port()
    pids = {worker.pid for worker in two_workers.workers()}
    connections = [socket.create_connection(("127.0.0.1", port)) for _ in range(32)]
    try:
        # Each worker's own connections show up among its sockets.
        def owners() -> set[int]:
            local = {conn.getsockname() for conn in connections}
            found = set()
            for pid in pids:
                for conn in psutil.Process(pid).net_connections(kind="tcp"):
                    if conn.raddr and (conn.raddr.ip, conn.raddr.port) in local:
                        found.add(pid)
            return found

        # With 32 connections hashed over two sockets, both get some (1 in 2**31 not).
        wait_for(lambda: owners() == pids, timeout=30, what="connections on both workers")
    finally:
        for conn in connections:
            conn.close()


def test_a_killed_worker_is_restarted_and_the_server_keeps_answering(
    two_workers: Served,
) -> None:
    port = two_workers.port()
    victim, survivor = two_workers.workers()
    victim.send_signal(signal.SIGKILL)
    # The survivor answers at once: the dead worker's socket left the port with it.
    wait_for(lambda: _reaped(victim.pid), what="the killed worker to be reaped")
    for _ in range(20):
        assert get(port) == (200, b"Howdy!\n")

    def replaced() -> bool:
        pids = {worker.pid for worker in two_workers.workers()}
        return len(pids) == 2 and victim.pid not in pids and survivor.pid in pids

    wait_for(replaced, timeout=60, what="a new worker")
    assert f"(pid {victim.pid}) was killed by SIGKILL; restarting it" in two_workers.stderr
    for i in range(50):
        assert get(port, f"/{i}") == (200, b"Howdy!\n")
    assert two_workers.stderr.count("Serving workload") == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_every_worker_and_exits_0(two_workers: Served, sig: int) -> None:
    port = two_workers.port()
    assert get(port) == (200, b"Howdy!\n")
    pids = [worker.pid for worker in two_workers.workers()]
    two_workers.proc.send_signal(sig)
    assert two_workers.finish(timeout=30) == 0
    assert all(_gone(pid) for pid in pids)
    stderr = two_workers.stderr
    assert "panicked" not in stderr
    assert "Traceback" not in stderr
    assert "restarting" not in stderr
    with pytest.raises(OSError):
        get(port)


def test_workers_stop_when_the_supervisor_is_killed(two_workers: Served) -> None:
    port = two_workers.port()
    pids = [worker.pid for worker in two_workers.workers()]
    two_workers.proc.send_signal(signal.SIGKILL)
    two_workers.finish(timeout=30)
    # Their lifeline reads end-of-file: no orphan keeps the port.
    wait_for(lambda: all(_gone(pid) for pid in pids), timeout=30, what="orphaned workers to stop")
    assert "panicked" not in two_workers.stderr
    with pytest.raises(OSError):
        get(port)


@pytest.mark.parametrize(
    ("name", "words"),
    [("missing-import", "env.launch_missiles"), ("junk", "not a WebAssembly binary")],
)
def test_a_module_that_cannot_load_exits_2_without_restarts(
    examples: dict[str, Path], env: dict[str, str], tmp_path: Path, name: str, words: str
) -> None:
    if name == "junk":
        path = tmp_path / "junk.wasm"
        path.write_bytes(b"#!/bin/sh\necho not wasm\n")
    else:
        path = examples[name]
    result = subprocess.run(
        [POLLEN, "run", str(path), "--port", "0", "--workers", "3"],
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    assert words in lines[0]


def test_a_port_in_use_is_refused(examples: dict[str, Path], env: dict[str, str]) -> None:
    with socket.socket() as taken:
        # Even a listener with SO_REUSEPORT, whose group the workers could otherwise join.
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [POLLEN, "run", str(examples["hello"]), "--port", str(port), "--workers", "2"],
            capture_output=True,
            env=env,
            timeout=120,
            check=False,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr.decode()


def test_module_logs_from_every_worker_reach_the_terminal(
    examples: dict[str, Path], env: dict[str, str]
) -> None:
    served = Served([str(examples["caller"]), "--port", "0", "--workers", "2"], env)
    try:
        port = served.port()
        for _ in range(20):
            status, _ = get(port)
            assert status == 502  # nothing named "echo" runs beside it
        wait_for(
            lambda: served.stderr.count("caller: the call failed") == 20,
            what="20 log lines",
        )
        assert served.stderr.count("caller: calling another workload") == 20
    finally:
        served.close()


def test_restart_delay_doubles_and_is_capped() -> None:
    assert [restart_delay(n) for n in range(5)] == [0.0, 0.25, 0.5, 1.0, 2.0]
    assert restart_delay(30) == 30.0


def test_describe_exit() -> None:
    assert describe_exit(3) == "exited with status 3"
    assert describe_exit(-9) == "was killed by SIGKILL"


def test_reserve_port_holds_a_port_that_workers_can_join() -> None:
    holder = reserve_port("127.0.0.1", 0)
    with holder:
        port = holder.getsockname()[1]
        with socket.socket() as worker:
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", port))
            worker.listen()
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                accepted, _ = worker.accept()
                accepted.close()
        with pytest.raises(OSError), socket.socket() as other:
            other.bind(("127.0.0.1", port))
