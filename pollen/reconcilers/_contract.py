"""What a reconciler is: the request it gets, the result it returns, the errors it raises."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pollen.reconcilers._context import Context

__all__ = ["PermanentError", "Reconciler", "Request", "Result", "TemporaryError"]


@dataclass(frozen=True, order=True)
class Request:
    """Which object to reconcile. Only the key: read the object itself with
    :meth:`Context.get`, because by the time the reconciler runs it may have changed again or
    be gone (then ``get`` returns None)."""

    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclass(frozen=True)
class Result:
    """What a reconcile call achieved: done, or done for now and to be looked at again.

    Build one with :meth:`done` or :meth:`requeue_after`.
    """

    #: Seconds after which to reconcile the same object again, or None: only on its next change.
    delay: float | None = None

    @classmethod
    def done(cls) -> Result:
        """The object is as it should be; reconcile it again when it changes."""
        return cls()

    @classmethod
    def requeue_after(cls, seconds: float) -> Result:
        """Reconcile the object again after ``seconds`` (for polling, or time-based work),
        or earlier if it changes. Not counted as a failure."""
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"requeue_after needs a finite number of seconds >= 0, not {seconds}")
        return cls(delay=float(seconds))


class TemporaryError(Exception):
    """A failure that may go away: the object is reconciled again after ``delay`` seconds, or,
    without one, after the per-object exponential backoff.

    Any other exception a reconciler raises is treated the same way, with the backoff.
    """

    def __init__(self, message: str, *, delay: float | None = None) -> None:
        """``message`` says what went wrong, in one sentence; it ends up in a condition."""
        super().__init__(message)
        if delay is not None and (not math.isfinite(delay) or delay < 0):
            raise ValueError(f"delay must be a finite number of seconds >= 0, not {delay}")
        self.delay = delay


class PermanentError(Exception):
    """A failure that retrying will not fix (an invalid spec, say): the object is not retried
    until it changes, or the periodic resync looks at it again."""

    def __init__(self, message: str) -> None:
        """``message`` says what is wrong and, ideally, how to fix it; it ends up in a
        condition."""
        super().__init__(message)


@runtime_checkable
class Reconciler(Protocol):
    """A control loop for one kind: handed the key of an object, it makes the world match the
    object's spec and reports what it saw in the object's status.

    Reconcilers are level-triggered: they may be called any number of times for the same
    object, for a change, a retry or the periodic resync, and must give the same result for the
    same state (idempotent). They never learn what changed, only which object to look at.
    """

    @property
    def name(self) -> str:
        """A short lowercase name (a DNS label such as ``signer-label``): it names the logger,
        the events, and the condition ``<name>/Reconciled`` that reports failures."""
        ...

    @property
    def kind(self) -> str:
        """The kind watched: ``Workload``, ``Replica``, ``Artifact`` or ``Node``."""
        ...

    async def reconcile(self, request: Request, context: Context) -> Result:
        """Bring ``request``'s object to its desired state.

        Return :meth:`Result.done` or :meth:`Result.requeue_after`; raise
        :class:`TemporaryError` (or any exception) to be retried with backoff, or
        :class:`PermanentError` not to be retried. Must be a coroutine that awaits rather than
        blocks: a call that overruns the node's timeout is cancelled and retried.
        """
        ...
