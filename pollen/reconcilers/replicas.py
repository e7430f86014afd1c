"""The built-in runtime reconciler: runs this node's Replicas, and stops what is no longer one.

For each Replica this node holds (``spec.node`` is this node), it makes sure an instance runs:
the artifact is fetched if this node lacks it (digest verified by the fetcher), compiled (from
the module cache when warm), started; the Replica's ``status.phase`` and ``Ready`` condition
follow the instance. The swarm's TrustPolicy must allow the artifact first (ADR 0016): what it
refuses does not run, and its Replica is Failed with the refusal's reason. An instance whose
Replica is gone, marked for deletion, or now held elsewhere is drained and stopped. Instance
phase changes come back through :class:`~pollen.runtime.host.InstanceHost`'s callback, so a
crash is seen at once.

Phases are written to the document only when they change: a handful of writes per replica
lifetime, as SPEC section 5 wants of what goes there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from pollen.reconcilers import Context, Request, Result, TemporaryError
from pollen.resources.models import (
    TRUST_POLICY_NAME,
    Artifact,
    ConditionStatus,
    Replica,
    ReplicaPhase,
    TrustPolicy,
    Workload,
)
from pollen.resources.signing import Verdict, evaluate
from pollen.runtime.executors import CommandExecutor
from pollen.runtime.host import HostedInstance, InstanceHost
from pollen.state.errors import NotFound

#: How often a running command job's last run is looked at (restarts change no phase).
JOB_CHECK_SECONDS = 2.0

__all__ = ["EnsureArtifact", "HasArtifact", "ReplicaRunner"]


HasArtifact = Callable[[str], bool]
"""Whether this node's store holds a digest."""
EnsureArtifact = Callable[[str], Awaitable[Path]]
"""The local path of a digest's bytes, fetched from a holder first when needed."""


class ReplicaRunner:
    """Runs the Replicas this node holds (built in, enabled on every node)."""

    name = "runtime"
    kind = "Replica"

    def __init__(self, host: InstanceHost, *, has: HasArtifact, ensure: EnsureArtifact) -> None:
        self._host = host
        self._has = has
        self._ensure = ensure

    async def reconcile(self, request: Request, context: Context) -> Result:
        try:
            return await self._reconcile(request, context)
        except NotFound as exc:
            if exc.kind != "Replica":
                raise
            # Withdrawn while it was starting: nothing to report on, only an instance to stop.
            await self._host.stop(request.name)
            return Result.done()

    async def _reconcile(self, request: Request, context: Context) -> Result:
        replica = context.get("Replica", request.name)
        hosted = self._host.get(request.name)
        if (
            not isinstance(replica, Replica)
            or replica.spec.node != context.node_name
            or replica.metadata.deletion_timestamp is not None
        ):
            if hosted is not None:
                await self._host.stop(request.name)
                context.record_event("Replica", request.name, "Stopped", "instance drained")
            return Result.done()
        workload = context.get("Workload", replica.spec.workload)
        if not isinstance(workload, Workload):
            return Result.done()  # placement withdraws a Replica whose Workload is gone
        if hosted is not None and (
            hosted.digest != replica.spec.artifact or hosted.revision != replica.spec.revision
        ):
            # Claims are per revision, so this is a Replica name reused: start afresh.
            await self._host.stop(request.name)
            hosted = None
        verdict = _trust(replica, context)
        if not verdict.allowed:
            # Checked on every pass, not only before a start: a policy that stops trusting a
            # publisher stops what runs of theirs too.
            if hosted is not None:
                await self._host.stop(request.name)
            _refuse(replica, workload, verdict, context)
            return Result.done()  # the node enqueues its Replicas when the policy changes
        if hosted is None:
            hosted = await self._start(replica, workload, context)
        self._report(replica, hosted, context)
        if isinstance(hosted.instance.executor, CommandExecutor) and hosted.phase is (
            ReplicaPhase.READY
        ):
            # A job's runs end and restart without a phase change: look again now and then.
            return Result.requeue_after(JOB_CHECK_SECONDS)
        return Result.done()

    async def _start(
        self, replica: Replica, workload: Workload, context: Context
    ) -> HostedInstance:
        digest = replica.spec.artifact
        if not digest:
            raise TemporaryError(f"replica {replica.name} names no artifact yet")
        hosted = self._host.create(
            replica.name,
            workload.name,
            replica.spec.workload_generation,
            replica.spec.revision,
            digest,
            workload.spec,
        )
        try:
            if not self._has(digest):
                hosted.instance.fetching()
                self._report(replica, hosted, context)
            path = await self._ensure(digest)
            wasm = await asyncio.to_thread(path.read_bytes)
        except Exception as exc:
            await self._host.stop(replica.name)
            context.update_status(
                "Replica",
                replica.name,
                {"phase": ReplicaPhase.PENDING.value, "node": context.node_name,
                 "message": f"cannot get artifact {digest}: {exc}"},
            )  # fmt: skip
            raise TemporaryError(f"cannot get artifact {digest}: {exc}") from exc
        await hosted.instance.start(wasm, digest=digest)
        context.record_event(
            "Replica",
            replica.name,
            "Started" if hosted.phase is ReplicaPhase.READY else "StartFailed",
            f"instance of {workload.name} on {context.node_name} is {hosted.phase}",
            warning=hosted.phase is not ReplicaPhase.READY,
        )
        return hosted

    def _report(self, replica: Replica, hosted: HostedInstance, context: Context) -> None:
        """Write the instance's phase, and the Ready condition, when they changed."""
        phase, reason, message = _observed(hosted)
        context.update_status(
            "Replica",
            replica.name,
            {"phase": phase.value, "node": context.node_name, "message": message},
        )
        ready = phase is ReplicaPhase.READY
        context.set_condition(
            "Replica",
            replica.name,
            "Ready",
            ConditionStatus.TRUE if ready else ConditionStatus.FALSE,
            reason=reason,
            message=message,
        )


def _trust(replica: Replica, context: Context) -> Verdict:
    """What this node's trust policy says of the Replica's bytes, judged from this node's own
    document: signatures are verified here again, whatever the applying node checked."""
    digest = replica.spec.artifact
    if not digest:
        return Verdict(True, "NoArtifact", "")  # nothing to judge yet; _start waits for it
    policy = context.get("TrustPolicy", TRUST_POLICY_NAME)
    artifacts = [a for a in context.list("Artifact") if isinstance(a, Artifact)]
    return evaluate(digest, artifacts, policy.spec if isinstance(policy, TrustPolicy) else None)


def _refuse(replica: Replica, workload: Workload, verdict: Verdict, context: Context) -> None:
    """Report a Replica the trust policy refuses: Failed, ``Ready=False`` with the verdict's
    reason, and one Warning event when that reason is new."""
    before = replica.condition("Ready")
    context.update_status(
        "Replica",
        replica.name,
        {"phase": ReplicaPhase.FAILED.value, "node": context.node_name, "message": verdict.message},
    )
    context.set_condition(
        "Replica",
        replica.name,
        "Ready",
        ConditionStatus.FALSE,
        reason=verdict.reason,
        message=verdict.message,
    )
    if before is None or before.reason != verdict.reason:
        context.record_event(
            "Replica",
            replica.name,
            verdict.reason,
            f"not running {workload.name} on {context.node_name}: {verdict.message}",
            warning=True,
        )


def _observed(hosted: HostedInstance) -> tuple[ReplicaPhase, str, str]:
    """The phase, reason and message to report for ``hosted``.

    A command job whose last run failed and that is being restarted is reported Failed with
    that run's reason (Kubernetes shows such a pod as CrashLoopBackOff), not as the Ready its
    lifecycle keeps while the job exists. The message names how the run ended, not when or how
    often, so that a crash loop writes the document once, not once per restart.
    """
    current = hosted.instance.lifecycle.current
    executor = hosted.instance.executor
    if (
        hosted.phase is ReplicaPhase.READY
        and isinstance(executor, CommandExecutor)
        and executor.last_result is not None
        and not executor.last_result.succeeded
    ):
        last = executor.last_result
        reason = last.error.reason if last.error is not None else "ExitStatus"
        how = str(last.error) if last.error is not None else f"exited with status {last.exit_code}"
        return ReplicaPhase.FAILED, reason, f"{how}; restarting with backoff"
    return hosted.phase, current.reason or str(hosted.phase), current.message
