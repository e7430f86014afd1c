"""Placement in the simulation: each simulated node runs the placement decision.

Each node calls :func:`pollen.reconcilers.placement.decide`.

The same decision code as a real node's placement reconciler, fed from the node's own document
(Workloads and Replicas as JSON, validated with the resource models) and from its membership
view (who is alive), with node capacities and labels from a table the test gives. Claims and
withdrawals are written into the node's document and gossiped like any write.

Modelled, not run: the runtime. A claim is written with its replica already Ready (an instance
starts in the time a claim takes to gossip), which is what placement needs to see.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from pollen.reconcilers.placement import (
    Claim,
    NodeFacts,
    PlacementConfig,
    Placer,
    Weights,
    WorkloadView,
    usage_by_node,
)
from pollen.resources.models import ReplicaPhase, WorkloadSpec
from pollen.sim.node import SimNode

__all__ = ["ClaimLog", "SimPlacement"]


@dataclass
class ClaimLog:
    """Every claim and withdrawal in a simulation, with its virtual time."""

    #: (time, node, workload, replica name, +1 for a claim or -1 for a withdrawal)
    changes: list[tuple[float, str, str, str, int]] = field(default_factory=list)

    def count(self, workload: str, since: float = 0.0) -> int:
        """Claim changes of ``workload`` from ``since`` on."""
        return sum(1 for t, _, w, _, _ in self.changes if w == workload and t >= since)

    def last(self, workload: str) -> float | None:
        """When ``workload``'s claims last changed."""
        times = [t for t, _, w, _, _ in self.changes if w == workload]
        return max(times) if times else None


class SimPlacement:
    """The placement reconciler of one simulated node."""

    def __init__(
        self,
        node: SimNode,
        facts: Mapping[str, NodeFacts],
        log: ClaimLog,
        *,
        config: PlacementConfig | None = None,
        weights: Weights | None = None,
    ) -> None:
        self.node = node
        self.facts = facts
        self.log = log
        self._placer = Placer(weights=weights, config=config)
        self._wake: float = float("inf")
        self._seen: tuple[bytes, ...] = ()
        self._view_version = -1
        # What the document holds, parsed; refreshed from the objects each change touched.
        self._workloads: dict[str, tuple[WorkloadSpec, int]] = {}
        self._claims: dict[str, Claim] = {}

    def next_deadline(self) -> float:
        return self._wake

    def run(self, now: float) -> None:
        """Decide for every Workload if the document, the view or a deadline asks for it."""
        heads = tuple(self.node.document.heads())
        if (
            heads == self._seen
            and self.node.view_version == self._view_version
            and now < self._wake
        ):
            return
        self._view_version = self.node.view_version
        alive = self.node.alive_members()
        self._wake = float("inf")
        self._refresh(heads)
        specs = {name: spec for name, (spec, _) in self._workloads.items()}
        claims = list(self._claims.values())
        nodes = {name: self.facts[name] for name in sorted(alive) if name in self.facts}
        usage = usage_by_node(claims, specs, nodes)
        for name in sorted(specs):
            generation = self._workloads[name][1]
            artifact = specs[name].artifact
            view = WorkloadView(
                name, specs[name], artifact if artifact.startswith("sha256:") else None
            )
            decision = self._placer.decide(
                self.node.name, view, [c for c in claims if c.workload == name], nodes, usage, now
            )
            for replica in decision.withdraw:
                self.node.document.remove("Replica", replica)
                self.log.changes.append((now, self.node.name, name, replica, -1))
            for new in decision.claim:
                self.node.document.write("Replica", new.name, _replica(new.name, name,
                                                                       generation, view.revision,
                                                                       artifact,
                                                                       self.node.name,
                                                                       new.score))  # fmt: skip
                self.log.changes.append((now, self.node.name, name, new.name, +1))
            if decision.withdraw or decision.claim:
                self.node.gossip.on_local_change(now)
            if decision.requeue_after is not None:
                self._wake = min(self._wake, now + decision.requeue_after)
        # The heads read, not those after this node's own writes: the next run reads those.
        self._seen = heads

    def _refresh(self, heads: tuple[bytes, ...]) -> None:
        document = self.node.document
        if not self._seen:
            touched = document.keys()
        else:
            touched = document.touched(list(self._seen), list(heads))
        for kind, name in touched:
            data = document.read(kind, name)
            if kind == "Workload":
                self._workloads.pop(name, None)
                if data is None:
                    continue
                try:
                    spec = WorkloadSpec.model_validate(data.get("spec"))
                except ValidationError:
                    continue
                generation = int((data.get("metadata") or {}).get("generation", 1))
                self._workloads[name] = (spec, generation)
            elif kind == "Replica":
                self._claims.pop(name, None)
                claim = _claim(data) if data is not None else None
                if claim is not None:
                    self._claims[name] = claim


def _claim(data: Mapping[str, Any]) -> Claim | None:
    spec = data.get("spec") or {}
    meta = data.get("metadata") or {}
    node, workload = spec.get("node"), spec.get("workload")
    if not isinstance(node, str) or not isinstance(workload, str):
        return None
    phase = (data.get("status") or {}).get("phase", "Pending")
    return Claim(
        name=str(meta.get("name")),
        workload=workload,
        node=node,
        score=float(spec.get("score", 0.0)),
        revision=str(spec.get("revision", "")),
        phase=ReplicaPhase(phase),
        deleting=meta.get("deletionTimestamp") is not None,
    )


def _replica(
    name: str,
    workload: str,
    generation: int,
    revision: str,
    artifact: str,
    node: str,
    score: float,
) -> dict[str, Any]:
    return {
        "apiVersion": "pollen.dev/v1alpha1",
        "kind": "Replica",
        "metadata": {"name": name},
        "spec": {
            "workload": workload,
            "workloadGeneration": generation,
            "revision": revision,
            "artifact": artifact,
            "node": node,
            "score": score,
        },
        "status": {"phase": "Ready", "node": node},
    }
