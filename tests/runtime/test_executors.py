"""The http (WAGI) and command executors, with the real example modules."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pollen.runtime.errors import MalformedResponse, Timeout
from pollen.runtime.executors import (
    Backoff,
    CommandExecutor,
    HttpExecutor,
    JobState,
    RestartPolicy,
)
from pollen.runtime.pool import WorkerPool
from pollen.runtime.runtime import Runtime
from pollen.runtime.sandbox import MIB, Limits
from pollen.runtime.wagi import HttpRequest, HttpResponse
from tests.helpers import wait_for
from tests.runtime import modules

FAST = Limits(memory_bytes=16 * MIB, timeout_ms=5000)


@pytest.fixture(scope="module")
def shared_runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    with Runtime(cache_dir=tmp_path_factory.mktemp("cache")) as rt:
        yield rt


@pytest.fixture(scope="module")
def echo(shared_runtime: Runtime, examples: dict[str, Path]) -> HttpExecutor:
    sandbox = shared_runtime.load(examples["echo"].read_bytes(), name="echo")
    return shared_runtime.http_executor("echo", sandbox, limits=FAST)


def _json(response: HttpResponse) -> dict[str, object]:
    assert response.status == 200, response.body
    assert response.header("content-type") == "application/json"
    data = json.loads(response.body)
    assert isinstance(data, dict)
    return data


# --- http -------------------------------------------------------------------------------------


def test_hello(runtime: Runtime, examples: dict[str, Path]) -> None:
    sandbox = runtime.load(examples["hello"].read_bytes(), name="hello")
    executor = runtime.http_executor("hello", sandbox, limits=FAST)
    response = executor.invoke(HttpRequest())
    assert response.status == 200
    assert response.body == b"Hello from Pollen!\n"
    usage = executor.usage.snapshot()
    assert usage.requests == 1
    assert usage.instances == 0
    assert usage.instances_total == 1
    assert usage.errors == 0
    assert usage.memory_peak_bytes > 0


def test_env_from_the_workload(runtime: Runtime, examples: dict[str, Path]) -> None:
    from pollen.resources.models import WorkloadSpec

    spec = WorkloadSpec(artifact="hello", env={"GREETING": "Bonjour"})
    sandbox = runtime.load(examples["hello"].read_bytes(), name="hello")
    executor = runtime.http_executor("hello", sandbox, spec)
    assert executor.invoke(HttpRequest()).body == b"Bonjour!\n"


url_text = st.text(
    st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~%=&+"),
    max_size=40,
)
header_name = st.from_regex(r"X-[A-Za-z0-9]{1,12}", fullmatch=True)
header_value = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
    segments=st.lists(st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True), max_size=4),
    query=url_text,
    headers=st.dictionaries(header_name, header_value, max_size=6),
    body=st.text(max_size=300).filter(lambda s: "\x00" not in s),
)
def test_echo_sees_the_request(
    echo: HttpExecutor,
    method: str,
    segments: list[str],
    query: str,
    headers: dict[str, str],
    body: str,
) -> None:
    path = "/" + "/".join(segments)
    request = HttpRequest(
        method=method,
        path=path,
        query=query,
        headers=tuple(headers.items()),
        body=body.encode(),
    )
    data = _json(echo.invoke(request))
    assert data["method"] == method
    assert data["path"] == path
    assert data["query"] == query
    assert data["body"] == body
    assert data["bodyLength"] == len(body.encode())
    seen = data["headers"]
    assert isinstance(seen, dict)
    # Header names are case-insensitive; two spellings of one name are joined by ", ".
    expected: dict[str, list[str]] = {}
    for name, value in headers.items():
        expected.setdefault(name.lower(), []).append(value)
    assert seen == {name: ", ".join(values) for name, values in expected.items()}
    env = data["env"]
    assert isinstance(env, dict)
    assert env["CONTENT_LENGTH"] == str(len(body.encode()))
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["X_FULL_URL"].endswith(path + (f"?{query}" if query else ""))


@pytest.mark.parametrize(
    ("output", "status", "header"),
    [
        (
            b"Status: 404 Not Found\nContent-Type: text/plain\n\nno",
            404,
            ("content-type", "text/plain"),
        ),
        (b"Location: https://example.test/\n\n", 302, ("location", "https://example.test/")),
        (b"Status: 201\r\nX-Id: 7\r\n\r\ncreated", 201, ("x-id", "7")),
    ],
)
def test_status_and_location(
    runtime: Runtime, output: bytes, status: int, header: tuple[str, str]
) -> None:
    executor = runtime.http_executor("fixed", runtime.load(modules.writes(output), name="fixed"))
    response = executor.invoke(HttpRequest())
    assert response.status == status
    assert response.header(header[0]) == header[1]


def test_malformed_output_is_a_502(runtime: Runtime) -> None:
    executor = runtime.http_executor(
        "bad", runtime.load(modules.writes(b"no headers here"), name="bad")
    )
    with pytest.raises(MalformedResponse):
        executor.invoke(HttpRequest())
    response = executor.respond(HttpRequest())
    assert response.status == 502
    assert b"blank line" in response.body
    assert executor.usage.snapshot().errors_by_reason == {"MalformedResponse": 2}


def test_rogue_requests_map_to_statuses(runtime: Runtime, examples: dict[str, Path]) -> None:
    limits = Limits(memory_bytes=16 * MIB, timeout_ms=100)
    statuses = {}
    for name in ("spin", "trap", "membomb"):
        executor = runtime.http_executor(
            name, runtime.load(examples[name].read_bytes(), name=name), limits=limits
        )
        response = executor.respond(HttpRequest())
        statuses[name] = response.status
        assert response.error is not None
        assert name in response.body.decode()
    assert statuses == {"spin": 504, "trap": 500, "membomb": 500}


async def test_flood_gets_503_at_once(runtime: Runtime, examples: dict[str, Path]) -> None:
    """With one worker and two queue slots, three requests are taken and the other seven are
    refused at once: every 503 arrives before the first accepted request has even timed out."""
    sandbox = runtime.load(examples["spin"].read_bytes(), name="spin")
    executor = HttpExecutor(
        "spin",
        sandbox,
        limits=Limits(timeout_ms=300),
        pool=WorkerPool(workers=1, queue_size=2, name="spin"),
    )
    done: list[tuple[float, int]] = []

    async def one() -> None:
        response = await executor.handle(HttpRequest())
        done.append((time.monotonic(), response.status))

    try:
        await asyncio.gather(*(one() for _ in range(10)))
    finally:
        executor.close()
    statuses = [status for _, status in done]
    assert sorted(statuses) == [503] * 7 + [504] * 3
    last_refusal = max(at for at, status in done if status == 503)
    first_timeout = min(at for at, status in done if status == 504)
    assert last_refusal < first_timeout
    assert executor.usage.snapshot().errors_by_reason["Overloaded"] == 7


async def _measure(executor: HttpExecutor, count: int, clients: int) -> list[float]:
    latencies: list[float] = []

    async def client() -> None:
        for _ in range(count):
            started = time.perf_counter()
            response = await executor.handle(HttpRequest())
            latencies.append(time.perf_counter() - started)
            assert response.status == 200

    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies


def _p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1]


async def test_rogue_beside_healthy_under_load(runtime: Runtime, examples: dict[str, Path]) -> None:
    """A healthy workload keeps its latency while a rogue one spins on every core.

    The comparison is with the healthy workload alone, in the same test, same clients.
    Bound: the rogue pool is sized to the cores too, so on this 2-core machine two spinning
    instances hold both cores for their whole 300 ms timeout (with the GIL released). The
    healthy worker and the event loop then share the cores with two CPU hogs; Linux's CFS
    favours threads that wake from sleep, so the healthy workload loses part of its CPU, not
    all of it. Measured here: p50 about 1.3x and p99 about 2x of the workload alone. The
    bound allows 3x + 2 ms at p50 and 5x + 25 ms at p99 (a few scheduling periods of a
    machine shared with other jobs). Starvation (rogue instances holding the healthy one's
    workers, the GIL or the event loop) would blow far past it: each spin lasts 300 ms.
    """
    hello = runtime.http_executor(
        "hello", runtime.load(examples["hello"].read_bytes(), name="hello"), limits=FAST
    )
    spin = runtime.http_executor(
        "spin",
        runtime.load(examples["spin"].read_bytes(), name="spin"),
        limits=Limits(memory_bytes=16 * MIB, timeout_ms=300),
    )
    await _measure(hello, 50, 2)  # warm up
    alone = await _measure(hello, 300, 2)

    stop = asyncio.Event()
    rogue_answers: dict[int, int] = {}

    async def attack(executor: HttpExecutor) -> None:
        while not stop.is_set():
            response = await executor.handle(HttpRequest())
            rogue_answers[response.status] = rogue_answers.get(response.status, 0) + 1

    # Twice as many clients as the pool has workers: it never runs out of spinning work.
    attackers = [asyncio.create_task(attack(spin)) for _ in range(2 * spin.pool.workers)]
    try:
        await asyncio.to_thread(
            wait_for, lambda: spin.in_flight >= spin.pool.workers, 10.0, "spins on every worker"
        )
        beside = await _measure(hello, 300, 2)
        spinning_at_end = spin.in_flight
    finally:
        stop.set()
        await asyncio.gather(*attackers)
    assert spinning_at_end >= 1, "the rogue load stopped before the measurement ended"
    assert rogue_answers.get(504, 0) >= 1

    p50_alone, p99_alone = _p(alone, 50), _p(alone, 99)
    p50_beside, p99_beside = _p(beside, 50), _p(beside, 99)
    report = (
        f"alone p50 {p50_alone * 1e3:.2f} ms p99 {p99_alone * 1e3:.2f} ms; "
        f"beside spin p50 {p50_beside * 1e3:.2f} ms p99 {p99_beside * 1e3:.2f} ms"
    )
    print(report)
    assert p50_beside <= 3 * p50_alone + 0.002, report
    assert p99_beside <= 5 * p99_alone + 0.025, report


# --- command ----------------------------------------------------------------------------------


def _job(runtime: Runtime, examples: dict[str, Path], *args: str, **kw: object) -> CommandExecutor:
    sandbox = runtime.load(examples["cpu"].read_bytes(), name="cpu")
    return CommandExecutor("cpu", sandbox, args=args, limits=FAST, **kw)  # type: ignore[arg-type]


def test_command_exit_code_and_logs(runtime: Runtime, examples: dict[str, Path]) -> None:
    job = _job(
        runtime,
        examples,
        "--iterations",
        "200000",
        "--exit",
        "3",
        env={"REPORT_EVERY": "50000"},
    )
    result = job.run_once()
    assert result.exit_code == 3
    assert result.error is None
    assert not result.succeeded
    assert job.logs.text("stdout") == "primes below 200000: 17984"
    assert job.logs.text("stderr").splitlines() == [
        f"cpu: {n} of 200000 checked" for n in (50000, 100000, 150000)
    ]
    assert "exited with status 3" in job.logs.text("system")
    assert job.usage.snapshot().errors_by_reason == {"ExitStatus": 1}


def test_command_failure_is_typed(runtime: Runtime, examples: dict[str, Path]) -> None:
    sandbox = runtime.load(examples["spin"].read_bytes(), name="spin")
    job = CommandExecutor("spin", sandbox, limits=Limits(timeout_ms=100))
    result = job.run_once()
    assert isinstance(result.error, Timeout)
    assert result.exit_code is None
    assert "timeout" in result.describe()


def test_backoff_grows_and_caps() -> None:
    backoff = Backoff(initial=1.0, factor=2.0, maximum=5.0)
    assert [backoff.delay(n) for n in range(6)] == [0.0, 1.0, 2.0, 4.0, 5.0, 5.0]


async def test_restart_on_failure(runtime: Runtime, examples: dict[str, Path]) -> None:
    job = _job(
        runtime,
        examples,
        "--iterations",
        "10",
        "--exit",
        "1",
        restart=RestartPolicy.ON_FAILURE,
        backoff=Backoff(initial=0.01, maximum=0.05),
        max_restarts=2,
    )
    result = await job.run()
    assert result.exit_code == 1
    assert job.runs == 3
    assert job.restarts == 2
    assert job.state is JobState.FAILED
    assert job.logs.text("system").count("restarting in") == 2


async def test_success_is_not_restarted_on_failure_policy(
    runtime: Runtime, examples: dict[str, Path]
) -> None:
    job = _job(runtime, examples, "--iterations", "10", restart=RestartPolicy.ON_FAILURE)
    result = await job.run()
    assert result.succeeded
    assert job.runs == 1
    assert job.state is JobState.SUCCEEDED


async def test_always_restarts(runtime: Runtime, examples: dict[str, Path]) -> None:
    job = _job(
        runtime,
        examples,
        "--iterations",
        "10",
        restart=RestartPolicy.ALWAYS,
        backoff=Backoff(initial=0.01),
        max_restarts=3,
    )
    await job.run()
    assert job.runs == 4
    assert job.state is JobState.SUCCEEDED


async def test_stop_during_backoff(runtime: Runtime, examples: dict[str, Path]) -> None:
    job = _job(
        runtime,
        examples,
        "--iterations",
        "10",
        "--exit",
        "2",
        restart=RestartPolicy.ON_FAILURE,
        backoff=Backoff(initial=3600.0),
    )
    task = asyncio.create_task(job.run())
    await asyncio.to_thread(wait_for, lambda: job.state is JobState.BACKOFF, 20.0, "backoff")
    job.stop()
    result = await asyncio.wait_for(task, 20)
    assert result.exit_code == 2
    assert job.state is JobState.STOPPED
    assert job.runs == 1
