"""The bounded worker pool and the log ring buffer."""

from __future__ import annotations

import threading

import pytest

from pollen.runtime.errors import Overloaded, Unavailable
from pollen.runtime.logs import LogBuffer
from pollen.runtime.pool import WorkerPool, default_workers


def test_pool_refuses_when_full_and_recovers() -> None:
    release = threading.Event()
    pool = WorkerPool(workers=2, queue_size=1, name="test")
    try:
        futures = [pool.submit(release.wait) for _ in range(3)]  # 2 running, 1 queued
        with pytest.raises(Overloaded, match="at capacity"):
            pool.submit(lambda: None)
        release.set()
        assert all(f.result(timeout=20) for f in futures)
        assert pool.submit(lambda: 42).result(timeout=20) == 42
    finally:
        release.set()
        pool.close()
    with pytest.raises(Unavailable):
        pool.submit(lambda: None)


def test_pool_passes_exceptions_and_sizes_to_cores() -> None:
    pool = WorkerPool(queue_size=4)
    try:
        assert pool.workers == default_workers() >= 1
        future = pool.submit(lambda: 1 // 0)
        with pytest.raises(ZeroDivisionError):
            future.result(timeout=20)
    finally:
        pool.close()


def test_log_lines_split_and_flush() -> None:
    logs = LogBuffer()
    logs.write("stdout", b"one\ntw")
    logs.write("stderr", b"err\n")
    logs.write("stdout", b"o\nthr")
    assert [(line.stream, line.text) for line in logs.lines()] == [
        ("stdout", "one"),
        ("stderr", "err"),
        ("stdout", "two"),
    ]
    logs.flush()
    assert logs.lines()[-1].text == "thr"
    assert [line.seq for line in logs.lines(after=2)] == [3, 4]


def test_log_ring_is_bounded() -> None:
    logs = LogBuffer(max_lines=5, max_bytes=1000)
    for i in range(20):
        logs.log("info", f"line {i}")
    kept = logs.lines()
    assert [line.text for line in kept] == [f"line {i}" for i in range(15, 20)]
    assert logs.dropped == 15
    big = LogBuffer(max_lines=100, max_bytes=50)
    big.write("stdout", b"x" * 40 + b"\n" + b"y" * 40 + b"\n")
    assert [line.text[0] for line in big.lines()] == ["y"]


def test_log_wait_returns_new_lines() -> None:
    logs = LogBuffer()
    writer = threading.Timer(0.05, logs.log, args=("info", "late"))
    writer.start()
    lines = logs.wait(after=0, timeout=20)
    assert [line.text for line in lines] == ["late"]
