"""The asyncio shell around one reconciler: its work queue, its workers, its resync.

The queue (:mod:`pollen.reconcilers._queue`) decides what runs when; this module only runs it.
Each reconciler gets its own controller, workers and timeout, so that one that raises, hangs or
is slow delays nobody else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from pollen.reconcilers._context import Context
from pollen.reconcilers._contract import (
    PermanentError,
    Reconciler,
    Request,
    Result,
    TemporaryError,
)
from pollen.reconcilers._queue import Drop, Outcome, Requeue, Retry, Success, WorkQueue
from pollen.resources.models import ConditionStatus
from pollen.state.errors import StoreError

log = logging.getLogger(__name__)

#: A reconciler named ``signer-label`` reports its failures on ``signer-label/Reconciled``.
RECONCILED_CONDITION = "Reconciled"


@dataclass(frozen=True)
class ControllerSettings:
    """How each reconciler is run; the defaults are the node's."""

    #: Objects of one reconciler reconciled at the same time (never the same object twice).
    workers: int = 2
    #: Seconds one reconcile call may take before it is cancelled and retried with backoff.
    timeout: float = 30.0
    #: Seconds a cancelled call gets to finish before it is abandoned (its object stays busy).
    cancel_grace: float = 1.0
    #: Seconds between two resyncs, which reconcile every object of the kind again.
    resync_period: float = 300.0
    #: First retry delay after a failure; doubled on each further failure up to ``max_delay``.
    base_delay: float = 0.5
    max_delay: float = 300.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if not (self.timeout > 0 and self.cancel_grace >= 0 and self.resync_period > 0):
            raise ValueError("timeout and resync_period must be > 0, cancel_grace >= 0")


@dataclass(frozen=True)
class _Failure:
    reason: str
    message: str
    outcome: Outcome


class _PluginExit(Exception):
    """A reconciler raised SystemExit or KeyboardInterrupt, which would stop the event loop."""


class Controller:
    """Runs one reconciler over the objects of its kind, on the running event loop."""

    def __init__(
        self, reconciler: Reconciler, context: Context, settings: ControllerSettings
    ) -> None:
        self.reconciler = reconciler
        self.name = reconciler.name
        self.kind = reconciler.kind
        self.condition_type = f"{self.name}/{RECONCILED_CONDITION}"
        self._context = context
        self._settings = settings
        self._queue: WorkQueue[str] = WorkQueue(
            base_delay=settings.base_delay, max_delay=settings.max_delay
        )
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # Reconcile calls in flight by object name, abandoned ones (that ignored their
        # cancellation) included: their object stays busy until they really end.
        self._running: dict[str, asyncio.Task[Result]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        # The object whose failure condition this controller is writing, if any.
        self._writing_condition_of: str | None = None
        #: Reconcile calls finished, by how they ended; for tests and diagnostics.
        self.calls: dict[str, int] = {}

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Queue every existing object (the initial list) and start the workers and resync."""
        self._loop = asyncio.get_running_loop()
        for obj in self._context.list(self.kind):
            self.enqueue(obj.name)
        for index in range(self._settings.workers):
            self._tasks.append(
                self._loop.create_task(self._work(), name=f"reconciler {self.name} worker {index}")
            )
        self._tasks.append(self._loop.create_task(self._resync(), name=f"resync {self.name}"))

    async def stop(self) -> None:
        """Stop the workers and cancel the calls in flight."""
        for task in [*self._tasks, *self._running.values()]:
            task.cancel()
        pending = [*self._tasks, *self._running.values()]
        if pending:
            await asyncio.wait(pending, timeout=self._settings.cancel_grace)
        for task in list(self._running.values()):
            if not task.done():
                # It ignores cancellation, and asyncio.run would wait for it forever at exit.
                # Closing the coroutine throws GeneratorExit into it, which ends it unless it
                # catches even that; then the task ends at its next step.
                log.warning("reconciler %s: closing a call that ignores cancellation", self.name)
                with contextlib.suppress(RuntimeError):
                    task.get_coro().close()
        self._tasks.clear()

    # --- feeding ----------------------------------------------------------------------------

    def enqueue(self, name: str) -> None:
        """Reconcile ``name`` soon (call on the event loop thread)."""
        if name == self._writing_condition_of:
            # The change feed echoing our own failure condition: that is no reason to run the
            # reconciler again, and would defeat the backoff.
            return
        self._queue.add(name, self._now())
        self._wake.set()

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self._settings.resync_period)
            try:
                for obj in self._context.list(self.kind):
                    self.enqueue(obj.name)
            except StoreError as exc:  # the store closed under us: the node is stopping
                log.debug("resync of %s skipped: %s", self.name, exc)

    # --- working ----------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            name = self._queue.pop(self._now())
            if name is None:
                deadline = self._queue.next_deadline()
                # Cleared before waiting and after popping with no await between: an add made
                # since the pop sets it again, so no wake-up is lost.
                self._wake.clear()
                timeout = None if deadline is None else max(0.0, deadline - self._now())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                continue
            try:
                outcome = await self._process(name)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug of ours must not end the worker; retry the object with backoff.
                log.exception("reconciler %s: internal error on %s", self.name, name)
                outcome = Retry()
            if outcome is not None:
                self._finish(name, outcome)

    def _finish(self, name: str, outcome: Outcome) -> None:
        self._queue.done(name, self._now(), outcome)
        self._wake.set()

    async def _process(self, name: str) -> Outcome | None:
        """Run one reconcile call; None if it was abandoned and will finish on its own."""
        assert self._loop is not None
        request = Request(self.kind, name)
        task = self._loop.create_task(
            _guarded(self.reconciler, request, self._context),
            name=f"reconcile {self.name} {request}",
        )
        self._running[name] = task
        timeout = self._settings.timeout
        try:
            finished, _ = await asyncio.wait({task}, timeout=timeout)
            if not finished:
                task.cancel()
                finished, _ = await asyncio.wait({task}, timeout=self._settings.cancel_grace)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not finished:
            log.warning(
                "reconciler %s ignored the cancellation of its call on %s; abandoning it",
                self.name,
                request,
            )
            task.add_done_callback(lambda _task: self._abandoned_done(name))
            self._report_failure(
                name,
                _Failure(
                    "ReconcileTimeout",
                    f"did not finish within {timeout:g}s and ignored its cancellation",
                    Retry(),
                ),
            )
            return None
        del self._running[name]
        if task.cancelled():
            return self._report_failure(
                name, _Failure("ReconcileTimeout", f"did not finish within {timeout:g}s", Retry())
            )
        return self._judge(name, task)

    def _abandoned_done(self, name: str) -> None:
        self._running.pop(name, None)
        with contextlib.suppress(ValueError):  # the controller stopped meanwhile
            self._finish(name, Retry())

    def _judge(self, name: str, task: asyncio.Task[Result]) -> Outcome:
        exc = task.exception()
        if exc is None:
            result = task.result()
            if not isinstance(result, Result):
                return self._report_failure(
                    name,
                    _Failure(
                        "ReconcileError",
                        f"returned {type(result).__name__}, not a Result",
                        Retry(),
                    ),
                )
            self._report_success(name)
            return Success() if result.delay is None else Requeue(result.delay)
        if isinstance(exc, PermanentError):
            return self._report_failure(name, _Failure("PermanentError", str(exc), Drop()))
        if isinstance(exc, TemporaryError):
            return self._report_failure(
                name, _Failure("TemporaryError", str(exc), Retry(exc.delay))
            )
        cause = exc.__cause__ if isinstance(exc, _PluginExit) else exc
        text = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
        log.debug("reconciler %s failed on %s", self.name, name, exc_info=exc)
        return self._report_failure(name, _Failure("ReconcileError", text, Retry()))

    # --- reporting --------------------------------------------------------------------------

    def _count(self, how: str) -> None:
        self.calls[how] = self.calls.get(how, 0) + 1

    def _report_success(self, name: str) -> None:
        self._count("Success")
        obj = self._context.get(self.kind, name)
        if obj is None:
            return
        condition = obj.condition(self.condition_type)
        # Only a recovery is written: an object that never failed carries no condition of ours,
        # which keeps one write per reconciler per object out of the document's history.
        if condition is None or condition.status == ConditionStatus.TRUE:
            return
        self._write_condition(name, True, "Reconciled", f"reconciled on node {self._node}")
        self._context.record_event(
            self.kind, name, "Reconciled", f"{self.name} reconciled it after failing"
        )

    def _report_failure(self, name: str, failure: _Failure) -> Outcome:
        self._count(failure.reason)
        outcome = failure.outcome
        if isinstance(outcome, Retry):
            delay = self._queue.next_backoff(name) if outcome.delay is None else outcome.delay
            then = f"retrying in {delay:.3g}s"
        else:
            then = "not retrying until it changes"
        message = f"{_shorten(failure.message)} (on node {self._node})"
        log.warning(
            "reconciler %s failed on %s/%s: %s; %s",
            self.name,
            self.kind,
            name,
            failure.message,
            then,
        )
        try:
            self._context.record_event(
                self.kind,
                name,
                failure.reason,
                f"{self.name}: {failure.message}; {then}",
                warning=True,
            )
            obj = self._context.get(self.kind, name)
            if obj is None:
                return outcome
            current = obj.condition(self.condition_type)
            # Written on transitions only (SPEC 5): a retry that fails the same way again writes
            # nothing; the events carry every attempt.
            if (
                current is None
                or current.status != ConditionStatus.FALSE
                or current.reason != failure.reason
                or current.observed_generation != obj.metadata.generation
            ):
                self._write_condition(name, False, failure.reason, message)
        except StoreError as exc:
            log.warning("could not record the failure of %s on %s: %s", self.name, name, exc)
        return outcome

    @property
    def _node(self) -> str:
        return self._context.node_name

    def _write_condition(self, name: str, ok: bool, reason: str, message: str) -> None:
        self._writing_condition_of = name
        try:
            self._context.set_condition(
                self.kind, name, self.condition_type, ok, reason=reason, message=message
            )
        except StoreError as exc:
            log.warning(
                "could not write %s on %s/%s: %s", self.condition_type, self.kind, name, exc
            )
        finally:
            self._writing_condition_of = None


def _shorten(text: str, limit: int = 1024) -> str:
    """At most ``limit`` characters: an exception's text can be long, a condition's should not."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def _guarded(reconciler: Reconciler, request: Request, context: Context) -> Result:
    """Call the reconciler so that nothing it raises can stop the event loop.

    asyncio lets SystemExit and KeyboardInterrupt escape a task and end ``loop.run_forever``;
    a plugin calling ``sys.exit()`` must not stop the node.
    """
    try:
        return await reconciler.reconcile(request, context)
    except (SystemExit, KeyboardInterrupt) as exc:
        raise _PluginExit(type(exc).__name__) from exc
