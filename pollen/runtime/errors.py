"""Typed failures of the runtime, each with a one-sentence message and a condition reason.

Every way a workload can fail (a module that is not WebAssembly, an import we do not provide,
a trap, a memory bomb, an endless loop, a flood of requests) ends as one of these. The node
turns ``reason`` and ``str(error)`` into a condition on the Replica; the HTTP side turns
``http_status`` into the answer a client sees. None of them means the node itself is unwell.
"""

from __future__ import annotations

from typing import ClassVar


class SandboxError(Exception):
    """A workload failed, and the failure was contained to its own instance."""

    #: CamelCase word for a Replica condition's ``reason``.
    reason: ClassVar[str] = "SandboxError"
    #: The HTTP status a client gets when a request ends with this error.
    http_status: ClassVar[int] = 500

    def __init__(self, message: str, *, workload: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.workload = workload
        #: What the failed instance had used, when it got as far as running.
        self.memory_bytes = 0
        self.cpu_seconds = 0.0


class InvalidModule(SandboxError):
    """The bytes are not a WebAssembly module this runtime can compile."""

    reason = "InvalidModule"


class MissingExport(InvalidModule):
    """The module compiles but lacks an export the executor needs (``_start``, ``memory``)."""

    reason = "MissingExport"


class LinkError(SandboxError):
    """The module's imports cannot be satisfied as declared."""

    reason = "LinkError"


class MissingImport(LinkError):
    """The module imports something that the sandbox does not provide."""

    reason = "MissingImport"

    def __init__(self, message: str, *, missing: tuple[str, ...] = (), workload: str = "") -> None:
        super().__init__(message, workload=workload)
        self.missing = missing


class InstanceTrapped(SandboxError):
    """The instance hit a WebAssembly trap (``unreachable``, out-of-bounds access, ...)."""

    reason = "Trapped"

    def __init__(self, message: str, *, trap_code: str | None = None, workload: str = "") -> None:
        super().__init__(message, workload=workload)
        self.trap_code = trap_code


class MemoryLimitExceeded(SandboxError):
    """The instance needed more linear memory than its ``memoryMB`` allows."""

    reason = "MemoryLimitExceeded"

    def __init__(self, message: str, *, limit: int = 0, used: int = 0, workload: str = "") -> None:
        super().__init__(message, workload=workload)
        self.limit = limit
        self.used = used


class Timeout(SandboxError):
    """The invocation ran past its wall-clock ``timeoutMs`` and was interrupted."""

    reason = "Timeout"
    http_status = 504


class FuelExhausted(SandboxError):
    """The instance used up the fuel (instruction budget) it was given."""

    reason = "FuelExhausted"
    http_status = 504


class ExitedWithError(SandboxError):
    """An ``http`` workload exited with a non-zero status before writing a whole response."""

    reason = "ExitedWithError"

    def __init__(self, message: str, *, exit_code: int, workload: str = "") -> None:
        super().__init__(message, workload=workload)
        self.exit_code = exit_code


class MalformedResponse(SandboxError):
    """An ``http`` workload wrote something that is not a WAGI response."""

    reason = "MalformedResponse"
    http_status = 502


class BadRequest(SandboxError):
    """A request that cannot be handed to a workload as WAGI environment variables."""

    reason = "BadRequest"
    http_status = 400


class Unavailable(SandboxError):
    """The workload cannot take a request now (not ready, draining or stopped)."""

    reason = "Unavailable"
    http_status = 503


class Overloaded(Unavailable):
    """The workload's queue is full: the request is refused at once rather than kept waiting."""

    reason = "Overloaded"


class UnknownWorkload(SandboxError):
    """A ``pollen.call`` named a workload that no router can reach."""

    reason = "UnknownWorkload"
    http_status = 404


class CallDepthExceeded(SandboxError):
    """Nested ``pollen.call`` went deeper than the runtime allows (a call cycle, usually)."""

    reason = "CallDepthExceeded"
    http_status = 508
