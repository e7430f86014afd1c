"""The WebAssembly runtime: wasmtime sandbox, module cache, executors, host ABI, telemetry.

    from pollen.runtime import Runtime, HttpRequest

    with Runtime(cache_dir=Path("cache")) as runtime:
        sandbox = runtime.load(wasm_bytes, name="hello")
        executor = runtime.http_executor("hello", sandbox, workload.spec)
        response = executor.respond(HttpRequest(path="/"))

Names are imported on first use: loading wasmtime's shared library takes about 0.3 s, which
commands that never run a module (``pctl``, ``pollen init``) should not pay.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Runtime": "runtime",
    "Engine": "engine",
    "EngineConfig": "engine",
    "ModuleCache": "cache",
    "CachedModule": "cache",
    "digest_of": "cache",
    "Sandbox": "sandbox",
    "Limits": "sandbox",
    "RunResult": "sandbox",
    "HttpExecutor": "executors",
    "CommandExecutor": "executors",
    "CommandResult": "executors",
    "RestartPolicy": "executors",
    "Backoff": "executors",
    "JobState": "executors",
    "WorkerPool": "pool",
    "HttpRequest": "wagi",
    "HttpResponse": "wagi",
    "CallRouter": "abi",
    "LocalCallRouter": "abi",
    "HostContext": "abi",
    "LogBuffer": "logs",
    "LogLine": "logs",
    "InstanceLifecycle": "lifecycle",
    "WorkloadInstance": "lifecycle",
    "PhaseChange": "lifecycle",
    "IllegalTransition": "lifecycle",
    "HealthResult": "lifecycle",
    "UsageCounters": "telemetry",
    "UsageSnapshot": "telemetry",
    "NodeTelemetry": "telemetry",
    "node_telemetry": "telemetry",
    "SandboxError": "errors",
    "InvalidModule": "errors",
    "MissingExport": "errors",
    "LinkError": "errors",
    "MissingImport": "errors",
    "InstanceTrapped": "errors",
    "MemoryLimitExceeded": "errors",
    "Timeout": "errors",
    "FuelExhausted": "errors",
    "Overloaded": "errors",
    "Unavailable": "errors",
    "MalformedResponse": "errors",
    "ExitedWithError": "errors",
    "BadRequest": "errors",
    "UnknownWorkload": "errors",
    "CallDepthExceeded": "errors",
}

__all__ = [
    "Backoff",
    "BadRequest",
    "CachedModule",
    "CallDepthExceeded",
    "CallRouter",
    "CommandExecutor",
    "CommandResult",
    "Engine",
    "EngineConfig",
    "ExitedWithError",
    "FuelExhausted",
    "HealthResult",
    "HostContext",
    "HttpExecutor",
    "HttpRequest",
    "HttpResponse",
    "IllegalTransition",
    "InstanceLifecycle",
    "InstanceTrapped",
    "InvalidModule",
    "JobState",
    "Limits",
    "LinkError",
    "LocalCallRouter",
    "LogBuffer",
    "LogLine",
    "MalformedResponse",
    "MemoryLimitExceeded",
    "MissingExport",
    "MissingImport",
    "ModuleCache",
    "NodeTelemetry",
    "Overloaded",
    "PhaseChange",
    "RestartPolicy",
    "RunResult",
    "Runtime",
    "Sandbox",
    "SandboxError",
    "Timeout",
    "Unavailable",
    "UnknownWorkload",
    "UsageCounters",
    "UsageSnapshot",
    "WorkerPool",
    "WorkloadInstance",
    "digest_of",
    "node_telemetry",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pollen.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pollen.runtime.{module}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from pollen.runtime.abi import CallRouter, HostContext, LocalCallRouter
    from pollen.runtime.cache import CachedModule, ModuleCache, digest_of
    from pollen.runtime.engine import Engine, EngineConfig
    from pollen.runtime.errors import (
        BadRequest,
        CallDepthExceeded,
        ExitedWithError,
        FuelExhausted,
        InstanceTrapped,
        InvalidModule,
        LinkError,
        MalformedResponse,
        MemoryLimitExceeded,
        MissingExport,
        MissingImport,
        Overloaded,
        SandboxError,
        Timeout,
        Unavailable,
        UnknownWorkload,
    )
    from pollen.runtime.executors import (
        Backoff,
        CommandExecutor,
        CommandResult,
        HttpExecutor,
        JobState,
        RestartPolicy,
    )
    from pollen.runtime.lifecycle import (
        HealthResult,
        IllegalTransition,
        InstanceLifecycle,
        PhaseChange,
        WorkloadInstance,
    )
    from pollen.runtime.logs import LogBuffer, LogLine
    from pollen.runtime.pool import WorkerPool
    from pollen.runtime.runtime import Runtime
    from pollen.runtime.sandbox import Limits, RunResult, Sandbox
    from pollen.runtime.telemetry import (
        NodeTelemetry,
        UsageCounters,
        UsageSnapshot,
        node_telemetry,
    )
    from pollen.runtime.wagi import HttpRequest, HttpResponse
