"""The built-in eviction reconciler: under memory pressure, a node sheds replicas, lowest
priority first, and says so.

Like the kubelet's hard eviction threshold (``memory.available<100Mi``): this node's Node gets a
``MemoryPressure`` condition, True while the memory available on the machine is below the
reserve, False once it is back above the reserve plus a margin (so that it does not flap around
the threshold). While it is True, placement treats the node as unschedulable, and this
reconciler withdraws one of the node's own Replicas per check: the lowest ``priority``
first, then the lowest score, then by name. Each eviction is a Warning event on the Replica and
on its Workload; placement claims a replacement elsewhere.

It reconciles only this node's own Node, and asks to be called again every ``interval`` seconds:
memory is polled, not pushed.
"""

from __future__ import annotations

from collections.abc import Callable

from pollen.reconcilers import Context, Request, Result
from pollen.resources.models import ConditionStatus, Node, Replica, Workload

__all__ = ["MEMORY_PRESSURE", "MemoryPressureEvictor"]

MEMORY_PRESSURE = "MemoryPressure"


class MemoryPressureEvictor:
    """Evicts this node's replicas while the machine is short of memory (built in)."""

    name = "eviction"
    kind = "Node"

    def __init__(
        self,
        available_mb: Callable[[], int],
        *,
        reserve_mb: int = 100,
        margin_mb: int = 50,
        interval: float = 5.0,
    ) -> None:
        if reserve_mb < 0 or margin_mb < 0 or interval <= 0:
            raise ValueError("reserve and margin must be >= 0 MB and the interval > 0 s")
        self._available_mb = available_mb
        self._reserve_mb = reserve_mb
        self._margin_mb = margin_mb
        self._interval = interval

    async def reconcile(self, request: Request, context: Context) -> Result:
        if request.name != context.node_name:
            return Result.done()
        node = context.get("Node", request.name)
        if not isinstance(node, Node) or node.metadata.deletion_timestamp is not None:
            return Result.done()
        available = self._available_mb()
        current = node.condition(MEMORY_PRESSURE)
        was_under = current is not None and current.status is ConditionStatus.TRUE
        limit = self._reserve_mb + (self._margin_mb if was_under else 0)
        under = available < limit
        message = f"{available} MB available, reserve {self._reserve_mb} MB"
        if current is None or was_under != under:
            # Written on a transition only: the figure changes at every check, and a status
            # write is a document change that every node receives, stores and re-evaluates.
            context.set_condition(
                "Node",
                request.name,
                MEMORY_PRESSURE,
                under,
                reason="LowMemory" if under else "EnoughMemory",
                message=message,
            )
        if under:
            self._evict_one(context, message)
        return Result.requeue_after(self._interval)

    def _evict_one(self, context: Context, why: str) -> None:
        me = context.node_name
        own = [
            r
            for r in context.list("Replica")
            if isinstance(r, Replica)
            and r.spec.node == me
            and r.metadata.deletion_timestamp is None
        ]
        if not own:
            return

        def priority(replica: Replica) -> int:
            workload = context.get("Workload", replica.spec.workload)
            return workload.spec.priority if isinstance(workload, Workload) else 0

        victim = min(own, key=lambda r: (priority(r), r.spec.score, r.name))
        context.delete("Replica", victim.name)
        message = (
            f"evicted from {me} under memory pressure ({why}); "
            f"priority {priority(victim)}, the lowest here"
        )
        context.record_event("Replica", victim.name, "Evicted", message, warning=True)
        context.record_event(
            "Workload", victim.spec.workload, "Evicted", f"{victim.name} {message}", warning=True
        )
