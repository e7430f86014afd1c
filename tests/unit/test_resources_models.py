"""The resource models: wire names, round trips, kind names.

The hypothesis strategies here build valid resources as wire-form dicts (camelCase, as a user
writes them); the loader and schema tests import them.
"""

from __future__ import annotations

import copy
import math
from datetime import datetime
from typing import Any

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pollen.resources import (
    API_VERSION,
    KIND_MODELS,
    Artifact,
    ObjectMeta,
    Replica,
    ReplicaSpec,
    Resource,
    ResourceRequirements,
    UnknownKindError,
    Workload,
    WorkloadSpec,
    from_dict,
    resolve_kind,
    to_dict,
)

# --- Strategies: valid resources as dicts -----------------------------------------------------

names = st.from_regex(
    r"\A[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,8}[a-z0-9])?)?\Z"
)
label_keys = st.from_regex(
    r"\A([a-z0-9]([-a-z0-9]{0,8}[a-z0-9])?(\.[a-z]{1,5})?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,10}[A-Za-z0-9])?\Z"
)
label_values = st.from_regex(r"\A([A-Za-z0-9]([-A-Za-z0-9_.]{0,10}[A-Za-z0-9])?)?\Z")
labels = st.dictionaries(label_keys, label_values, max_size=4)
env_names = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,15}\Z")
text = st.text(max_size=30)
short_ints = st.integers(min_value=0, max_value=10_000)
big_ints = st.integers(min_value=0, max_value=2**53)
digests = st.from_regex(r"\Asha256:[0-9a-f]{64}\Z")
timestamps = st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1)).map(
    lambda moment: moment.strftime("%Y-%m-%dT%H:%M:%SZ")
)

conditions = st.fixed_dictionaries(
    {
        "type": st.text(min_size=1, max_size=20),
        "status": st.sampled_from(["True", "False", "Unknown"]),
    },
    optional={
        "reason": text,
        "message": text,
        "lastTransitionTime": timestamps,
        "observedGeneration": big_ints,
    },
)
metadata = st.fixed_dictionaries(
    {"name": names},
    optional={
        "labels": labels,
        "annotations": st.dictionaries(text, text, max_size=3),
        "uid": st.text(max_size=36),
        "generation": big_ints,
        "creationTimestamp": timestamps,
        "finalizers": st.lists(st.text(min_size=1, max_size=20), max_size=2),
    },
)
replica_counts = st.one_of(
    st.just({}),
    short_ints.map(lambda n: {"replicas": n}),
    st.tuples(short_ints, short_ints).map(
        lambda pair: {"minReplicas": min(pair), "maxReplicas": max(pair)}
    ),
    short_ints.map(lambda n: {"minReplicas": n}),
)
workload_specs = st.tuples(
    st.fixed_dictionaries(
        {
            # A name, a digest, or a local path (which is any text after "./").
            "artifact": st.one_of(
                names, digests, st.text(min_size=1, max_size=30).map(lambda t: "./" + t)
            )
        },
        optional={
            "executor": st.sampled_from(["http", "command"]),
            "resources": st.fixed_dictionaries(
                {},
                optional={
                    "memoryMB": st.integers(1, 1_048_576),
                    "cpuMillis": st.integers(1, 1_024_000),
                    "timeoutMs": st.integers(1, 86_400_000),
                },
            ),
            "env": st.dictionaries(env_names, text, max_size=4),
            "args": st.lists(text, max_size=4),
            "placement": st.fixed_dictionaries(
                {},
                optional={
                    "nodeSelector": labels,
                    "spread": st.sampled_from(["none", "preferred", "strict"]),
                },
            ),
            "budget": st.fixed_dictionaries(
                {},
                optional={"maxInstances": short_ints, "cpuMillis": big_ints, "memoryMB": big_ints},
            ),
            "priority": st.integers(-1000, 1000),
            "healthPath": text.map(lambda path: "/" + path),
        },
    ),
    replica_counts,
).map(lambda parts: {**parts[0], **parts[1]})
statuses = st.fixed_dictionaries(
    {}, optional={"observedGeneration": big_ints, "conditions": st.lists(conditions, max_size=2)}
)


def _resource(
    kind: str, spec: st.SearchStrategy[Any], status: st.SearchStrategy[Any]
) -> st.SearchStrategy[dict[str, Any]]:
    required = {"apiVersion": st.just(API_VERSION), "kind": st.just(kind), "metadata": metadata}
    optional = {"status": status}
    # A Node's spec has a default; every other kind needs one.
    (optional if kind == "Node" else required)["spec"] = spec
    return st.fixed_dictionaries(required, optional=optional)


workloads = _resource(
    "Workload",
    workload_specs,
    st.tuples(
        statuses,
        st.fixed_dictionaries({}, optional={"replicas": big_ints, "readyReplicas": big_ints}),
    ).map(lambda parts: {**parts[0], **parts[1]}),
)
replicas = _resource(
    "Replica",
    st.fixed_dictionaries(
        {"workload": names},
        optional={
            "workloadGeneration": big_ints,
            "artifact": text,
            "node": names,
            "score": st.floats(allow_nan=False, allow_infinity=False),
        },
    ),
    st.tuples(
        statuses,
        st.fixed_dictionaries(
            {},
            optional={
                "phase": st.sampled_from(
                    ["Pending", "Fetching", "Starting", "Ready", "Draining", "Stopped", "Failed"]
                ),
                "node": names,
                "message": text,
            },
        ),
    ).map(lambda parts: {**parts[0], **parts[1]}),
)
artifacts = _resource(
    "Artifact",
    st.fixed_dictionaries(
        {"digest": digests, "size": big_ints},
        optional={"mediaType": text, "version": text, "signer": text, "signature": text},
    ),
    statuses,
)
nodes = _resource(
    "Node",
    st.fixed_dictionaries(
        {},
        optional={
            "addresses": st.lists(text, max_size=3),
            "capacity": st.fixed_dictionaries(
                {}, optional={"memoryMB": big_ints, "cpuMillis": big_ints}
            ),
            "unschedulable": st.booleans(),
        },
    ),
    st.tuples(statuses, st.fixed_dictionaries({}, optional={"api": text, "version": text})).map(
        lambda parts: {**parts[0], **parts[1]}
    ),
)
resource_dicts = st.one_of(workloads, replicas, artifacts, nodes)
"""Any valid resource, as the dict a user would write."""


# --- Examples ---------------------------------------------------------------------------------

EXAMPLES: dict[str, dict[str, Any]] = {
    "Workload": {
        "apiVersion": API_VERSION,
        "kind": "Workload",
        "metadata": {"name": "hello", "labels": {"app": "hello"}},
        "spec": {
            "artifact": "hello",
            "replicas": 2,
            "executor": "http",
            "resources": {"memoryMB": 32, "cpuMillis": 250, "timeoutMs": 5000},
            "env": {"GREETING": "hi"},
            "args": ["--verbose"],
            "placement": {"nodeSelector": {"zone": "a"}, "spread": "strict"},
            "budget": {"maxInstances": 4, "cpuMillis": 1000, "memoryMB": 256},
        },
        "status": {"replicas": 2, "readyReplicas": 1},
    },
    "Replica": {
        "apiVersion": API_VERSION,
        "kind": "Replica",
        "metadata": {"name": "hello-0"},
        "spec": {"workload": "hello", "workloadGeneration": 3, "node": "node-1", "score": 0.5},
        "status": {"phase": "Ready", "node": "node-1"},
    },
    "Artifact": {
        "apiVersion": API_VERSION,
        "kind": "Artifact",
        "metadata": {"name": "hello"},
        "spec": {"digest": "sha256:" + "ab" * 32, "size": 22_000, "signer": "ed25519:abc"},
    },
    "Node": {
        "apiVersion": API_VERSION,
        "kind": "Node",
        "metadata": {"name": "node-1", "labels": {"zone": "a"}},
        "spec": {
            "addresses": ["127.0.0.1:7000"],
            "capacity": {"memoryMB": 4096, "cpuMillis": 2000},
        },
        "status": {
            "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-02T03:04:05Z"}
            ]
        },
    },
    "TrustPolicy": {
        "apiVersion": API_VERSION,
        "kind": "TrustPolicy",
        "metadata": {"name": "cluster"},
        "spec": {
            "allowUnsigned": False,
            "trustedSigners": ["ed25519:" + "A" * 43 + "="],
        },
    },
}


@pytest.mark.parametrize("kind", sorted(KIND_MODELS))
def test_every_kind_round_trips(kind: str) -> None:
    resource = from_dict(EXAMPLES[kind])
    assert isinstance(resource, KIND_MODELS[kind])
    assert from_dict(to_dict(resource)) == resource
    # What the user wrote comes back, plus defaults.
    assert _is_subset(EXAMPLES[kind], to_dict(resource))


@pytest.mark.parametrize("kind", sorted(KIND_MODELS))
def test_minimal_resource_of_every_kind_round_trips(kind: str) -> None:
    minimal = {
        "Workload": {"artifact": "a"},
        "Replica": {"workload": "w"},
        "Artifact": {"digest": "sha256:" + "0" * 64, "size": 0},
        "Node": {},
        "TrustPolicy": {},
    }[kind]
    name = "cluster" if kind == "TrustPolicy" else "x"
    resource = from_dict(
        {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": minimal}
    )
    assert from_dict(to_dict(resource)) == resource


def test_replica_with_default_artifact_round_trips() -> None:
    # The default "" used to break its own min_length=1 and fail when read back.
    replica = Replica(metadata=ObjectMeta(name="r"), spec=ReplicaSpec(workload="w"))
    assert from_dict(to_dict(replica)) == replica


@pytest.mark.parametrize("score", [math.nan, math.inf, -math.inf])
def test_replica_score_must_be_finite(score: float) -> None:
    with pytest.raises(pydantic.ValidationError):
        ReplicaSpec(workload="w", score=score)


@given(resource_dicts)
@settings(deadline=None)
def test_generated_resources_round_trip(data: dict[str, Any]) -> None:
    resource = from_dict(copy.deepcopy(data))
    dumped = to_dict(resource)
    assert from_dict(dumped) == resource
    assert to_dict(from_dict(dumped)) == dumped
    assert _is_subset(data, dumped)


def test_wire_names_are_camel_case() -> None:
    dumped = to_dict(from_dict(EXAMPLES["Workload"]))
    assert dumped["apiVersion"] == API_VERSION
    assert dumped["spec"]["resources"] == {"memoryMB": 32, "cpuMillis": 250, "timeoutMs": 5000}
    assert dumped["spec"]["placement"]["nodeSelector"] == {"zone": "a"}
    assert dumped["spec"]["budget"]["memoryMB"] == 256
    assert dumped["status"]["readyReplicas"] == 1
    node = to_dict(from_dict(EXAMPLES["Node"]))
    assert node["spec"]["capacity"] == {"memoryMB": 4096, "cpuMillis": 2000}
    assert "lastTransitionTime" in node["status"]["conditions"][0]


def test_python_names_populate_too() -> None:
    requirements = ResourceRequirements(memory_mb=10, cpu_millis=20, timeout_ms=30)
    assert requirements == ResourceRequirements.model_validate(
        {"memoryMB": 10, "cpuMillis": 20, "timeoutMs": 30}
    )
    workload = Workload(metadata=ObjectMeta(name="a"), spec=WorkloadSpec(artifact="x"))
    assert to_dict(workload)["spec"]["resources"]["memoryMB"] == 64


def test_none_values_are_left_out() -> None:
    dumped = to_dict(from_dict(EXAMPLES["Artifact"]))
    assert "version" not in dumped["spec"]
    assert "uid" not in dumped["metadata"]


def test_unknown_fields_are_rejected_everywhere() -> None:
    for path in (("bogus",), ("metadata", "bogus"), ("spec", "bogus"), ("spec", "resources", "x")):
        data = copy.deepcopy(EXAMPLES["Workload"])
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = 1
        with pytest.raises(pydantic.ValidationError, match="Extra inputs"):
            from_dict(data)


def test_models_are_frozen() -> None:
    resource = from_dict(EXAMPLES["Artifact"])
    assert isinstance(resource, Artifact)
    with pytest.raises(pydantic.ValidationError):
        resource.spec.size = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("Workload", "Workload"),
        ("workloads", "Workload"),
        ("wl", "Workload"),
        ("WL", "Workload"),
        ("replica", "Replica"),
        ("rep", "Replica"),
        ("artifacts", "Artifact"),
        ("art", "Artifact"),
        ("nodes", "Node"),
        ("no", "Node"),
    ],
)
def test_resolve_kind(name: str, kind: str) -> None:
    assert resolve_kind(name) == kind


def test_resolve_kind_unknown_lists_known_kinds() -> None:
    with pytest.raises(UnknownKindError, match="Artifact, Node, Replica, TrustPolicy, Workload"):
        resolve_kind("pods")


def test_key_and_desired_replicas() -> None:
    resource = from_dict(EXAMPLES["Workload"])
    assert isinstance(resource, Resource)
    assert resource.key == ("Workload", "hello")
    assert isinstance(resource, Workload)
    assert resource.spec.desired_replicas == 2
    auto = WorkloadSpec(artifact="x", min_replicas=3, max_replicas=5)
    assert auto.desired_replicas == 3
    assert WorkloadSpec(artifact="x").desired_replicas == 1


def _is_subset(part: Any, whole: Any) -> bool:
    """Whether every key and value in ``part`` is in ``whole`` (lists compared item by item)."""
    if isinstance(part, dict):
        return isinstance(whole, dict) and all(
            key in whole and _is_subset(value, whole[key]) for key, value in part.items()
        )
    if isinstance(part, list):
        return (
            isinstance(whole, list)
            and len(part) == len(whole)
            and all(_is_subset(a, b) for a, b in zip(part, whole, strict=True))
        )
    return bool(part == whole)
