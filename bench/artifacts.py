"""Artifact fetch between local nodes (SPEC section 7): 1, 10 and 100 MB between two nodes
against a raw TCP copy of the same bytes in the same run, and 100 MB from three holders at
once against from one.

Four nodes from ``pollen up``. Each sample is a new artifact of random bytes, uploaded to the
holders (untimed), then asked for on the fetching node with ``GET blobs/DIGEST``, which
fetches it first; the figure is the fetch as the node times it (``Pollen-Fetch-Seconds``:
from the fetch's start to the file under its digest, hashed and fsynced), not the HTTP answer
that follows. The baseline sends the same bytes from the holder's stored file over one plain
TCP connection on 127.0.0.1 between two processes, the receiver writing them to a file: no
TLS, no hashing, no fsync.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import statistics
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

from bench.mesh_real import _client, _swarm
from bench.report import Row, Section
from pollen.cli.swarm import SwarmNode
from pollen.runtime.artifacts import sha256_digest

MB = 1 << 20
SIZES_MB = (1, 10, 100)
RUNS = {1: 7, 10: 5, 100: 5}
MULTI_RUNS = 5
TARGET_MB_S = 100.0
ADVERTISE_TIMEOUT = 30.0


def _mb_s(size: int, seconds: float) -> float:
    return size / MB / seconds


# --- the fetch -----------------------------------------------------------------------------


def _fetch(holders: list[SwarmNode], fetcher: SwarmNode, size: int) -> tuple[float, str]:
    """Upload ``size`` random bytes to ``holders``; fetch them on ``fetcher``. Returns the
    fetch's seconds and the nodes that sent chunks."""
    data = os.urandom(size)
    digest = sha256_digest(data)
    for holder in holders:
        _client(holder, 120).put_blob(digest, data)
    client = _client(fetcher, 300)
    # An Artifact names the digest, so that the fetching node says which holders it knows
    # of (status.holders, from membership): the fetch starts once it knows of them all.
    name = f"bench-{digest[7:19]}"
    client.apply(
        [
            {
                "apiVersion": "pollen.dev/v1alpha1",
                "kind": "Artifact",
                "metadata": {"name": name},
                "spec": {"digest": digest, "size": size},
            }
        ]
    )
    wanted = sorted(holder.name for holder in holders)
    deadline = time.monotonic() + ADVERTISE_TIMEOUT
    while client.get("artifacts", name).get("status", {}).get("holders") != wanted:
        if time.monotonic() > deadline:
            raise AssertionError(f"{fetcher.name} did not learn that {wanted} hold {digest}")
        time.sleep(0.05)
    answer = client.get_blob(digest)
    client.delete("artifacts", name)
    if answer.body != data:
        raise AssertionError("the fetched bytes differ from those uploaded")
    seconds = float(answer.headers["Pollen-Fetch-Seconds"])
    return seconds, answer.headers.get("Pollen-Fetch-Sources", "")


# --- the raw TCP baseline ------------------------------------------------------------------


def _send(path: Path, ready: Connection) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    ready.send(listener.getsockname()[1])
    sock, _ = listener.accept()
    with sock, open(path, "rb") as file:
        sock.sendfile(file)


def _raw_copy(source: Path, target: Path) -> float:
    """Seconds to copy ``source`` over TCP on 127.0.0.1 from another process into
    ``target``: connect, receive everything, write it to the file."""
    parent, child = multiprocessing.Pipe()
    sender = multiprocessing.get_context("fork").Process(target=_send, args=(source, child))
    sender.start()
    try:
        port = parent.recv()
        buffer = bytearray(4 * MB)
        view = memoryview(buffer)
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as sock, open(target, "wb") as out:
            while count := sock.recv_into(view):
                out.write(view[:count])
        return time.perf_counter() - started
    finally:
        sender.join(timeout=30)
        target.unlink(missing_ok=True)


# --- the report ----------------------------------------------------------------------------


def _median(samples: list[float]) -> float:
    return statistics.median(samples)


def _measure() -> tuple[dict[int, list[float]], dict[int, list[float]], list[float], list[float]]:
    fetches: dict[int, list[float]] = {size: [] for size in SIZES_MB}
    copies: dict[int, list[float]] = {size: [] for size in SIZES_MB}
    three: list[float] = []
    one: list[float] = []
    with _swarm(4) as nodes, tempfile.TemporaryDirectory(prefix="pollen-bench-raw-") as tmp:
        holder, fetcher = nodes[0], nodes[1]
        _fetch([holder], fetcher, MB)  # warm up: connections, the bulk path, the page cache
        for size_mb in SIZES_MB:
            size = size_mb * MB
            source = Path(tmp) / "source"
            for _ in range(RUNS[size_mb]):
                # Interleaved, so that the machine's load weighs on both alike.
                seconds, _ = _fetch([holder], fetcher, size)
                fetches[size_mb].append(seconds)
                source.write_bytes(os.urandom(size))
                copies[size_mb].append(_raw_copy(source, Path(tmp) / "target"))
        for _ in range(MULTI_RUNS):
            seconds, sources = _fetch(nodes[:3], nodes[3], 100 * MB)
            if sources.count(",") != 2:
                raise AssertionError(f"expected chunks from three holders, got {sources!r}")
            three.append(seconds)
            one.append(_fetch(nodes[:1], nodes[3], 100 * MB)[0])
    return fetches, copies, three, one


def _rows(
    fetches: dict[int, list[float]],
    copies: dict[int, list[float]],
    three: list[float],
    one: list[float],
) -> list[Row]:
    rows = []
    for size_mb in SIZES_MB:
        fetch = _mb_s(size_mb * MB, _median(fetches[size_mb]))
        copy = _mb_s(size_mb * MB, _median(copies[size_mb]))
        target = size_mb == 100
        rows.append(
            Row(
                f"fetch {size_mb} MB between two nodes (MB/s, median of {RUNS[size_mb]})",
                f"{fetch:.0f} MB/s",
                f"raw TCP copy {copy:.0f} MB/s",
                f"{fetch / copy:.2f}",
                f">= {TARGET_MB_S:.0f} MB/s" if target else "—",
                fetch >= TARGET_MB_S if target else None,
            )
        )
    from_three = _mb_s(100 * MB, _median(three))
    from_one = _mb_s(100 * MB, _median(one))
    rows.append(
        Row(
            f"fetch 100 MB from three holders at once (MB/s, median of {MULTI_RUNS})",
            f"{from_three:.0f} MB/s",
            f"from one holder {from_one:.0f} MB/s",
            f"{from_three / from_one:.2f}",
        )
    )
    return rows


def run() -> Section:
    """The artifact fetch figures, as one report section."""
    fetches, copies, three, one = _measure()
    rows = _rows(fetches, copies, three, one)
    spread = ", ".join(f"{_mb_s(100 * MB, s):.0f}" for s in sorted(fetches[100]))
    notes = (
        "Four node processes from `pollen up` and the baseline's two processes on the same "
        "2 cores. A fetch asks the holder for the artifact's manifest on a mesh stream, then "
        "takes 4 MiB chunks over the bulk path (TLS 1.3 on TCP, mutually authenticated with "
        "the node certificates, two connections per holder, ADR 0017), writes them into a "
        "partial file, hashes the whole file in order as the chunks arrive, fsyncs it and "
        "renames it to its digest. The raw TCP copy moves the same number of bytes from a "
        "file with `sendfile` to a receiving process that writes them to a file: no "
        "encryption, no hashing, no fsync, one process each side. 100 MB single-holder "
        f"samples (MB/s): {spread}. From three holders, the same chunks are spread over "
        "three holder processes, but they all share the two cores with the fetcher, so the "
        "gain is what three senders add on one machine, not three machines' bandwidth."
    )
    return Section("Artifact fetch between local nodes", rows, notes=notes)
