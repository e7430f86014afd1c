"""Run a fast module's instances on the event loop's own thread, falling back to the pool.

``pollen run`` serves one module per process, and its worker processes (``--workers``) are
what use the cores. Inside such a process, handing each request from the event loop to a
pool thread and back costs more than the request itself: the loop and the pool thread take
turns on the GIL several times per request (a futex wake and a context switch each), and a
hello request cost 380-490 µs of CPU through the pool against 265-320 µs run on the loop
(ADR 0018). So a module that has shown it answers quickly runs on the loop:

- **One job per loop iteration.** Jobs wait in a FIFO and the loop runs one, then goes back
  to its sockets (``call_soon``), so requests are still read and answers written between
  instances, and a full FIFO is answered at once with ``Overloaded`` (a 503), as the pool's
  full queue is.
- **Only while proven fast.** A runner starts by sending jobs to the pool and timing them
  there (CPU time of the worker thread, which a wait for the GIL does not inflate). After
  ``PROVE_RUNS`` consecutive runs within ``budget`` it runs jobs on the loop. The first run
  on the loop that uses more than ``budget`` of CPU, or more than ``WALL_FACTOR`` budgets of
  wall time (a module that sleeps; a preempted process is allowed some slack), sends it back
  to the pool with the jobs still waiting, and the next promotion needs twice as
  many runs, up to ``MAX_PROVE_RUNS``. A module that spins or sleeps therefore holds a
  process's loop at most once per promotion, for at most its own timeout.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from pollen.runtime.errors import Overloaded, SandboxError
from pollen.runtime.pool import WorkerPool, copy_result

T = TypeVar("T")

#: Seconds one instance may hold the loop; a longer run sends the module back to the pool.
INLINE_BUDGET = 0.005
#: A run on the loop may take this many budgets of wall time (the process may be preempted
#: mid-run on a busy machine) as long as its CPU time stays within the budget.
WALL_FACTOR = 4
#: Consecutive fast runs on the pool before a module runs on the loop (doubled per demotion).
PROVE_RUNS = 16
MAX_PROVE_RUNS = 4096


class InlineRunner(Generic[T]):
    """Runs jobs on the calling event loop while they are fast, else on ``pool``.

    ``capacity`` bounds the jobs waiting for the loop; ``refuse`` turns a refusal (a full
    FIFO, a full pool when jobs move there) into the job's result, so that every future this
    returns ends with a result.
    """

    def __init__(
        self,
        pool: WorkerPool,
        refuse: Callable[[SandboxError], T],
        *,
        capacity: int,
        budget: float = INLINE_BUDGET,
        prove_runs: int = PROVE_RUNS,
    ) -> None:
        self.pool = pool
        self.budget = budget
        self.capacity = max(1, capacity)
        self._refuse = refuse
        self._jobs: collections.deque[tuple[asyncio.Future[T], Callable[[], T]]] = (
            collections.deque()
        )
        self._scheduled = False
        self._needed = prove_runs
        # Written by pool threads and the loop without a lock: a lost update only delays or
        # hastens one promotion, which a heuristic tolerates.
        self._proven = 0
        #: Times the module was sent back to the pool for a slow run on the loop.
        self.demotions = 0
        #: Jobs run on the loop so far.
        self.loop_runs = 0

    @property
    def on_loop(self) -> bool:
        """Whether new jobs run on the loop (the module has proven fast)."""
        return self._proven >= self._needed

    def submit(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``fn`` on the loop or the pool; raises ``Overloaded`` when the chosen one is
        full (nothing was queued then)."""
        if not self.on_loop:
            return self.pool.submit_async(self._timed(fn))
        if len(self._jobs) >= self.capacity:
            raise Overloaded(f"{self.pool.name} is at capacity ({self.capacity} requests waiting)")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.append((future, fn))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._run_one)
        return future

    def _timed(self, fn: Callable[[], T]) -> Callable[[], T]:
        def timed() -> T:
            started = time.thread_time()
            try:
                return fn()
            finally:
                self._record(time.thread_time() - started)

        return timed

    def _record(self, seconds: float) -> None:
        if seconds <= self.budget:
            self._proven += 1
        else:
            self._proven = 0

    def _run_one(self) -> None:
        jobs = self._jobs
        if not jobs:
            self._scheduled = False
            return
        future, fn = jobs.popleft()
        if not future.cancelled():
            self.loop_runs += 1
            started, cpu_started = time.perf_counter(), time.thread_time()
            try:
                result = fn()
            except BaseException as exc:  # the future carries it, as the pool's would
                future.set_exception(exc)
            else:
                future.set_result(result)
            cpu = time.thread_time() - cpu_started
            wall = time.perf_counter() - started
            if cpu > self.budget or wall > self.budget * WALL_FACTOR:
                self._demote()
        if jobs:
            asyncio.get_running_loop().call_soon(self._run_one)
        else:
            self._scheduled = False

    def _demote(self) -> None:
        """Back to the pool, with every job still waiting for the loop."""
        self.demotions += 1
        self._proven = 0
        self._needed = min(MAX_PROVE_RUNS, self._needed * 2)
        while self._jobs:
            future, fn = self._jobs.popleft()
            if future.cancelled():
                continue
            try:
                moved = self.pool.submit_async(self._timed(fn))
            except SandboxError as exc:
                future.set_result(self._refuse(exc))
            else:
                moved.add_done_callback(functools.partial(copy_result, target=future))
