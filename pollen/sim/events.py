"""Virtual time: a clock and a heap of events, run in (time, insertion) order."""

from __future__ import annotations

import heapq
from collections.abc import Callable

__all__ = ["EventQueue"]


class EventQueue:
    """Callbacks scheduled at virtual times; ties run in the order they were scheduled.

    The insertion counter breaks ties, which keeps a run deterministic and never compares two
    callbacks.
    """

    def __init__(self, start: float = 0.0) -> None:
        """An empty queue whose clock reads ``start``."""
        self.now = start
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.processed = 0

    def schedule(self, at: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` at time ``at`` (or now, if ``at`` is in the past)."""
        self._seq += 1
        heapq.heappush(self._heap, (max(at, self.now), self._seq, callback))

    def next_time(self) -> float | None:
        """When the earliest event is due, or None if there is none."""
        return self._heap[0][0] if self._heap else None

    def run_until(self, end: float, stop: Callable[[], bool] | None = None) -> bool:
        """Run every event due at or before ``end``, then set the clock to ``end``.

        With ``stop``, it is checked after each event; once true, the clock stays at that
        event's time and this returns True.
        """
        heap = self._heap
        while heap and heap[0][0] <= end:
            at, _, callback = heapq.heappop(heap)
            self.now = at
            callback()
            self.processed += 1
            if stop is not None and stop():
                return True
        self.now = max(self.now, end)
        return False

    def __len__(self) -> int:
        return len(self._heap)
