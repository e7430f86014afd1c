"""``pollen run``: one module, the same sandbox, no cluster; and a clean interpreter exit."""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from pollen.cli.localnode import tool

POLLEN = tool("pollen")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, POLLEN_CACHE_DIR=str(tmp_path / "cache"))


def _read_until(proc: subprocess.Popen[bytes], pattern: str, timeout: float = 60.0) -> str:
    """Read the process's stderr until a line matches ``pattern``; fail at the deadline."""
    assert proc.stderr is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stderr, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    seen = b""
    while time.monotonic() < deadline:
        if selector.select(timeout=0.1):
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
            match = re.search(pattern, seen.decode(errors="replace"))
            if match:
                return match.group(1)
    raise AssertionError(f"no line matching {pattern!r} in: {seen.decode(errors='replace')}")


@pytest.fixture
def served(
    examples: dict[str, Path], env: dict[str, str], request: pytest.FixtureRequest
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    name = getattr(request, "param", "hello")
    proc = subprocess.Popen(
        # One worker: this process serves (tests/runtime/test_workers.py covers several).
        [
            POLLEN,
            "run",
            str(examples[name]),
            "--port",
            "0",
            "--workers",
            "1",
            "-e",
            "GREETING=Howdy",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=env,
    )
    try:
        port = _read_until(proc, r"at http://127\.0\.0\.1:(\d+)/")
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_serves_hello_to_a_real_client(served: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, proc = served
    assert psutil.Process(proc.pid).children() == []  # --workers 1: no worker processes
    with urllib.request.urlopen(f"{url}/any/path?x=1", timeout=30) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert response.read() == b"Howdy!\n"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert b"panicked" not in stderr


@pytest.mark.parametrize("served", ["echo"], indirect=True)
def test_serves_echo(served: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, _ = served
    request = urllib.request.Request(
        f"{url}/items/%7E7?q=a%20b",
        data=b"the body",
        method="PUT",
        headers={"X-Custom": "yes", "Content-Type": "text/plain"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        data = json.loads(response.read())
    assert data["method"] == "PUT"
    assert data["path"] == "/items/~7"
    assert data["query"] == "q=a%20b"
    assert data["body"] == "the body"
    assert data["headers"]["x-custom"] == "yes"
    assert data["env"]["CONTENT_TYPE"] == "text/plain"
    assert data["env"]["GREETING"] == "Howdy"
    assert data["env"]["X_FULL_URL"].endswith("/items/%7E7?q=a%20b")


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [POLLEN, "run", *args], capture_output=True, env=env, timeout=120, check=False
    )


def test_command_exit_code_and_output(examples: dict[str, Path], env: dict[str, str]) -> None:
    result = _run(
        str(examples["cpu"]),
        "--executor",
        "command",
        "-e",
        "REPORT_EVERY=400",
        "--",
        "--iterations",
        "1000",
        "--exit",
        "7",
        env=env,
    )
    assert result.returncode == 7
    assert result.stdout == b"primes below 1000: 168\n"
    assert b"cpu: 800 of 1000 checked" in result.stderr


@pytest.mark.parametrize(
    ("name", "extra", "code", "words"),
    [
        ("spin", ["--timeout-ms", "100"], 124, "100 ms timeout"),
        ("trap", [], 134, "unreachable"),
        ("membomb", ["--memory-mb", "16"], 137, "out of memory"),
        ("missing-import", [], 2, "env.launch_missiles"),
    ],
)
def test_command_failures(
    examples: dict[str, Path],
    env: dict[str, str],
    name: str,
    extra: list[str],
    code: int,
    words: str,
) -> None:
    result = _run(str(examples[name]), "--executor", "command", *extra, env=env)
    assert result.returncode == code
    lines = result.stderr.decode().strip().splitlines()
    assert lines[-1].startswith("error: ")
    assert words in lines[-1]
    assert b"panicked" not in result.stderr


def test_not_a_module(tmp_path: Path, env: dict[str, str]) -> None:
    junk = tmp_path / "junk.wasm"
    junk.write_bytes(b"#!/bin/sh\necho not wasm\n")
    result = _run(str(junk), env=env)
    assert result.returncode == 2
    assert b"not a WebAssembly binary" in result.stderr


def test_bad_env_option(examples: dict[str, Path], env: dict[str, str]) -> None:
    result = _run(str(examples["hello"]), "-e", "1BAD=x", env=env)
    assert result.returncode != 0
    assert b"1BAD" in result.stderr


SHUTDOWN_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from pollen.runtime import Runtime, HttpRequest, CommandExecutor, Limits

    examples = Path(sys.argv[1])
    runtime = Runtime()
    echo = runtime.http_executor("echo", runtime.load_file(examples / "echo.wasm"))
    trap = runtime.http_executor("trap", runtime.load_file(examples / "trap.wasm"))
    spin = runtime.http_executor(
        "spin", runtime.load_file(examples / "spin.wasm"), limits=Limits(timeout_ms=50)
    )
    for i in range(30):
        assert echo.respond(HttpRequest(method="POST", body=b"x" * i)).status == 200
    assert trap.respond(HttpRequest()).status == 500
    assert spin.respond(HttpRequest()).status == 504
    job = CommandExecutor("cpu", runtime.load_file(examples / "cpu.wasm"), stdout=lambda b: None)
    assert job.run_once().exit_code == 0
    if sys.argv[2] == "close":
        runtime.close()
    print("done", flush=True)
    """
)


@pytest.mark.parametrize("how", ["close", "atexit"])
def test_interpreter_exits_without_a_panic(
    examples: dict[str, Path], tmp_path: Path, how: str
) -> None:
    """wasmtime releases stdout/stderr callbacks from its own threads after a store closes;
    released during interpreter shutdown, they panic in Rust. Without the wait in
    ``Runtime.close`` and at exit this failed in most runs, so a few runs each are enough."""
    script = tmp_path / "shutdown.py"
    script.write_text(SHUTDOWN_SCRIPT)
    folder = examples["echo"].parent
    for _ in range(3):
        result = subprocess.run(
            [sys.executable, str(script), str(folder), how],
            capture_output=True,
            timeout=120,
            check=False,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout == b"done\n"
        assert b"panic" not in result.stderr, result.stderr.decode()
