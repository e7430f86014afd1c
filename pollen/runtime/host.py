"""The instances one node runs, by Replica name: the one place that knows what runs here.

The replica reconciler starts and stops instances through it; the gateway asks it for a Ready
instance of a workload; telemetry and ``pctl logs`` read their usage and logs from it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from pollen.resources.models import ReplicaPhase, WorkloadSpec
from pollen.runtime.executors import HttpExecutor
from pollen.runtime.lifecycle import PhaseChange, WorkloadInstance
from pollen.runtime.runtime import Runtime

__all__ = ["HostedInstance", "InstanceHost"]

log = logging.getLogger(__name__)


@dataclass
class HostedInstance:
    """One running replica: its instance, and what it runs."""

    replica: str
    workload: str
    generation: int
    """The Workload's generation when the replica was claimed: newer serves first."""
    revision: str
    digest: str
    instance: WorkloadInstance

    @property
    def phase(self) -> ReplicaPhase:
        return self.instance.phase


class InstanceHost:
    """Instances of this node, keyed by Replica name.

    ``on_change(replica)`` is called (on the event loop) whenever an instance changes phase, so
    that its Replica is reconciled again: an instance that exits or fails is seen at once, not at
    the next resync.
    """

    def __init__(self, runtime: Runtime, on_change: Callable[[str], None]) -> None:
        self.runtime = runtime
        self._on_change = on_change
        self._hosted: dict[str, HostedInstance] = {}
        self._listeners: list[Callable[[str], None]] = []
        self._failures = 0
        self._started = 0

    def get(self, replica: str) -> HostedInstance | None:
        return self._hosted.get(replica)

    def subscribe(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Also call ``listener(replica)`` on every phase change (on the event loop), as
        ``pctl logs -f`` needs to end when the instances it follows stop; returns the function
        that stops it."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def replicas(self) -> list[HostedInstance]:
        """Every hosted instance, by replica name."""
        return [self._hosted[name] for name in sorted(self._hosted)]

    def ready(self, workload: str) -> list[HostedInstance]:
        """The Ready instances of ``workload``, newest generation first."""
        ready = [
            h
            for h in self._hosted.values()
            if h.workload == workload and h.phase is ReplicaPhase.READY
        ]
        return sorted(ready, key=lambda h: (-h.generation, h.replica))

    def create(
        self,
        replica: str,
        workload: str,
        generation: int,
        revision: str,
        digest: str,
        spec: WorkloadSpec,
    ) -> HostedInstance:
        """A new instance slot for ``replica`` (not started yet: ``instance.start(wasm)``)."""
        if replica in self._hosted:
            raise ValueError(f"replica {replica} already has an instance")

        def changed(change: PhaseChange) -> None:
            if change.phase is ReplicaPhase.FAILED:
                self._failures += 1
            elif change.phase is ReplicaPhase.READY:
                self._started += 1
            self._on_change(replica)
            for listener in list(self._listeners):
                listener(replica)

        # Named after the workload: ``pollen.call`` reaches workloads by name.
        instance = WorkloadInstance(self.runtime, workload, spec, on_change=changed)
        hosted = HostedInstance(replica, workload, generation, revision, digest, instance)
        self._hosted[replica] = hosted
        return hosted

    async def stop(self, replica: str, grace: float | None = None) -> bool:
        """Drain and stop ``replica``'s instance, if there is one; whether there was."""
        hosted = self._hosted.pop(replica, None)
        if hosted is None:
            return False
        try:
            await hosted.instance.stop(grace)
        except Exception:
            log.exception("stopping the instance of replica %s failed", replica)
        # Another instance of the same workload keeps ``pollen.call`` working.
        for other in self.ready(hosted.workload):
            executor = other.instance.executor
            if isinstance(executor, HttpExecutor):
                self.runtime.local.register(hosted.workload, executor)
                break
        return True

    @property
    def starting(self) -> int:
        """Instances not serving yet (fetching their artifact or starting): work queued here."""
        waiting = (ReplicaPhase.PENDING, ReplicaPhase.FETCHING, ReplicaPhase.STARTING)
        return sum(1 for h in self._hosted.values() if h.phase in waiting)

    @property
    def reliability(self) -> float:
        """How instances fared here: 1.0 with no failure, falling with each failure."""
        return (self._started + 1) / (self._started + self._failures + 1)

    @property
    def memory_mb(self) -> int:
        """What the hosted instances may use, by their requests."""
        return sum(h.instance.spec.resources.memory_mb for h in self._hosted.values())

    async def close(self) -> None:
        """Stop every instance."""
        await asyncio.gather(*(self.stop(name, grace=1.0) for name in list(self._hosted)))
