"""A worker thread pool with a bounded queue that refuses work at once when it is full.

``concurrent.futures.ThreadPoolExecutor`` queues without bound: under a flood every request
would wait behind all the others and time out at the client. Here ``submit`` raises
``Overloaded`` the moment the queue is full, which the HTTP side answers with 503 at once.

Calls into wasm release the GIL, so threads running instances use the cores in parallel;
the pool is therefore sized to the cores by default.
"""

from __future__ import annotations

import asyncio
import collections
import os
import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Generic, Protocol, TypeVar

from pollen.runtime.errors import Overloaded, Unavailable

T = TypeVar("T")


class _Completion(Protocol):
    """What a worker needs of a job's future (``concurrent.futures.Future`` has it)."""

    def set_running_or_notify_cancel(self) -> bool: ...

    def set_result(self, result: Any) -> None: ...

    def set_exception(self, exception: BaseException | None) -> None: ...


_Job = tuple[_Completion, Callable[[], object]]


class _Inbox:
    """Results from worker threads for one event loop, handed over in batches.

    ``asyncio.wrap_future`` costs a ``call_soon_threadsafe`` (a write to the loop's wake-up
    pipe) per result. Here a worker appends to a deque and wakes the loop only when no
    wake-up is pending; the loop then settles every result that arrived meanwhile. Lock-free
    under the GIL: the loop clears the flag *before* it drains and a worker appends *before*
    it tests the flag, so a result is never left behind (at worst the loop wakes once for
    nothing).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ready: collections.deque[tuple[asyncio.Future[Any], Any, BaseException | None]] = (
            collections.deque()
        )
        self._scheduled = False

    def put(self, future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
        """Settle ``future`` on its loop (from any thread)."""
        self._ready.append((future, result, error))
        if not self._scheduled:
            self._scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: nobody waits any more
                self._ready.clear()

    def _drain(self) -> None:
        self._scheduled = False
        ready = self._ready
        while ready:
            future, result, error = ready.popleft()
            if future.done():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)


_inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Inbox] = weakref.WeakKeyDictionary()


class _LoopCompletion(Generic[T]):
    """Completes an asyncio future from a worker thread, through the loop's inbox."""

    __slots__ = ("_future", "_inbox")

    def __init__(self, future: asyncio.Future[T], inbox: _Inbox) -> None:
        self._future = future
        self._inbox = inbox

    def set_running_or_notify_cancel(self) -> bool:
        # Read from a worker thread: at worst a job cancelled this instant still runs.
        return not self._future.cancelled()

    def set_result(self, result: Any) -> None:
        self._inbox.put(self._future, result, None)

    def set_exception(self, exception: BaseException | None) -> None:
        self._inbox.put(self._future, None, exception)


def copy_result(source: asyncio.Future[T], target: asyncio.Future[T]) -> None:
    """Settle ``target`` as ``source`` ended (a done-callback of ``source``), unless it is
    already done."""
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif (error := source.exception()) is not None:
        target.set_exception(error)
    else:
        target.set_result(source.result())


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
        self._enqueue(future, fn)
        return future

    def submit_async(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """``submit`` for the running event loop: an asyncio future, settled in batches with
        the other results that finish meanwhile. Raises ``Overloaded`` at once when full."""
        loop = asyncio.get_running_loop()
        inbox = _inboxes.get(loop)
        if inbox is None:
            inbox = _inboxes[loop] = _Inbox(loop)
        future: asyncio.Future[T] = loop.create_future()
        self._enqueue(_LoopCompletion(future, inbox), fn)
        return future

    def _enqueue(self, completion: _Completion, fn: Callable[[], object]) -> None:
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
        self._queue.put((completion, fn))

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
