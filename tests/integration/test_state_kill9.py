"""An acknowledged write survives ``kill -9`` of the process that made it, at any moment."""

from __future__ import annotations

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

from pollen.state import ResourceStore

WRITER = Path(__file__).with_name("state_writer.py")
ROUNDS = 6
DEADLINE_SECONDS = 60.0

pytestmark = pytest.mark.integration


def _pump(stream: IO[bytes], lines: queue.Queue[str | None]) -> None:
    """Move the writer's stdout lines into a queue, then None at end of file."""
    for raw in iter(stream.readline, b""):
        lines.put(raw.decode().strip())
    lines.put(None)


def _next_line(lines: queue.Queue[str | None], deadline: float) -> str | None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise AssertionError("the writer did not acknowledge writes in time")
    try:
        return lines.get(timeout=remaining)
    except queue.Empty:
        raise AssertionError("the writer did not acknowledge writes in time") from None


def test_acknowledged_writes_survive_kill_9(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    acknowledged: set[str] = set()
    for round_number in range(ROUNDS):
        writer = subprocess.Popen(
            [sys.executable, str(WRITER), str(state_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        lines: queue.Queue[str | None] = queue.Queue()
        pump = threading.Thread(target=_pump, args=(writer.stdout, lines), daemon=True)
        pump.start()
        deadline = time.monotonic() + DEADLINE_SECONDS
        try:
            assert _next_line(lines, deadline) == "ready", "the writer did not start"
            # Kill after a random number of acknowledgements: the writer is then somewhere
            # inside its next apply (planning, writing, fsyncing or printing).
            for _ in range(rng.randint(1, 80)):
                line = _next_line(lines, deadline)
                assert line is not None, "the writer exited early"
                acknowledged.add(line)
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait(timeout=DEADLINE_SECONDS)
        # Acknowledgements already in the pipe when the kill landed count too.
        pump.join(timeout=DEADLINE_SECONDS)
        assert not pump.is_alive()
        while (line := lines.get_nowait()) is not None:
            acknowledged.add(line)
        assert writer.stderr is not None
        writer.stderr.close()
        assert writer.stdout is not None
        writer.stdout.close()

        with ResourceStore.open(state_dir) as store:
            present = {obj.name for obj in store.list("Workload")}
        missing = acknowledged - present
        assert not missing, f"round {round_number} (seed {seed}): lost {sorted(missing)}"
    assert len(acknowledged) >= ROUNDS
