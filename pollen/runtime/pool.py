"""A worker thread pool with a bounded queue that refuses work at once when it is full.

``concurrent.futures.ThreadPoolExecutor`` queues without bound: under a flood every request
would wait behind all the others and time out at the client. Here ``submit`` raises
``Overloaded`` the moment the queue is full, which the HTTP side answers with 503 at once.

Calls into wasm release the GIL, so threads running instances use the cores in parallel;
the pool is therefore sized to the cores by default.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from pollen.runtime.errors import Overloaded, Unavailable

T = TypeVar("T")

_Job = tuple[Future[object], Callable[[], object]]


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class WorkerPool:
    """``workers`` threads (started on first use) fed from a queue of ``queue_size`` jobs."""

    def __init__(
        self, workers: int | None = None, queue_size: int = 64, *, name: str = "pollen-worker"
    ) -> None:
        if queue_size < 0:
            raise ValueError("queue_size must be >= 0")
        self.workers = workers or default_workers()
        self.queue_size = queue_size
        self.name = name
        # maxsize 0 means unbounded to queue.Queue; a pool with no queue at all still needs
        # a slot for a worker to pick a job from, so admission is counted separately.
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._waiting = 0  # submitted, not yet picked up by a worker
        self._idle = 0  # workers blocked on the queue
        self._active = 0  # jobs running
        self._closed = False

    @property
    def queued(self) -> int:
        """Jobs waiting for a worker."""
        with self._lock:
            return self._waiting

    @property
    def active(self) -> int:
        """Jobs running now."""
        with self._lock:
            return self._active

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on a worker; raise ``Overloaded`` at once when the queue is full."""
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise Unavailable(f"the {self.name} pool is shut down")
            # Capacity is every worker busy plus a full queue; counting running and waiting
            # jobs (rather than idle threads) keeps it exact while threads are starting.
            if self._waiting + self._active >= self.workers + self.queue_size:
                raise Overloaded(
                    f"{self.name} is at capacity ({self.workers} running, {self.queue_size} queued)"
                )
            self._waiting += 1
            # Start another worker while jobs outnumber the workers free to take them.
            if self._waiting > self._idle and len(self._threads) < self.workers:
                thread = threading.Thread(
                    target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        self._queue.put((future, fn))  # type: ignore[arg-type]
        return future

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            job = self._queue.get()
            with self._lock:
                self._idle -= 1
                if job is None:
                    return
                self._waiting -= 1
                self._active += 1
            future, fn = job
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        result = fn()
                    except BaseException as exc:
                        future.set_exception(exc)
                    else:
                        future.set_result(result)
            finally:
                with self._lock:
                    self._active -= 1

    def close(self, wait: bool = True, timeout: float | None = None) -> None:
        """Refuse new work, let queued and running jobs finish, stop the threads."""
        with self._lock:
            if self._closed:
                threads = []
            else:
                self._closed = True
                threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join(timeout)
