"""An artifact store killed with ``kill -9`` mid-write: never a partial file under a digest."""

from __future__ import annotations

import hashlib
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import pytest

from pollen.runtime.artifacts import ArtifactStore

WRITER = Path(__file__).with_name("artifact_writer.py")
DEADLINE_SECONDS = 60.0

pytestmark = pytest.mark.integration


class Writer:
    """The writer process and the lines it printed."""

    def __init__(self, directory: Path, seed: int, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WRITER), str(directory), str(seed), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        assert self.proc.stdout is not None
        self.pump = threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True)
        self.pump.start()
        self.deadline = time.monotonic() + DEADLINE_SECONDS
        self.seen: list[str] = []

    def _pump(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            self.lines.put(raw.decode().strip())
        self.lines.put(None)

    def next_line(self) -> str:
        remaining = self.deadline - time.monotonic()
        try:
            line = self.lines.get(timeout=max(remaining, 0.001))
        except queue.Empty:
            raise AssertionError("the writer stopped reporting") from None
        assert line is not None, "the writer exited early"
        self.seen.append(line)
        return line

    def kill(self) -> list[str]:
        """SIGKILL it; every line it printed, those still in the pipe included."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=DEADLINE_SECONDS)
        self.pump.join(timeout=DEADLINE_SECONDS)
        while (line := self.lines.get_nowait()) is not None:
            self.seen.append(line)
        for stream in (self.proc.stdout, self.proc.stderr):
            assert stream is not None
            stream.close()
        return self.seen


def check_store(directory: Path, stored: set[str]) -> ArtifactStore:
    """Open the store as a restarted node would and check every file under a digest."""
    store = ArtifactStore(directory)
    assert not list(store.directory.glob(".incoming-*")), "a leftover write survived opening"
    for path in store.directory.iterdir():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, f"{path.name} is partial"
    missing = stored - set(store.digests())
    assert not missing, f"acknowledged artifacts lost: {sorted(missing)}"
    return store


def test_a_kill_during_a_write_leaves_nothing_under_the_digest(tmp_path: Path) -> None:
    writer = Writer(tmp_path / "artifacts", 1, "--stall")
    try:
        assert writer.next_line() == "ready"
        writing = writer.next_line()
        stalled = writer.next_line()
        assert stalled.startswith("stalled ")
        digest = stalled.split()[1]
        assert writing == f"writing {digest}"
        assert len(list((tmp_path / "artifacts" / "sha256").glob(".incoming-*"))) == 1
    finally:
        writer.kill()
    store = check_store(tmp_path / "artifacts", set())
    assert not store.has(digest)
    assert store.digests() == []


def test_kills_at_random_moments_keep_every_acknowledged_artifact(tmp_path: Path) -> None:
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    stored: set[str] = set()
    for round_number in range(5):
        writer = Writer(tmp_path / "artifacts", rng.randrange(2**32))
        try:
            assert writer.next_line() == "ready"
            # Kill after a random number of lines: inside a write, a commit or a print.
            for _ in range(rng.randint(1, 12)):
                writer.next_line()
        finally:
            lines = writer.kill()
        stored |= {line.split()[1] for line in lines if line.startswith("stored ")}
        try:
            check_store(tmp_path / "artifacts", stored)
        except AssertionError as exc:
            raise AssertionError(f"round {round_number} (seed {seed}): {exc}") from None
