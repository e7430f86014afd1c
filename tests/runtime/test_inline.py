"""Running a fast module on the event loop's thread, and falling back to the pool (ADR 0018).

The runner's rules are checked with plain callables as jobs (what ran where, in what order),
then with real modules behind the real HTTP front end: hello promoted to the loop, and a
caller that turns slow (it calls a spinning workload) sent back to the pool.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pollen.runtime.errors import Overloaded, SandboxError
from pollen.runtime.executors import HttpExecutor
from pollen.runtime.inline import InlineRunner
from pollen.runtime.pool import WorkerPool
from pollen.runtime.runtime import Runtime
from pollen.runtime.sandbox import MIB, Limits
from tests.helpers import wait_for
from tests.runtime.test_httpserver import Reader, Served, _get

BUDGET = 0.02


def _refused(error: SandboxError) -> str:
    return f"refused: {error.reason}"


def _busy(seconds: float) -> None:
    """Use ``seconds`` of CPU, as a slow module does."""
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        pass


@pytest.fixture
def pool() -> Iterator[WorkerPool]:
    workers = WorkerPool(2, 8, name="test-inline")
    yield workers
    workers.close()


def _runner(pool: WorkerPool, *, capacity: int = 8, prove_runs: int = 3) -> InlineRunner[str]:
    return InlineRunner(pool, _refused, capacity=capacity, budget=BUDGET, prove_runs=prove_runs)


def _where(label: str) -> str:
    return f"{label}@{threading.get_ident()}"


async def test_jobs_run_on_the_pool_until_proven_fast_then_on_the_loop(pool: WorkerPool) -> None:
    runner = _runner(pool, prove_runs=3)
    loop_thread = threading.get_ident()
    places = []
    for k in range(6):
        result = await runner.submit(lambda k=k: _where(str(k)))  # type: ignore[misc]
        places.append(int(result.split("@")[1]) == loop_thread)
    assert places == [False, False, False, True, True, True]
    assert runner.on_loop
    assert runner.loop_runs == 3


async def test_a_slow_run_in_the_pool_restarts_the_proof(pool: WorkerPool) -> None:
    runner = _runner(pool, prove_runs=3)
    await runner.submit(lambda: "fast")
    await runner.submit(lambda: "fast")
    await runner.submit(lambda: _busy(BUDGET * 2) or "slow")
    assert not runner.on_loop
    for _ in range(3):
        await runner.submit(lambda: "fast")
    assert runner.on_loop


async def test_a_slow_run_on_the_loop_moves_it_and_the_waiting_jobs_to_the_pool(
    pool: WorkerPool,
) -> None:
    runner = _runner(pool, prove_runs=2)
    for _ in range(2):
        await runner.submit(lambda: "fast")
    assert runner.on_loop
    await runner.submit(lambda: _busy(BUDGET * 2) or "slow")  # alone: nothing waits
    assert runner.demotions == 1
    for k in range(3):
        assert not runner.on_loop, f"promoted again after {k} runs"
        await runner.submit(lambda: "fast")
    await runner.submit(lambda: "fast")
    assert runner.on_loop  # after four: twice the first proof
    loop_thread = threading.get_ident()
    # Queued together: the slow one runs first on the loop, the others wait behind it.
    slow = runner.submit(lambda: _busy(BUDGET * 2) or _where("slow"))
    waiting = [runner.submit(lambda k=k: _where(str(k))) for k in range(3)]  # type: ignore[misc]
    assert int((await slow).split("@")[1]) == loop_thread
    moved = await asyncio.gather(*waiting)
    assert [m.split("@")[0] for m in moved] == ["0", "1", "2"]
    assert all(int(m.split("@")[1]) != loop_thread for m in moved)
    assert runner.demotions == 2
    assert not runner.on_loop
    # The next promotion asks for eight; the three moved jobs were fast and count.
    for _ in range(5):
        assert not runner.on_loop
        await runner.submit(lambda: "fast")
    assert runner.on_loop


async def test_a_full_queue_on_the_loop_is_refused_at_once(pool: WorkerPool) -> None:
    runner = _runner(pool, capacity=2, prove_runs=1)
    await runner.submit(lambda: "fast")
    assert runner.on_loop
    first = runner.submit(lambda: "a")
    second = runner.submit(lambda: "b")
    with pytest.raises(Overloaded):
        runner.submit(lambda: "c")
    assert await asyncio.gather(first, second) == ["a", "b"]
    assert await runner.submit(lambda: "d") == "d"  # room again once the loop ran them


async def test_jobs_moved_to_a_full_pool_get_the_refusal() -> None:
    with_no_queue = WorkerPool(1, 0, name="tiny")
    try:
        runner = _runner(with_no_queue, prove_runs=1)
        await runner.submit(lambda: "fast")
        release = threading.Event()
        slow = runner.submit(lambda: _busy(BUDGET * 2) or "slow")
        # The first moved job takes the pool's one worker; the second finds it full.
        holds = runner.submit(lambda: release.wait(30) and "held")
        refused = runner.submit(lambda: "never runs")
        assert await slow == "slow"
        assert await refused == "refused: Overloaded"
        release.set()
        assert await holds == "held"
    finally:
        with_no_queue.close()


async def test_an_exception_in_a_job_reaches_its_future(pool: WorkerPool) -> None:
    runner = _runner(pool, prove_runs=1)
    await runner.submit(lambda: "fast")

    def fails() -> str:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await runner.submit(fails)
    assert await runner.submit(lambda: "after") == "after"


@settings(max_examples=25, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=12))
def test_every_job_runs_once_and_gets_its_own_result(slow: list[bool]) -> None:
    """Whatever mix of fast and slow jobs, promoted or demoted on the way: each future ends
    with its own job's result, and each job ran exactly once."""
    workers = WorkerPool(2, 32, name="prop")
    ran: list[int] = []

    def job(k: int) -> int:
        ran.append(k)
        if slow[k]:
            _busy(0.004)
        return k

    async def main() -> list[object]:
        runner = InlineRunner(workers, _refused, capacity=32, budget=0.002, prove_runs=1)
        futures = [runner.submit(lambda k=k: job(k)) for k in range(len(slow))]  # type: ignore[misc]
        return await asyncio.gather(*futures)

    try:
        assert asyncio.run(main()) == list(range(len(slow)))
        assert sorted(ran) == list(range(len(slow)))
    finally:
        workers.close()


# --- real modules behind the HTTP front end ------------------------------------------------


def _serve(executor: HttpExecutor) -> Served:
    return Served(executor.dispatch)


def test_hello_is_promoted_to_the_loop_and_keeps_answering(
    runtime: Runtime, examples: dict[str, Path]
) -> None:
    hello = runtime.http_executor(
        "hello", runtime.load_file(examples["hello"], name="hello"), inline=True
    )
    assert hello.inline is not None
    served = _serve(hello)
    try:
        with served.connect() as sock:
            reader = Reader(sock)

            def answered_on_the_loop() -> bool:
                sock.sendall(_get())
                status, _, body = reader.response()
                assert (status, body) == (200, b"Hello from Pollen!\n")
                return hello.inline is not None and hello.inline.loop_runs >= 20

            wait_for(answered_on_the_loop, what="hello to be served on the loop")
    finally:
        served.close()


def test_a_caller_that_turns_slow_goes_back_to_the_pool(
    runtime: Runtime, examples: dict[str, Path]
) -> None:
    runtime.http_executor(
        "hello", runtime.load_file(examples["hello"], name="hello"), limits=Limits()
    )
    runtime.http_executor(
        "spin",
        runtime.load_file(examples["spin"], name="spin"),
        limits=Limits(memory_bytes=16 * MIB, timeout_ms=300),
    )
    caller = runtime.http_executor(
        "caller", runtime.load_file(examples["caller"], name="caller"), inline=True
    )
    assert caller.inline is not None
    served = _serve(caller)
    try:
        with served.connect() as sock:
            reader = Reader(sock)

            def promoted() -> bool:
                sock.sendall(_get("/?to=hello"))
                assert json.loads(reader.response()[2])["status"] == 200
                return caller.inline is not None and caller.inline.on_loop

            wait_for(promoted, what="the caller to be promoted to the loop")
            # On the loop now; the callee spins until its 300 ms timeout.
            sock.sendall(_get("/?to=spin"))
            answer = json.loads(reader.response()[2])
            assert answer["to"] == "spin" and answer["result"] < 0
            assert caller.inline.demotions >= 1
            assert not caller.inline.on_loop
            sock.sendall(_get("/?to=hello"))
            assert json.loads(reader.response()[2])["status"] == 200
    finally:
        served.close()
