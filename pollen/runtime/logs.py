"""A workload's logs: stdout, stderr and ``pollen.log`` lines in a bounded ring buffer.

Output arrives in arbitrary chunks, from wasmtime's threads; it is cut into lines per stream
(a partial line waits for its end, or for ``flush``) and the oldest lines are dropped once the
buffer holds more than ``max_lines`` lines or ``max_bytes`` bytes. Every line gets a sequence
number, so a follower (``pctl logs -f``) asks for what came after the last one it saw, and
subscribers hear that a line arrived without polling.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

MAX_LINE_BYTES = 16 * 1024


@dataclass(frozen=True)
class LogLine:
    """One line of a workload's output."""

    seq: int
    time: float
    #: ``stdout``, ``stderr`` or ``log`` (``pollen.log``), or ``system`` (the runtime's own).
    stream: str
    text: str
    level: str = ""


class LogBuffer:
    """Thread-safe bounded ring buffer of ``LogLine``."""

    def __init__(
        self,
        max_lines: int = 10_000,
        max_bytes: int = 4 * 1024 * 1024,
        on_line: Callable[[LogLine], None] | None = None,
    ) -> None:
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.on_line = on_line
        self._lines: deque[LogLine] = deque()
        self._bytes = 0
        self._seq = 0
        self._partial: dict[str, bytearray] = {}
        self._cond = threading.Condition()
        self._listeners: list[Callable[[LogLine], None]] = []
        self.dropped = 0

    def write(self, stream: str, data: bytes) -> None:
        """Add raw output of ``stream``; complete lines become ``LogLine``s."""
        with self._cond:
            pending = self._partial.setdefault(stream, bytearray())
            pending += data
            while True:
                end = pending.find(b"\n")
                if end == -1:
                    break
                self._add(stream, bytes(pending[:end]))
                del pending[: end + 1]
            if len(pending) > MAX_LINE_BYTES:
                self._add(stream, bytes(pending))
                pending.clear()

    def writer(self, stream: str) -> Callable[[bytes], None]:
        """A sink for ``Sandbox.run(stdout=...)`` that writes to ``stream``."""

        def sink(data: bytes) -> None:
            self.write(stream, data)

        return sink

    def log(self, level: str, text: str, stream: str = "log") -> None:
        """Add one whole line (``pollen.log`` or the runtime's own notes)."""
        with self._cond:
            self._add(stream, text.encode(), level)

    def flush(self) -> None:
        """Turn what is left of unterminated lines into lines (the instance ended)."""
        with self._cond:
            for stream, pending in self._partial.items():
                if pending:
                    self._add(stream, bytes(pending))
                    pending.clear()

    def _add(self, stream: str, raw: bytes, level: str = "") -> None:
        text = raw[:MAX_LINE_BYTES].decode("utf-8", errors="replace").rstrip("\r")
        self._seq += 1
        line = LogLine(self._seq, time.time(), stream, text, level)
        self._lines.append(line)
        self._bytes += len(text)
        while self._lines and (len(self._lines) > self.max_lines or self._bytes > self.max_bytes):
            old = self._lines.popleft()
            self._bytes -= len(old.text)
            self.dropped += 1
        self._cond.notify_all()
        if self.on_line is not None:
            self.on_line(line)
        if self._listeners:
            for listener in tuple(self._listeners):  # one may unsubscribe as it is called
                listener(line)

    def subscribe(self, listener: Callable[[LogLine], None]) -> Callable[[], None]:
        """Call ``listener(line)`` for every new line; returns the function that stops it.

        The listener runs on whichever thread wrote the line, with the buffer locked: it must
        only hand the news on (``loop.call_soon_threadsafe``), never block or write here.
        """
        with self._cond:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._cond:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def lines(self, after: int = 0) -> list[LogLine]:
        """Lines with a sequence number above ``after``, oldest first."""
        with self._cond:
            # From the newest end: a follower asks for the few lines after the last it saw,
            # which should not cost a walk over the whole buffer.
            new: list[LogLine] = []
            for line in reversed(self._lines):
                if line.seq <= after:
                    break
                new.append(line)
            new.reverse()
            return new

    def text(self, stream: str | None = None) -> str:
        """All kept lines (of one stream, if given), joined with newlines."""
        return "\n".join(
            line.text for line in self.lines() if stream is None or line.stream == stream
        )

    @property
    def last_seq(self) -> int:
        """The sequence number of the newest line (0 when there is none)."""
        with self._cond:
            return self._seq

    def wait(self, after: int, timeout: float) -> list[LogLine]:
        """Lines after ``after``, waiting up to ``timeout`` seconds for one to arrive."""
        with self._cond:
            self._cond.wait_for(lambda: self._seq > after, timeout)
        return self.lines(after)
