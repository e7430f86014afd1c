"""The built-in placement reconciler: claims and withdraws this node's Replicas of a Workload.

The decision is :func:`pollen.reconcilers.placement.decide` (sans-IO, the same in
:mod:`pollen.sim`); this module feeds it from the document and the node's membership view,
writes what it decides, and keeps the Workload's status. ADR 0011 explains the protocol.

Status is written by one node at a time, the first alive node by name in the writer's own view,
so that N nodes do not write the same summary N times; during a partition each side has one, and
the document settles on one after the heal (level-triggered: it is written again whenever it
differs). The same node removes Replicas held by nodes gone from the swarm for ``gc_grace``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pollen.reconcilers import Context, Request, Result
from pollen.reconcilers.eviction import MEMORY_PRESSURE
from pollen.reconcilers.placement import (
    Claim,
    Decision,
    NodeFacts,
    PlacementConfig,
    Placer,
    Usage,
    Weights,
    WorkloadView,
    usage_by_node,
)
from pollen.resources.models import (
    API_VERSION,
    Artifact,
    ConditionStatus,
    Node,
    Replica,
    Workload,
    WorkloadSpec,
)

__all__ = ["LiveFacts", "WorkloadPlacer", "resolve_artifact"]

#: How often a Workload is looked at again while it is not fully placed or not Ready.
UNSETTLED_RESYNC = 5.0


@dataclass(frozen=True)
class LiveFacts:
    """What membership says of a node alive in this node's view (fast-changing, not stored)."""

    load: float = 0.0
    artifacts: frozenset[str] = frozenset()
    rtt: float | None = None
    """Estimated round trip from this node, in seconds."""


LiveView = Callable[[], Mapping[str, LiveFacts]]
"""The nodes alive (or only suspected) in this node's membership view, itself included."""


def resolve_artifact(artifact: str, context: Context) -> str | None:
    """The digest a Workload's ``artifact`` names: itself if it is one, else the Artifact's."""
    if artifact.startswith("sha256:"):
        return artifact
    named = context.get("Artifact", artifact)
    return named.spec.digest if isinstance(named, Artifact) else None


def claim_of(replica: Replica) -> Claim | None:
    """A Replica as placement sees it; None for one that names no node."""
    if replica.spec.node is None:
        return None
    return Claim(
        name=replica.name,
        workload=replica.spec.workload,
        node=replica.spec.node,
        score=replica.spec.score,
        revision=replica.spec.revision,
        phase=replica.status.phase,
        deleting=replica.metadata.deletion_timestamp is not None,
    )


class WorkloadPlacer:
    """Places Workloads by claims (built in, enabled on every node)."""

    name = "placement"
    kind = "Workload"

    def __init__(
        self,
        live: LiveView,
        *,
        weights: Weights | None = None,
        config: PlacementConfig | None = None,
        queue_length: Callable[[], int] = lambda: 0,
        reliability: Callable[[], float] = lambda: 1.0,
        gc_grace: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._live = live
        self._placer = Placer(weights=weights, config=config)
        self._queue_length = queue_length
        self._reliability = reliability
        self._gc_grace = gc_grace
        self._clock = clock
        self._absent_since: dict[str, float] = {}

    async def reconcile(self, request: Request, context: Context) -> Result:
        me = context.node_name
        now = self._clock()
        workload = context.get("Workload", request.name)
        replicas = [r for r in context.list("Replica") if isinstance(r, Replica)]
        own = [r for r in replicas if r.spec.workload == request.name]
        if not isinstance(workload, Workload):
            for replica in own:
                if replica.spec.node == me:
                    context.delete("Replica", replica.name)
            return Result.done()
        nodes = self._nodes(context, me)
        claims = [c for r in own if (c := claim_of(r)) is not None]
        view = WorkloadView(
            workload.name,
            workload.spec,
            resolve_artifact(workload.spec.artifact, context),
            deleting=workload.metadata.deletion_timestamp is not None,
        )
        decision = self._placer.decide(
            me, view, claims, nodes, _usage(replicas, context, nodes), now
        )
        self._act(context, workload, view, decision)
        if nodes and min(nodes) == me:
            self._write_status(context, workload, decision)
            self._collect(context, own, nodes, now)
        delays = [d for d in (decision.requeue_after,) if d is not None]
        if len(decision.kept) < decision.desired or decision.ready < decision.desired:
            delays.append(UNSETTLED_RESYNC)
        return Result.requeue_after(min(delays)) if delays else Result.done()

    # --- inputs -------------------------------------------------------------------------------

    def _nodes(self, context: Context, me: str) -> dict[str, NodeFacts]:
        facts: dict[str, NodeFacts] = {}
        for name, live in self._live().items():
            node = context.get("Node", name)
            if not isinstance(node, Node) or node.metadata.deletion_timestamp is not None:
                continue  # not registered yet, or revoked
            facts[name] = NodeFacts(
                name=name,
                memory_mb=node.spec.capacity.memory_mb,
                cpu_millis=node.spec.capacity.cpu_millis,
                labels=dict(node.metadata.labels),
                # Cordoned, or shedding load under memory pressure (see eviction.py).
                unschedulable=node.spec.unschedulable or _under_pressure(node),
                load=live.load,
                artifacts=live.artifacts,
                rtt_to_demand=None,
                queue=self._queue_length() if name == me else 0,
                reliability=self._reliability() if name == me else 1.0,
            )
        return facts

    # --- outputs ------------------------------------------------------------------------------

    def _act(
        self, context: Context, workload: Workload, view: WorkloadView, decision: Decision
    ) -> None:
        for name in decision.withdraw:
            if context.delete("Replica", name) is None:
                context.record_event(
                    "Workload",
                    workload.name,
                    "Withdrawn",
                    f"{context.node_name} withdrew {name}: {len(decision.kept)} better claims "
                    f"of {decision.desired} wanted",
                )
        digest = view.digest or ""
        for claim in decision.claim:
            context.apply(
                {
                    "apiVersion": API_VERSION,
                    "kind": "Replica",
                    "metadata": {
                        "name": claim.name,
                        "labels": {"pollen.dev/workload": workload.name},
                    },
                    "spec": {
                        "workload": workload.name,
                        "workloadGeneration": workload.metadata.generation or 1,
                        "revision": view.revision,
                        "artifact": digest,
                        "node": context.node_name,
                        "score": claim.score,
                    },
                }
            )
            context.record_event(
                "Workload",
                workload.name,
                "Claimed",
                f"{context.node_name} claimed {claim.name} with score {claim.score:g}: "
                f"{len(decision.kept)} of {decision.desired} placed in its view",
            )

    def _write_status(self, context: Context, workload: Workload, decision: Decision) -> None:
        if workload.metadata.deletion_timestamp is not None:
            return
        before = workload.condition("Scheduled")
        context.update_status(
            "Workload",
            workload.name,
            {"replicas": len(decision.kept), "readyReplicas": decision.ready},
        )
        if decision.unschedulable is None:
            context.set_condition(
                "Workload", workload.name, "Scheduled", True,
                reason="Scheduled", message=decision.message,
            )  # fmt: skip
        else:
            context.set_condition(
                "Workload", workload.name, "Scheduled", False,
                reason=str(decision.unschedulable), message=decision.message,
            )  # fmt: skip
            if before is None or before.reason != str(decision.unschedulable):
                context.record_event(
                    "Workload", workload.name, str(decision.unschedulable), decision.message,
                    warning=True,
                )  # fmt: skip
        ready = decision.ready >= decision.desired
        context.set_condition(
            "Workload",
            workload.name,
            "Ready",
            ConditionStatus.TRUE if ready else ConditionStatus.FALSE,
            reason="ReplicasReady" if ready else "ReplicasNotReady",
            message=f"{decision.ready} of {decision.desired} replicas Ready",
        )

    def _collect(
        self, context: Context, replicas: list[Replica], nodes: Mapping[str, NodeFacts],
        now: float,
    ) -> None:  # fmt: skip
        """Remove Replicas of nodes gone from the swarm for ``gc_grace`` seconds."""
        for present in nodes:
            self._absent_since.pop(present, None)
        for replica in replicas:
            holder = replica.spec.node
            if holder is None or holder in nodes:
                continue
            since = self._absent_since.setdefault(holder, now)
            if now - since >= self._gc_grace:
                context.delete("Replica", replica.name)
                context.record_event(
                    "Replica", replica.name, "Collected",
                    f"node {holder} has been gone for {self._gc_grace:g}s",
                )  # fmt: skip


def _under_pressure(node: Node) -> bool:
    pressure = node.condition(MEMORY_PRESSURE)
    return pressure is not None and pressure.status is ConditionStatus.TRUE


def _usage(
    replicas: list[Replica], context: Context, nodes: Mapping[str, NodeFacts]
) -> dict[str, Usage]:
    """What live claims of every workload ask of each alive node."""
    claims = [c for r in replicas if (c := claim_of(r)) is not None]
    specs: dict[str, WorkloadSpec] = {}
    for name in {c.workload for c in claims}:
        owner = context.get("Workload", name)
        if isinstance(owner, Workload):
            specs[name] = owner.spec
    return usage_by_node(claims, specs, nodes)
