"""The host ABI: pollen.log and pollen.call between workloads of one node."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pollen.runtime import abi
from pollen.runtime.executors import HttpExecutor
from pollen.runtime.runtime import Runtime
from pollen.runtime.sandbox import MIB, Limits
from pollen.runtime.wagi import HttpRequest
from tests.runtime import modules

LIMITS = Limits(memory_bytes=16 * MIB, timeout_ms=2000)


def _executor(runtime: Runtime, name: str, wasm: bytes, limits: Limits = LIMITS) -> HttpExecutor:
    return runtime.http_executor(name, runtime.load(wasm, name=name), limits=limits)


def _call(caller: HttpExecutor, to: str, body: bytes = b"") -> dict[str, object]:
    response = caller.invoke(HttpRequest(method="POST", query=f"to={to}", body=body))
    data = json.loads(response.body)
    assert isinstance(data, dict)
    return data


def test_caller_reaches_echo(runtime: Runtime, examples: dict[str, Path]) -> None:
    _executor(runtime, "echo", examples["echo"].read_bytes())
    caller = _executor(runtime, "caller", examples["caller"].read_bytes())
    data = _call(caller, "echo/items/7?full=1", b'{"n": 7}')
    assert data["status"] == 200
    seen = json.loads(str(data["response"]))
    assert data["result"] == len(str(data["response"]).encode())
    assert seen["method"] == "POST"
    assert seen["path"] == "/items/7"
    assert seen["query"] == "full=1"
    assert seen["body"] == '{"n": 7}'
    assert seen["headers"]["x-pollen-caller"] == "caller"
    assert seen["env"]["SCRIPT_NAME"] == "/echo"
    # pollen.log lines land in the caller's logs, with their level.
    lines = caller.logs.lines()
    assert any(line.stream == "log" and line.level == "info" for line in lines)


def test_unknown_workload(runtime: Runtime, examples: dict[str, Path]) -> None:
    caller = _executor(runtime, "caller", examples["caller"].read_bytes())
    data = _call(caller, "nobody")
    assert data["result"] == abi.ERR_NOT_FOUND
    assert any(line.level == "warn" for line in caller.logs.lines())


@pytest.mark.parametrize("target", ["trap", "spin", "membomb"])
def test_failing_callee(runtime: Runtime, examples: dict[str, Path], target: str) -> None:
    _executor(
        runtime,
        target,
        examples[target].read_bytes(),
        Limits(memory_bytes=16 * MIB, timeout_ms=100),
    )
    caller = _executor(runtime, "caller", examples["caller"].read_bytes())
    data = _call(caller, target)
    assert data["result"] == abi.ERR_FAILED
    # The callee's failure is counted where it happened.
    assert runtime.local.names() == sorted(["caller", target])


def test_invalid_name(runtime: Runtime, examples: dict[str, Path]) -> None:
    caller = _executor(runtime, "caller", examples["caller"].read_bytes())
    assert _call(caller, "Not_A_Name")["result"] == abi.ERR_INVALID


def test_call_cycles_stop_at_the_depth_limit(runtime: Runtime) -> None:
    loop = _executor(runtime, "loop", modules.call_loop("loop"))
    response = loop.invoke(HttpRequest())
    assert response.body == b"deep" + b"+" * abi.MAX_CALL_DEPTH
    assert loop.usage.snapshot().instances_total == abi.MAX_CALL_DEPTH + 1


def test_call_without_router_is_not_found(runtime: Runtime) -> None:
    sandbox = runtime.load(modules.call_loop("elsewhere"), name="lonely")
    lonely = HttpExecutor("lonely", sandbox, limits=LIMITS)  # no router at all
    try:
        assert lonely.invoke(HttpRequest()).body == b"deep"
    finally:
        lonely.close()


def test_parse_call_name() -> None:
    assert abi.parse_call_name("echo") == ("echo", "/", "")
    assert abi.parse_call_name("echo/a/b?x=1&y") == ("echo", "/a/b", "x=1&y")
    assert abi.parse_call_name("echo/") == ("echo", "/", "")
    assert abi.parse_call_name("my.app-2?q") == ("my.app-2", "/", "q")
    for bad in ("", "/echo", "Echo", "e_x", "-x", "a" * 254):
        assert abi.parse_call_name(bad) is None


def test_host_context_stack() -> None:
    assert abi.current() is None
    outer = abi.HostContext(workload="outer")
    inner = abi.HostContext(workload="inner", depth=1)
    with abi.active(outer):
        assert abi.current() is outer
        with abi.active(inner):
            assert abi.current() is inner
        assert abi.current() is outer
    assert abi.current() is None
