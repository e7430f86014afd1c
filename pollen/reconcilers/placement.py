"""Placement by claims: where a Workload's replicas run, decided by every node alone. Sans-IO.

There is no scheduler. Each node looks at the same document (Workloads, Replicas, Nodes) and at
what membership tells it of the others (alive, load, cached artifacts, Vivaldi coordinates),
and runs :func:`decide` for each Workload. The answer says what *this* node should do about it:
claim replica slots (write Replica objects naming itself), withdraw its own claims (delete
them), and when to look again. Nobody ever writes another node's claim, so claims never
conflict inside the document; what can happen is that several nodes claim at once, and then the
rule below settles it the same way on every node.

The rule (ADR 0011)
-------------------
The *live* claims of a Workload are the Replicas of its current revision held by nodes alive
in this node's view. Ranked Ready first (an incumbent that serves is never displaced by a newcomer
that does not yet), then by score (highest first), ties to the lowest node name, then the replica
name, the first ``N`` are kept (``N`` = the desired count, capped by the budget; with
strict spread, at most one per node). A node whose claim falls outside the first ``N`` withdraws
it. A claim's score is fixed when it is written, so once exactly ``N`` live claims exist nothing
moves: no flapping after convergence.

Who claims a missing slot: every node ranks every candidate slot in its view (a slot is a node
and a replica index on it: ``score - index * penalty``, the penalty spreading replicas over
nodes) and the best ``missing`` slots' nodes claim at once. The others wait, and the window
widens by one slot every ``claim_stagger`` seconds while slots stay missing, so that a failed or
slow candidate is replaced without a timeout anyone must agree on. Views differ a little, so
two nodes sometimes claim the same slot; the rule above then withdraws one.

Blue/green: when the Workload's instance template changes (:func:`template_revision`: artifact,
executor, resources, env, args, health path; not the replica count nor placement), claims of the
old revision stay (and keep serving) until the new revision has ``N`` Ready replicas; then their
holders withdraw them.

Scores (:func:`score`): higher is better. The form of the issue, ``a*RTT + b*Load + c*Queue +
d*Reliability`` plus free capacity and a cached artifact, each term scaled to [0, 1] and
weighted by :class:`Weights`, which every node may set for itself.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from pollen.resources.models import ReplicaPhase, Spread, WorkloadSpec

__all__ = [
    "Claim",
    "Decision",
    "NodeFacts",
    "PlacementConfig",
    "Placer",
    "Unschedulable",
    "Usage",
    "Weights",
    "WorkloadView",
    "decide",
    "rank_claims",
    "replica_name",
    "score",
    "template_revision",
    "usage_by_node",
]


@dataclass(frozen=True)
class Weights:
    """How much each term of the score counts. Each term is in [0, 1]."""

    capacity: float = 1.0
    """Free memory left after placing, as a fraction of the node's capacity."""
    cache: float = 1.0
    """1 when the node already holds the artifact: no fetch, a warm start."""
    rtt: float = 0.5
    """Proximity to the demand: ``1 / (1 + rtt / 50 ms)``; neutral (0.5) when unknown."""
    load: float = 1.0
    """``1 - load`` (CPU, 0..1, from membership)."""
    queue: float = 0.25
    """``1 / (1 + queue)``: work waiting on the node."""
    reliability: float = 0.5
    """How past replicas on this node fared, 0..1."""

    def __post_init__(self) -> None:
        for name in ("capacity", "cache", "rtt", "load", "queue", "reliability"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"weight {name} must be a finite number >= 0")


@dataclass(frozen=True)
class PlacementConfig:
    """Timings and tie-breaking of placement; the same on every node of a swarm."""

    claim_stagger: float = 0.5
    """Seconds between two widenings of the set of nodes that claim a missing slot."""
    distinct_penalty: float = 1000.0
    """Score taken off each further replica on one node with ``spread: preferred``: larger than
    any score, so distinct nodes always come first."""
    stacking_penalty: float = 0.1
    """The same with ``spread: none``: small, so a much better node may take several."""


@dataclass(frozen=True)
class NodeFacts:
    """What placement knows of one node alive in this node's view."""

    name: str
    memory_mb: int
    """Capacity (the Node's spec); 0 means unknown, and nothing is placed there."""
    cpu_millis: int
    labels: Mapping[str, str] = field(default_factory=dict)
    unschedulable: bool = False
    load: float = 0.0
    artifacts: frozenset[str] = frozenset()
    rtt_to_demand: float | None = None
    """Seconds from this node to where the workload's requests come from, if known."""
    queue: int = 0
    reliability: float = 1.0


@dataclass(frozen=True)
class Usage:
    """What the live claims already placed on one node ask for."""

    memory_mb: int = 0
    cpu_millis: int = 0


@dataclass(frozen=True)
class Claim:
    """A Replica, as placement sees it."""

    name: str
    workload: str
    node: str
    score: float
    revision: str
    phase: ReplicaPhase = ReplicaPhase.PENDING
    deleting: bool = False


@dataclass(frozen=True)
class WorkloadView:
    """A Workload, with its artifact resolved to a digest (None if it cannot be)."""

    name: str
    spec: WorkloadSpec
    digest: str | None
    deleting: bool = False

    @property
    def revision(self) -> str:
        """The revision of the instance template (see :func:`template_revision`)."""
        return template_revision(self.spec, self.digest)


class Unschedulable(StrEnum):
    """Why replicas could not all be placed (the reason of the Workload's condition)."""

    ARTIFACT_NOT_FOUND = "ArtifactNotFound"
    NO_MATCHING_NODE = "NoMatchingNode"
    INSUFFICIENT_CAPACITY = "InsufficientCapacity"
    SPREAD_UNSATISFIABLE = "SpreadUnsatisfiable"
    BUDGET_EXCEEDED = "BudgetExceeded"


@dataclass(frozen=True)
class NewClaim:
    """A Replica this node should write, naming itself."""

    name: str
    score: float


@dataclass(frozen=True)
class Decision:
    """What this node should do about one Workload, and what it sees of it."""

    claim: tuple[NewClaim, ...] = ()
    withdraw: tuple[str, ...] = ()
    """This node's own Replicas to delete (excess, old revision, or Workload gone)."""
    requeue_after: float | None = None
    """Look again after this many seconds (a claim window still to open), if not sooner."""
    desired: int = 0
    """Replicas wanted after the budget."""
    kept: tuple[str, ...] = ()
    """The live claims of the current revision that stay, best first."""
    ready: int = 0
    """Of ``kept``, how many are Ready."""
    unschedulable: Unschedulable | None = None
    message: str = ""
    """One sentence on the placement, for the Workload's condition."""


def template_revision(spec: WorkloadSpec, digest: str | None) -> str:
    """A short hash of what an instance of ``spec`` is made from: the artifact's digest, the
    executor, resources, env, args and health path (Kubernetes' pod-template-hash)."""
    template = {
        "artifact": digest or spec.artifact,
        "executor": str(spec.executor),
        "resources": spec.resources.model_dump(mode="json", by_alias=True),
        "env": dict(sorted(spec.env.items())),
        "args": list(spec.args),
        "healthPath": spec.health_path,
    }
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:16]


def replica_name(workload: str, revision: str, node: str, index: int) -> str:
    """The name of a claim: stable for the same slot, unique across workloads and nodes.

    A hash rather than the parts joined by dashes, which could collide (``a`` on ``b-c`` and
    ``a-b`` on ``c``); the workload name first, so that replicas list next to each other.
    """
    digest = hashlib.sha256(f"{workload}\0{revision}\0{node}\0{index}".encode()).hexdigest()
    prefix = workload[: 253 - 11].rstrip(".-")
    return f"{prefix}-{digest[:10]}"


def score(spec: WorkloadSpec, node: NodeFacts, usage: Usage, digest: str | None,
          weights: Weights) -> float | None:  # fmt: skip
    """How well ``node`` suits one more replica of ``spec``; None if it cannot take it.

    Eligibility: the node selector matches, the node is schedulable, and its free memory and
    CPU (capacity minus ``usage``) cover the replica's ``resources``.
    """
    if node.unschedulable or not _selected(spec, node):
        return None
    free_memory = node.memory_mb - usage.memory_mb - spec.resources.memory_mb
    free_cpu = node.cpu_millis - usage.cpu_millis - spec.resources.cpu_millis
    if node.memory_mb <= 0 or free_memory < 0 or free_cpu < 0:
        return None
    capacity = free_memory / node.memory_mb
    cached = 1.0 if digest is not None and digest in node.artifacts else 0.0
    rtt = 0.5 if node.rtt_to_demand is None else 1.0 / (1.0 + node.rtt_to_demand / 0.05)
    load = 1.0 - min(1.0, max(0.0, node.load))
    queue = 1.0 / (1.0 + max(0, node.queue))
    reliability = min(1.0, max(0.0, node.reliability))
    total = (
        weights.capacity * capacity
        + weights.cache * cached
        + weights.rtt * rtt
        + weights.load * load
        + weights.queue * queue
        + weights.reliability * reliability
    )
    # Rounded so that the same facts give the same score on every node, whatever the float
    # arithmetic's order; the score is written into the claim and compared everywhere.
    return round(total, 6)


def _selected(spec: WorkloadSpec, node: NodeFacts) -> bool:
    return all(node.labels.get(k) == v for k, v in spec.placement.node_selector.items())


def rank_claims(claims: Iterable[Claim]) -> list[Claim]:
    """Claims best first: Ready ones, then the highest score, the lowest node name, the lowest
    replica name.

    Ready first, as a Kubernetes ReplicaSet scales down pods that are not ready before those
    that are: a surplus (concurrent claims, a node back from a partition, one briefly thought
    dead) is absorbed by the claims that serve nothing yet. Without it, a node that withdrew and
    then claimed again, now with the artifact cached and so a better score, would displace a
    serving replica, whose node would in turn claim again, and so on.
    """
    return sorted(
        claims, key=lambda c: (c.phase is not ReplicaPhase.READY, -c.score, c.node, c.name)
    )


def _budget(spec: WorkloadSpec) -> tuple[int, str]:
    """The replica count the budget allows (with the desired count), and why it is lower."""
    desired = spec.desired_replicas
    allowed = desired
    budget = spec.budget
    if budget.max_instances is not None:
        allowed = min(allowed, budget.max_instances)
    if budget.memory_mb is not None:
        allowed = min(allowed, budget.memory_mb // spec.resources.memory_mb)
    if budget.cpu_millis is not None:
        allowed = min(allowed, budget.cpu_millis // spec.resources.cpu_millis)
    if allowed < desired:
        return allowed, (
            f"the budget allows {allowed} of {desired} replicas "
            f"({spec.resources.memory_mb} MB and {spec.resources.cpu_millis} CPU millis each)"
        )
    return desired, ""


def _keep(current: Sequence[Claim], desired: int, spread: Spread) -> list[Claim]:
    kept: list[Claim] = []
    on_node: set[str] = set()
    for claim in rank_claims(current):
        if len(kept) == desired:
            break
        if spread is Spread.STRICT and claim.node in on_node:
            continue
        kept.append(claim)
        on_node.add(claim.node)
    return kept


def decide(
    me: str,
    workload: WorkloadView,
    claims: Sequence[Claim],
    nodes: Mapping[str, NodeFacts],
    usage: Mapping[str, Usage],
    *,
    now: float,
    missing_since: float | None,
    weights: Weights | None = None,
    config: PlacementConfig | None = None,
) -> Decision:
    """What node ``me`` should do about ``workload`` (see the module docstring).

    ``claims`` are the Workload's Replicas; ``nodes`` the nodes alive in ``me``'s view (``me``
    included); ``usage`` what live claims of every workload already ask of each node;
    ``missing_since`` when ``me`` first saw this revision short of replicas (None: it was not,
    as far as ``me`` knew; the caller keeps it and passes ``now`` the first time).
    """
    weights = weights or Weights()
    config = config or PlacementConfig()
    mine = [c for c in claims if c.node == me and not c.deleting]
    if workload.deleting:
        return Decision(withdraw=tuple(sorted(c.name for c in mine)), message="deleting")
    spec = workload.spec
    desired, budget_message = _budget(spec)
    live = [c for c in claims if not c.deleting and c.node in nodes]
    revision = workload.revision
    current = [c for c in live if c.revision == revision]
    kept = _keep(current, desired, spec.placement.spread)
    kept_names = {c.name for c in kept}
    ready = sum(1 for c in kept if c.phase is ReplicaPhase.READY)
    withdraw = {c.name for c in mine if c.revision == revision} - kept_names
    # Old revisions drain once the new one is fully Ready (blue/green).
    if ready >= desired:
        withdraw |= {c.name for c in mine if c.revision != revision}
    missing = desired - len(kept)
    base = Decision(
        withdraw=tuple(sorted(withdraw)),
        desired=desired,
        kept=tuple(c.name for c in kept),
        ready=ready,
        unschedulable=Unschedulable.BUDGET_EXCEEDED if budget_message else None,
        message=budget_message or f"{len(kept)} of {desired} replicas placed",
    )
    if missing <= 0:
        return base
    if workload.digest is None:
        return _replace(
            base,
            Unschedulable.ARTIFACT_NOT_FOUND,
            f"artifact {spec.artifact!r} is neither a digest nor the name of an Artifact",
        )
    slots, why, message = _candidate_slots(spec, workload.digest, kept, nodes, usage,
                                           weights, config, missing)  # fmt: skip
    if len(slots) < missing:
        base = _replace(base, why, message)
    # The best ``missing`` slots claim now; one more every claim_stagger while still missing.
    waited = 0.0 if missing_since is None else max(0.0, now - missing_since)
    window = missing + int(waited / config.claim_stagger)
    new: list[NewClaim] = []
    my_first: int | None = None
    taken = Counter(c.node for c in kept)
    used_names = {c.name for c in claims}
    for position, (slot_score, node, index) in enumerate(slots):
        if node != me:
            continue
        if position >= window:
            my_first = position
            break
        name = replica_name(workload.name, revision, me, index)
        if name in used_names:  # a withdrawn claim of that slot is still being deleted
            continue
        new.append(NewClaim(name, slot_score + index * _penalty(spec, config)))
        taken[me] += 1
    requeue = None
    if my_first is not None and not new:
        requeue = (my_first - window + 1) * config.claim_stagger - (waited % config.claim_stagger)
        requeue = max(requeue, 0.01)
    return Decision(
        claim=tuple(new),
        withdraw=base.withdraw,
        requeue_after=requeue,
        desired=base.desired,
        kept=base.kept,
        ready=base.ready,
        unschedulable=base.unschedulable,
        message=base.message,
    )


class Placer:
    """:func:`decide` with the memory it needs: when each Workload revision first looked short
    of replicas to this node (the claim window widens from then on)."""

    def __init__(self, *, weights: Weights | None = None, config: PlacementConfig | None = None):
        self.weights = weights or Weights()
        self.config = config or PlacementConfig()
        self._missing_since: dict[tuple[str, str], float] = {}

    def decide(
        self,
        me: str,
        workload: WorkloadView,
        claims: Sequence[Claim],
        nodes: Mapping[str, NodeFacts],
        usage: Mapping[str, Usage],
        now: float,
    ) -> Decision:
        key = (workload.name, workload.revision)
        decision = decide(
            me, workload, claims, nodes, usage, now=now,
            missing_since=self._missing_since.get(key), weights=self.weights, config=self.config,
        )  # fmt: skip
        if len(decision.kept) < decision.desired:
            self._missing_since.setdefault(key, now)
        else:
            self._missing_since.pop(key, None)
        return decision


def usage_by_node(
    claims: Iterable[Claim], specs: Mapping[str, WorkloadSpec], nodes: Mapping[str, NodeFacts]
) -> dict[str, Usage]:
    """What the live claims of every workload (``specs`` by name) ask of each node in ``nodes``."""
    usage: dict[str, Usage] = {}
    for claim in claims:
        spec = specs.get(claim.workload)
        if spec is None or claim.deleting or claim.node not in nodes:
            continue
        placed = usage.get(claim.node, Usage())
        usage[claim.node] = Usage(
            placed.memory_mb + spec.resources.memory_mb,
            placed.cpu_millis + spec.resources.cpu_millis,
        )
    return usage


def _penalty(spec: WorkloadSpec, config: PlacementConfig) -> float:
    if spec.placement.spread is Spread.NONE:
        return config.stacking_penalty
    return config.distinct_penalty


def _candidate_slots(
    spec: WorkloadSpec,
    digest: str,
    kept: Sequence[Claim],
    nodes: Mapping[str, NodeFacts],
    usage: Mapping[str, Usage],
    weights: Weights,
    config: PlacementConfig,
    missing: int,
) -> tuple[list[tuple[float, str, int]], Unschedulable | None, str]:
    """Candidate ``(slot score, node, replica index on it)``, best first, and why they are few.

    A node's replica index counts the claims it already holds; each further slot needs the
    capacity of one more replica and costs the spread penalty.
    """
    held = Counter(c.node for c in kept)
    penalty = _penalty(spec, config)
    slots: list[tuple[float, str, int]] = []
    selected = 0
    for name in sorted(nodes):
        node = nodes[name]
        if node.unschedulable or not _selected(spec, node):
            continue
        selected += 1
        placed = usage.get(name, Usage())
        first = held[name]
        limit = 1 if spec.placement.spread is Spread.STRICT else first + missing
        for index in range(first, limit):
            extra = index - first
            planned = Usage(
                placed.memory_mb + extra * spec.resources.memory_mb,
                placed.cpu_millis + extra * spec.resources.cpu_millis,
            )
            value = score(spec, node, planned, digest, weights)
            if value is None:
                break
            slots.append((round(value - index * penalty, 6), name, index))
    slots.sort(key=lambda s: (-s[0], s[1], s[2]))
    if len(slots) >= missing:
        return slots, None, ""
    if selected == 0:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(spec.placement.node_selector.items()))
        return (
            slots,
            Unschedulable.NO_MATCHING_NODE,
            (
                f"no schedulable node matches the selector {labels}"
                if labels
                else "no schedulable node is alive"
            ),
        )
    without = sum(1 for name in nodes if _selected(spec, nodes[name]) and not held[name]
                  and not nodes[name].unschedulable)  # fmt: skip
    if spec.placement.spread is Spread.STRICT and without < missing:
        return (
            slots,
            Unschedulable.SPREAD_UNSATISFIABLE,
            (
                f"strict spread needs {missing} more distinct nodes, and {without} matching "
                f"nodes hold no replica yet"
            ),
        )
    return (
        slots,
        Unschedulable.INSUFFICIENT_CAPACITY,
        (
            f"{missing - len(slots)} more replicas of {spec.resources.memory_mb} MB and "
            f"{spec.resources.cpu_millis} CPU millis do not fit on the {selected} matching nodes"
        ),
    )


def _replace(decision: Decision, why: Unschedulable | None, message: str) -> Decision:
    return Decision(
        claim=decision.claim,
        withdraw=decision.withdraw,
        requeue_after=decision.requeue_after,
        desired=decision.desired,
        kept=decision.kept,
        ready=decision.ready,
        unschedulable=why,
        message=message,
    )
