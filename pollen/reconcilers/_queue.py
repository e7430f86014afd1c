"""The reconcile work queue: a sans-IO state machine driven by the caller's clock.

Semantics follow client-go's rate-limited work queue, which every Kubernetes controller uses:

- a key waits at most once (adding a waiting key again is a no-op);
- a key being processed is never handed out again until :meth:`WorkQueue.done`; adding it
  meanwhile marks it dirty, and ``done`` puts it back, so the latest change is never lost and
  the same key never runs twice at once;
- a failed key is re-added after a per-key exponential backoff (``base * 2**(failures - 1)``,
  capped at ``max_delay``) that a success resets;
- delayed adds wait until their time; of several delayed adds of one key the earliest wins.

No asyncio, no wall clock: the shell passes ``now`` (seconds, monotonic) to every call and asks
:meth:`WorkQueue.next_deadline` how long it may sleep.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Drop", "Outcome", "Requeue", "Retry", "Success", "WorkQueue"]

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Success:
    """The key is reconciled: forget its failures."""


@dataclass(frozen=True)
class Requeue:
    """The key is reconciled for now; look again after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True)
class Retry:
    """The key failed: count a failure and retry after ``delay``, or after the backoff."""

    delay: float | None = None


@dataclass(frozen=True)
class Drop:
    """The key failed in a way retrying will not fix: forget it until it is added again."""


Outcome = Success | Requeue | Retry | Drop


class WorkQueue(Generic[K]):
    """A per-key deduplicated work queue with delayed adds and per-key exponential backoff."""

    def __init__(self, *, base_delay: float = 0.1, max_delay: float = 300.0) -> None:
        if not 0 < base_delay <= max_delay:
            raise ValueError("need 0 < base_delay <= max_delay")
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._ready: deque[K] = deque()
        self._dirty: set[K] = set()
        self._processing: set[K] = set()
        self._failures: dict[K, int] = {}
        # (due time, tie-breaker, key); stale entries are skipped, _due says which one counts.
        self._waiting: list[tuple[float, int, K]] = []
        self._due: dict[K, float] = {}
        self._sequence = itertools.count()

    def add(self, key: K, now: float) -> None:
        """Make ``key`` ready now, unless it already waits; if it is being processed, it is
        handed out again after :meth:`done`."""
        del now  # part of the signature so that every call is made at a known time
        if key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._ready.append(key)

    def add_after(self, key: K, delay: float, now: float) -> None:
        """Add ``key`` once ``delay`` seconds have passed; an earlier pending add wins."""
        if delay <= 0:
            self.add(key, now)
            return
        due = now + delay
        current = self._due.get(key)
        if current is not None and current <= due:
            return
        self._due[key] = due
        heapq.heappush(self._waiting, (due, next(self._sequence), key))

    def pop(self, now: float) -> K | None:
        """The next ready key, now marked as processing; None if nothing is ready."""
        self._promote(now)
        if not self._ready:
            return None
        key = self._ready.popleft()
        self._dirty.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: K, now: float, outcome: Outcome) -> None:
        """Finish processing ``key`` with ``outcome``; re-adds it if it changed meanwhile."""
        if key not in self._processing:
            raise ValueError(f"{key!r} is not being processed")
        self._processing.discard(key)
        match outcome:
            case Success() | Drop():
                self.forget(key)
            case Requeue(delay):
                self.forget(key)
                self.add_after(key, delay, now)
            case Retry(delay):
                failures = self._failures.get(key, 0) + 1
                self._failures[key] = failures
                self.add_after(key, self.backoff(key) if delay is None else delay, now)
        if key in self._dirty:
            self._ready.append(key)

    def forget(self, key: K) -> None:
        """Reset ``key``'s backoff."""
        self._failures.pop(key, None)

    def failures(self, key: K) -> int:
        """How many times in a row ``key`` failed."""
        return self._failures.get(key, 0)

    def backoff(self, key: K) -> float:
        """The delay before retrying ``key`` after its latest failure (0 without failures)."""
        return self._delay(self._failures.get(key, 0))

    def next_backoff(self, key: K) -> float:
        """The delay a further failure of ``key`` would get."""
        return self._delay(self._failures.get(key, 0) + 1)

    def _delay(self, failures: int) -> float:
        if failures == 0:
            return 0.0
        # Past 2**64 the cap has long been reached; keep the power from growing without bound.
        return float(min(self.base_delay * 2 ** min(failures - 1, 64), self.max_delay))

    def next_deadline(self) -> float | None:
        """When the earliest delayed key becomes ready; None if none waits."""
        while self._waiting:
            due, _, key = self._waiting[0]
            if self._due.get(key) == due:
                return due
            heapq.heappop(self._waiting)
        return None

    def due(self, key: K) -> float | None:
        """When ``key``'s delayed add falls due, if it has one."""
        return self._due.get(key)

    def is_processing(self, key: K) -> bool:
        """Whether ``key`` was popped and is not done yet."""
        return key in self._processing

    @property
    def ready(self) -> int:
        """How many keys are ready to pop now (delayed keys not yet due aside)."""
        return len(self._ready)

    @property
    def processing(self) -> int:
        """How many keys are being processed."""
        return len(self._processing)

    def __len__(self) -> int:
        """Keys ready or waiting, processing ones aside."""
        return len(self._dirty | set(self._due))

    def _promote(self, now: float) -> None:
        """Move delayed keys whose time has come to the ready queue."""
        while self._waiting and self._waiting[0][0] <= now:
            due, _, key = heapq.heappop(self._waiting)
            if self._due.get(key) != due:
                continue  # superseded by an earlier add_after
            del self._due[key]
            self.add(key, now)
