"""Placement by claims, as a pure function: scores, the conflict rule, and why not."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pollen.reconcilers.placement import (
    Claim,
    Decision,
    NodeFacts,
    PlacementConfig,
    Unschedulable,
    Usage,
    WorkloadView,
    decide,
    rank_claims,
    replica_name,
    score,
    template_revision,
)
from pollen.resources.models import ReplicaPhase, WorkloadSpec

DIGEST = "sha256:" + "a" * 64
CONFIG = PlacementConfig(claim_stagger=0.5)


def spec(**fields: object) -> WorkloadSpec:
    return WorkloadSpec.model_validate({"artifact": DIGEST, **fields})


def view(replicas: int = 2, generation: int = 1, **fields: object) -> WorkloadView:
    """Workload web; each ``generation`` has its own instance template (its env differs)."""
    env = {"GENERATION": str(generation)}
    return WorkloadView("web", spec(replicas=replicas, env=env, **fields), DIGEST)


def revision(generation: int) -> str:
    return view(generation=generation).revision


def nodes(*names: str, memory: int = 1024, **facts: object) -> dict[str, NodeFacts]:
    return {n: NodeFacts(n, memory, 4000, **facts) for n in names}  # type: ignore[arg-type]


def claim(node: str, score: float, generation: int = 1, index: int = 0, **fields: object) -> Claim:
    name = replica_name("web", revision(generation), node, index)
    return Claim(name, "web", node, score, revision(generation), **fields)  # type: ignore[arg-type]


def run(me: str, workload: WorkloadView, claims: list[Claim], swarm: Mapping[str, NodeFacts],
        *, now: float = 0.0, since: float | None = None) -> Decision:  # fmt: skip
    usage: dict[str, Usage] = {}
    for c in claims:
        if c.node in swarm and not c.deleting:
            u = usage.get(c.node, Usage())
            usage[c.node] = Usage(u.memory_mb + workload.spec.resources.memory_mb,
                                  u.cpu_millis + workload.spec.resources.cpu_millis)  # fmt: skip
    return decide(me, workload, claims, swarm, usage, now=now, missing_since=since, config=CONFIG)


def test_scores_follow_the_terms() -> None:
    s = spec(replicas=1)
    idle = NodeFacts("a", 1024, 4000, load=0.0)
    busy = NodeFacts("b", 1024, 4000, load=0.9)
    cached = NodeFacts("c", 1024, 4000, artifacts=frozenset({DIGEST}))
    base = score(s, idle, Usage(), DIGEST, weights := __import__(
        "pollen.reconcilers.placement", fromlist=["Weights"]).Weights())  # fmt: skip
    assert base is not None
    assert score(s, busy, Usage(), DIGEST, weights) < base  # type: ignore[operator]
    assert score(s, cached, Usage(), DIGEST, weights) == pytest.approx(base + 1.0)
    assert score(s, idle, Usage(memory_mb=1000), DIGEST, weights) is None  # 64 MB do not fit


def test_the_best_nodes_claim_at_once_and_the_others_wait() -> None:
    swarm = nodes("a", "b", "c", load=0.0) | {"c": NodeFacts("c", 1024, 4000, load=0.9)}
    decisions = {me: run(me, view(2), [], swarm) for me in swarm}
    assert [len(d.claim) for d in decisions.values()] == [1, 1, 0]
    waiting = decisions["c"]
    assert waiting.requeue_after == pytest.approx(0.5)
    # Still missing after the stagger (a or b never claimed): c claims.
    late = run("c", view(2), [], swarm, now=0.6, since=0.0)
    assert len(late.claim) == 1


def test_concurrent_claims_resolve_to_the_best_and_the_lowest_name() -> None:
    swarm = nodes("a", "b", "c")
    claims = [claim("c", 2.0), claim("b", 2.0), claim("a", 1.0)]
    assert [c.node for c in rank_claims(claims)] == ["b", "c", "a"]
    decisions = {me: run(me, view(2), claims, swarm) for me in swarm}
    assert decisions["a"].withdraw == (claims[2].name,)
    assert not decisions["b"].withdraw and not decisions["c"].withdraw
    assert all(d.kept == (claims[1].name, claims[0].name) for d in decisions.values())


def test_a_better_newcomer_never_displaces_a_ready_incumbent() -> None:
    swarm = nodes("a", "b", "c")
    incumbents = [claim("a", 1.0, phase=ReplicaPhase.READY),
                  claim("b", 1.5, phase=ReplicaPhase.READY)]  # fmt: skip
    newcomer = claim("c", 9.0)  # a node back with the artifact cached: a much better score
    claims = [*incumbents, newcomer]
    decisions = {me: run(me, view(2), claims, swarm) for me in swarm}
    assert decisions["c"].withdraw == (newcomer.name,)
    assert not decisions["a"].withdraw and not decisions["b"].withdraw
    # Among claims that are all Ready (a healed partition), the score decides again.
    ready_newcomer = claim("c", 9.0, phase=ReplicaPhase.READY)
    decision = run("a", view(2), [*incumbents, ready_newcomer], swarm)
    assert decision.withdraw == (incumbents[0].name,)


def test_claims_of_dead_nodes_do_not_count() -> None:
    swarm = nodes("a", "b")
    decision = run("a", view(2), [claim("b", 3.0), claim("z", 9.0)], swarm)
    assert len(decision.kept) == 1 and len(decision.claim) == 1


def test_strict_spread_never_stacks_and_says_why() -> None:
    swarm = nodes("a", "b")
    decision = run("a", view(3, placement={"spread": "strict"}), [claim("b", 1.0)], swarm)
    assert len(decision.claim) == 1
    after = run("a", view(3, placement={"spread": "strict"}),
                [claim("b", 1.0), claim("a", 1.0)], swarm)  # fmt: skip
    assert not after.claim
    assert after.unschedulable is Unschedulable.SPREAD_UNSATISFIABLE
    assert "distinct nodes" in after.message


def test_preferred_spread_stacks_only_when_nodes_run_out() -> None:
    swarm = nodes("a", "b")
    decisions = {me: run(me, view(3), [], swarm) for me in swarm}
    assert sorted(len(d.claim) for d in decisions.values()) == [1, 2]


@pytest.mark.parametrize(
    ("fields", "facts", "why"),
    [
        ({"placement": {"nodeSelector": {"zone": "mars"}}}, {}, Unschedulable.NO_MATCHING_NODE),
        ({"resources": {"memoryMB": 4096}}, {}, Unschedulable.INSUFFICIENT_CAPACITY),
        ({}, {"unschedulable": True}, Unschedulable.NO_MATCHING_NODE),
    ],
)
def test_what_cannot_be_placed_gets_a_reason(
    fields: dict[str, object], facts: dict[str, object], why: Unschedulable
) -> None:
    swarm = nodes("a", "b", **facts)
    decision = run("a", view(2, **fields), [], swarm)
    assert not decision.claim
    assert decision.unschedulable is why and decision.message


def test_a_budget_caps_the_count() -> None:
    workload = view(5, budget={"maxInstances": 2})
    decision = run("a", workload, [claim("b", 1.0), claim("a", 1.0)], nodes("a", "b", "c"))
    assert decision.desired == 2 and not decision.claim
    assert decision.unschedulable is Unschedulable.BUDGET_EXCEEDED


def test_an_unknown_artifact_places_nothing() -> None:
    workload = WorkloadView("web", spec(replicas=1), None)
    decision = run("a", workload, [], nodes("a"))
    assert not decision.claim and decision.unschedulable is Unschedulable.ARTIFACT_NOT_FOUND


def test_blue_green_keeps_the_old_generation_until_the_new_one_is_ready() -> None:
    swarm = nodes("a", "b")
    old = [claim("a", 2.0, generation=1, phase=ReplicaPhase.READY),
           claim("b", 2.0, generation=1, phase=ReplicaPhase.READY)]  # fmt: skip
    starting = [claim("a", 2.0, generation=2), claim("b", 2.0, generation=2)]
    decision = run("a", view(2, generation=2), old + starting, swarm)
    assert not decision.withdraw, "the old replica keeps serving while the new one starts"
    ready = [claim("a", 2.0, generation=2, phase=ReplicaPhase.READY),
             claim("b", 2.0, generation=2, phase=ReplicaPhase.READY)]  # fmt: skip
    decision = run("a", view(2, generation=2), old + ready, swarm)
    assert decision.withdraw == (old[0].name,)


def test_a_deleted_workload_withdraws_every_claim_of_this_node() -> None:
    workload = WorkloadView("web", spec(replicas=2, env={"GENERATION": "1"}), DIGEST, deleting=True)
    claims = [claim("a", 1.0), claim("a", 1.0, index=1), claim("b", 1.0)]
    assert set(run("a", workload, claims, nodes("a", "b")).withdraw) == {
        claims[0].name,
        claims[1].name,
    }


def test_replica_names_are_stable_and_distinct() -> None:
    assert replica_name("a", "1", "b-c", 0) != replica_name("a-b", "1", "c", 0)
    assert replica_name("web", "3", "n1", 0) == replica_name("web", "3", "n1", 0)
    assert replica_name("web", "3", "n1", 0).startswith("web-")


def test_scaling_or_moving_does_not_change_the_revision_but_the_template_does() -> None:
    base = template_revision(spec(replicas=2), DIGEST)
    assert template_revision(spec(replicas=5, placement={"spread": "strict"}), DIGEST) == base
    assert template_revision(spec(replicas=2, budget={"maxInstances": 9}), DIGEST) == base
    assert template_revision(spec(replicas=2, env={"A": "1"}), DIGEST) != base
    assert template_revision(spec(replicas=2), "sha256:" + "b" * 64) != base
    assert template_revision(spec(replicas=2, resources={"memoryMB": 128}), DIGEST) != base


# --- convergence: every node deciding on the same claims, round after round ----------------


def rounds(swarm: Mapping[str, NodeFacts], workload: WorkloadView, order: list[str],
           max_rounds: int = 50) -> tuple[list[Claim], int]:  # fmt: skip
    """Nodes decide in ``order`` on the claims of the previous round (a slow gossip), until
    nothing changes. Returns the final claims and the claim changes made."""
    claims: list[Claim] = []
    changes = 0
    now = 0.0
    since: float | None = None
    for _ in range(max_rounds):
        decisions = {me: run(me, workload, claims, swarm, now=now, since=since) for me in order}
        withdrawn = {n for d in decisions.values() for n in d.withdraw}
        added = [Claim(c.name, "web", me, c.score, workload.revision)
                 for me, d in decisions.items() for c in d.claim]  # fmt: skip
        if not withdrawn and not added:
            return claims, changes
        changes += len(withdrawn) + len(added)
        claims = [c for c in claims if c.name not in withdrawn] + added
        since = now if since is None else since
        now += CONFIG.claim_stagger
    raise AssertionError("placement did not settle")


@settings(max_examples=150, deadline=None)
@given(
    loads=st.lists(st.sampled_from([0.0, 0.1, 0.5, 0.9]), min_size=1, max_size=12),
    replicas=st.integers(0, 15),
    spread=st.sampled_from(["strict", "preferred", "none"]),
    memory=st.sampled_from([64, 300, 600]),
    seed=st.randoms(use_true_random=False),
)
def test_every_node_deciding_alone_settles_on_exactly_what_fits(
    loads: list[float], replicas: int, spread: str, memory: int, seed: object
) -> None:
    swarm = {f"n{i}": NodeFacts(f"n{i}", 1024, 64000, load=load) for i, load in enumerate(loads)}
    order = list(swarm)
    seed.shuffle(order)  # type: ignore[attr-defined]
    workload = view(replicas, placement={"spread": spread}, resources={"memoryMB": memory})
    claims, changes = rounds(swarm, workload, order)
    per_node = 1 if spread == "strict" else 1024 // memory
    fits = min(replicas, len(swarm) * per_node)
    assert len(claims) == fits
    assert len({c.name for c in claims}) == len(claims)
    if spread == "strict":
        assert len({c.node for c in claims}) == len(claims)
    if spread == "preferred" and fits <= len(swarm):
        assert len({c.node for c in claims}) == len(claims), "distinct nodes while there are enough"
    # With one view shared by all, nobody claims what someone else claims: no churn at all.
    assert changes == fits
