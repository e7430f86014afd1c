"""What pctl prints, from API objects alone: tables, ages, -o formats, describe, diff, parsing."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml

from pollen.cli import pctl
from pollen.cli.pctl import (
    CliError,
    TableWriter,
    WaitFor,
    apply_line,
    describe,
    format_age,
    format_objects,
    human_duration,
    human_size,
    object_table,
    parse_duration,
    parse_wait_for,
    resolve,
    short_digest,
    split_ref,
    unified_diff,
)

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
DIGEST = "sha256:" + "ab12" * 16


def ago(**delta: float) -> str:
    return (NOW - timedelta(**delta)).strftime("%Y-%m-%dT%H:%M:%SZ")


def meta(name: str, created: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "uid": f"uid-{name}", "creationTimestamp": created, **extra}


def workload(name: str = "hello", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "pollen.dev/v1alpha1",
        "kind": "Workload",
        "metadata": meta(name, ago(minutes=5), generation=2, labels={"app": name}),
        "spec": {
            "artifact": DIGEST,
            "replicas": 3,
            "executor": "http",
            "resources": {"memoryMB": 64, "cpuMillis": 250, "timeoutMs": 30000},
            "env": {"GREETING": "hi"},
            "placement": {"nodeSelector": {"zone": "a", "disk": "ssd"}, "spread": "preferred"},
            **spec,
        },
        "status": {
            "observedGeneration": 2,
            "replicas": 3,
            "readyReplicas": 2,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": "ReplicasNotReady",
                    "message": "2/3 replicas ready",
                    "lastTransitionTime": ago(minutes=1),
                    "observedGeneration": 2,
                }
            ],
        },
    }


def replica(name: str = "hello-0") -> dict[str, Any]:
    return {
        "apiVersion": "pollen.dev/v1alpha1",
        "kind": "Replica",
        "metadata": meta(name, ago(hours=3)),
        "spec": {"workload": "hello", "artifact": DIGEST, "node": "node-2", "score": 0.8125},
        "status": {"phase": "Ready", "node": "node-2", "conditions": []},
    }


def artifact(name: str = "hello-wasm", size: int = 22 * 1024) -> dict[str, Any]:
    return {
        "apiVersion": "pollen.dev/v1alpha1",
        "kind": "Artifact",
        "metadata": meta(name, ago(days=2)),
        "spec": {"digest": DIGEST, "size": size, "signer": "ed25519:abc"},
        "status": {"conditions": []},
    }


def node(name: str = "node-1", ready: str | None = "True") -> dict[str, Any]:
    conditions = [] if ready is None else [{"type": "Ready", "status": ready}]
    return {
        "apiVersion": "pollen.dev/v1alpha1",
        "kind": "Node",
        "metadata": meta(name, ago(seconds=45), labels={"pollen.dev/hostname": name}),
        "spec": {
            "addresses": ["http://127.0.0.1:7070", "10.0.0.1:7946"],
            "capacity": {"memoryMB": 16384, "cpuMillis": 4000},
        },
        "status": {"conditions": conditions, "api": "http://127.0.0.1:7070"},
    }


def lines(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()]


# --- kinds ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "plural"),
    [
        ("workload", "Workload", "workloads"),
        ("Workloads", "Workload", "workloads"),
        ("wl", "Workload", "workloads"),
        ("workloads.pollen.dev", "Workload", "workloads"),
        ("rep", "Replica", "replicas"),
        ("art", "Artifact", "artifacts"),
        ("no", "Node", "nodes"),
        ("node", "Node", "nodes"),
    ],
)
def test_resolve_kind(name: str, kind: str, plural: str) -> None:
    info = resolve(name)
    assert (info.kind, info.plural) == (kind, plural)


def test_unknown_kind_is_a_cli_error_listing_the_kinds() -> None:
    with pytest.raises(CliError, match='unknown kind "pods"; known kinds: Artifact, Node'):
        resolve("pods")


def test_kind_table_matches_the_models() -> None:
    from pollen.resources.models import KIND_MODELS

    assert {
        kind: (model.PLURAL, model.SHORT_NAMES) for kind, model in KIND_MODELS.items()
    } == pctl.KINDS


def test_split_ref() -> None:
    assert split_ref("wl/hello", []) == (resolve("wl"), ["hello"])
    assert split_ref("wl", ["a", "b"]) == (resolve("wl"), ["a", "b"])
    with pytest.raises(CliError):
        split_ref("wl/", [])
    with pytest.raises(CliError):
        split_ref("wl/a", ["b"])


# --- ages and sizes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (-0.7, "0s"),
        (-5, "<invalid>"),
        (45, "45s"),
        (119, "119s"),
        (120, "2m"),
        (330, "5m30s"),
        (600, "10m"),
        (179 * 60, "179m"),
        (3 * 3600, "3h"),
        (3 * 3600 + 25 * 60, "3h25m"),
        (20 * 3600, "20h"),
        (2 * 86400, "2d"),
        (2 * 86400 + 5 * 3600, "2d5h"),
        (30 * 86400, "30d"),
        (3 * 365 * 86400 + 10 * 86400, "3y10d"),
        (9 * 365 * 86400, "9y"),
    ],
)
def test_human_duration_matches_kubectl(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


def test_format_age() -> None:
    assert format_age(ago(minutes=5), NOW) == "5m"
    assert format_age(ago(hours=3), NOW) == "3h"
    assert format_age(ago(days=2), NOW) == "2d"
    assert format_age("2026-11-23T11:59:30.6+00:00", NOW) == "29s"
    assert format_age(None, NOW) == "<unknown>"
    assert format_age("yesterday", NOW) == "<unknown>"


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0B"), (512, "512B"), (22 * 1024, "22KiB"), (1536 * 1024, "1.5MiB"), (3 << 30, "3.0GiB")],
)
def test_human_size(size: int, text: str) -> None:
    assert human_size(size) == text


def test_short_digest() -> None:
    assert short_digest(DIGEST) == "sha256:ab12ab12ab12"
    assert short_digest("hello-wasm") == "hello-wasm"


# --- tables -----------------------------------------------------------------------------------


def test_workload_table() -> None:
    text = object_table([workload()], "Workload", NOW)
    assert lines(text) == [
        ["NAME", "READY", "EXECUTOR", "ARTIFACT", "AGE"],
        ["hello", "2/3", "http", "sha256:ab12ab12ab12", "5m"],
    ]


def test_workload_table_wide() -> None:
    text = object_table([workload()], "Workload", NOW, wide=True)
    header, row = lines(text)
    assert header == [
        "NAME", "READY", "EXECUTOR", "ARTIFACT", "AGE", "GENERATION", "MEMORY", "CPU", "SELECTOR",
    ]  # fmt: skip
    assert row[5:] == ["2", "64MB", "250m", "disk=ssd,zone=a"]


def test_workload_desired_replicas_defaults() -> None:
    obj = workload()
    del obj["spec"]["replicas"]
    obj["spec"]["minReplicas"] = 2
    assert lines(object_table([obj], "Workload", NOW))[1][1] == "2/2"
    del obj["spec"]["minReplicas"]
    assert lines(object_table([obj], "Workload", NOW))[1][1] == "2/1"


def test_replica_table() -> None:
    assert lines(object_table([replica()], "Replica", NOW)) == [
        ["NAME", "WORKLOAD", "NODE", "PHASE", "AGE"],
        ["hello-0", "hello", "node-2", "Ready", "3h"],
    ]
    wide = lines(object_table([replica()], "Replica", NOW, wide=True))
    assert wide[0][5:] == ["SCORE", "ARTIFACT"]
    assert wide[1][5:] == ["0.81", "sha256:ab12ab12ab12"]


def test_replica_without_status_is_pending_on_no_node() -> None:
    obj = replica()
    obj["status"] = {}
    del obj["spec"]["node"]
    assert lines(object_table([obj], "Replica", NOW))[1][2:4] == ["<none>", "Pending"]


def test_artifact_table() -> None:
    assert lines(object_table([artifact()], "Artifact", NOW)) == [
        ["NAME", "DIGEST", "SIZE", "AGE"],
        ["hello-wasm", "sha256:ab12ab12ab12", "22KiB", "2d"],
    ]
    # A signer without a signature is a claim nobody checked.
    wide = lines(object_table([artifact()], "Artifact", NOW, wide=True))
    assert wide == [
        ["NAME", "DIGEST", "SIZE", "AGE", "SIGNER", "HOLDERS"],
        ["hello-wasm", "sha256:ab12ab12ab12", "22KiB", "2d", "<unsigned>", "<none>"],
    ]
    signed = artifact()
    signed["spec"].update(signer="ed25519:" + "Ab" * 21 + "A=", signature="c2ln")
    signed["status"]["holders"] = ["node-1", "node-3"]
    assert lines(object_table([signed], "Artifact", NOW, wide=True))[1][-2:] == [
        "ed25519:AbAbAbAbAbAb",
        "node-1,node-3",
    ]


def test_trust_policy_table() -> None:
    key = "ed25519:" + "Q" * 43 + "="
    policy = {
        "apiVersion": "pollen.dev/v1alpha1",
        "kind": "TrustPolicy",
        "metadata": meta("cluster", ago(hours=1)),
        "spec": {"allowUnsigned": False, "trustedSigners": [key]},
    }
    assert lines(object_table([policy], "TrustPolicy", NOW, wide=True)) == [
        ["NAME", "UNSIGNED", "SIGNERS", "AGE", "TRUSTED"],
        ["cluster", "Refused", "1", "60m", "ed25519:QQQQQQQQQQQQ"],
    ]


@pytest.mark.parametrize(
    ("ready", "status"),
    [("True", "Ready"), ("False", "NotReady"), ("Unknown", "Unknown"), (None, "Unknown")],
)
def test_node_status_from_ready_condition(ready: str | None, status: str) -> None:
    assert lines(object_table([node(ready=ready)], "Node", NOW)) == [
        ["NAME", "STATUS", "ADDRESSES", "AGE"],
        ["node-1", status, "http://127.0.0.1:7070,10.0.0.1:7946", "45s"],
    ]


def test_node_table_wide() -> None:
    header, row = lines(object_table([node()], "Node", NOW, wide=True))
    assert header[4:] == ["RTT", "CPU", "MEMORY", "LABELS", "API"]
    assert row[4:] == [
        "<none>",
        "4",
        "16384MB",
        "pollen.dev/hostname=node-1",
        "http://127.0.0.1:7070",
    ]


def test_node_table_wide_shows_the_estimated_rtt() -> None:
    obj = node()
    obj["status"]["estimatedRTTMs"] = 12.345
    _, row = lines(object_table([obj], "Node", NOW, wide=True))
    assert row[4] == "12.3ms"


def test_unschedulable_node() -> None:
    obj = node()
    obj["spec"]["unschedulable"] = True
    assert lines(object_table([obj], "Node", NOW))[1][1] == "Ready,SchedulingDisabled"


def test_table_layout_is_kubectl_like() -> None:
    text = object_table([workload("a"), workload("long-name")], "Workload", NOW)
    header, first, second = text.splitlines()
    # No box characters, three spaces between columns, columns aligned, no trailing blanks.
    assert header.startswith("NAME        READY   EXECUTOR")
    assert first.index("2/3") == second.index("2/3") == header.index("READY")
    assert not any(line != line.rstrip() for line in text.splitlines())
    assert not set("│─┃━┏┓") & set(text)


def test_table_cells_cannot_carry_control_characters() -> None:
    obj = node()
    obj["metadata"]["labels"] = {"x": "a\x1b[31mred\nb"}
    text = object_table([obj], "Node", NOW, wide=True)
    assert "\x1b" not in text
    assert len(text.splitlines()) == 2


def test_wide_characters_are_aligned_by_display_width() -> None:
    writer = TableWriter(["A", "B"])
    out = writer.render([["日本", "x"], ["ab", "y"]])
    assert out[1].index("x") + 2 == out[2].index("y")  # two wide glyphs take four columns


def test_table_writer_keeps_widths_for_later_rows() -> None:
    writer = TableWriter(["NAME", "PHASE"])
    first = writer.render([["hello-0", "Ready"]])
    later = writer.render([["h", "Failed"]])
    assert len(first) == 2
    assert later == ["h         Failed"]


# --- -o json|yaml|name ------------------------------------------------------------------------


def test_output_name() -> None:
    out = format_objects([workload("a"), workload("b")], "name", single=False)
    assert out == "workload/a\nworkload/b"


def test_output_json_of_a_list_is_a_list_object() -> None:
    doc = json.loads(format_objects([workload("a")], "json", single=False))
    assert doc["apiVersion"] == "pollen.dev/v1alpha1"
    assert doc["kind"] == "List"
    assert [item["metadata"]["name"] for item in doc["items"]] == ["a"]


def test_output_json_of_one_object_is_the_object() -> None:
    obj = workload()
    assert json.loads(format_objects([obj], "json", single=True)) == obj


def test_output_yaml() -> None:
    doc = yaml.safe_load(format_objects([workload("a"), replica()], "yaml", single=False))
    assert doc["kind"] == "List"
    assert [item["kind"] for item in doc["items"]] == ["Workload", "Replica"]
    obj = workload()
    text = format_objects([obj], "yaml", single=True)
    assert yaml.safe_load(text) == obj
    assert text.startswith("apiVersion: pollen.dev/v1alpha1\nkind: Workload\nmetadata:")


def test_empty_list_in_json() -> None:
    assert json.loads(format_objects([], "json", single=False))["items"] == []


# --- describe ---------------------------------------------------------------------------------


def test_describe() -> None:
    events = [
        {
            "type": "Normal",
            "reason": "Created",
            "message": 'workload "hello" created by apply',
            "involvedObject": {"kind": "Workload", "name": "hello"},
            "timestamp": ago(minutes=5),
            "node": "node-1",
            "count": 1,
        }
    ]
    text = describe(workload(), events, NOW)
    assert text.startswith("Name:         hello\nKind:         Workload\n")
    assert "Labels:       app=hello\n" in text
    assert "Annotations:  <none>\n" in text
    assert f"Created:      {ago(minutes=5)} (5m ago)\n" in text
    assert "Generation:   2\n" in text
    assert "\nSpec:\n  Artifact:  " + DIGEST + "\n" in text
    # Field names are titled; user keys (env names, selector labels) are kept as written.
    assert "\n  Resources:\n    Memory MB:   64\n    Cpu Millis:  250\n" in text
    assert "\n  Env:\n    GREETING:  hi\n" in text
    assert "\n    Node Selector:\n      zone:  a\n" in text
    assert "\nStatus:\n  Observed Generation:  2\n" in text
    conditions = text[text.index("  Conditions:") :].splitlines()
    assert conditions[1].split() == [
        "Type", "Status", "Reason", "ObservedGeneration", "LastTransition", "Message",
    ]  # fmt: skip
    assert conditions[2].split()[0] == "----"
    assert conditions[3].split() == [
        "Ready", "False", "ReplicasNotReady", "2", "60s", "ago", "2/3", "replicas", "ready",
    ]  # fmt: skip
    tail = text[text.index("Events:") :].splitlines()
    assert tail[1].split() == ["Type", "Reason", "Age", "From", "Message"]
    assert tail[3].split()[:4] == ["Normal", "Created", "5m", "node-1"]


def test_describe_without_events_or_status() -> None:
    obj = {"kind": "Node", "apiVersion": "pollen.dev/v1alpha1", "metadata": {"name": "n"}}
    text = describe(obj, [], NOW)
    assert "Created:      <unknown>" in text
    assert "Spec:  <none>" in text
    assert "Status:  <none>" in text
    assert text.endswith("Events:  <none>")


def test_describe_lists() -> None:
    text = describe(node(), [], NOW)
    assert "\n  Addresses:\n    http://127.0.0.1:7070\n    10.0.0.1:7946\n" in text


# --- apply, diff, wait ------------------------------------------------------------------------


def test_apply_lines() -> None:
    result = {"kind": "Workload", "name": "hello", "action": "created", "object": {}}
    assert apply_line(result) == "workload.pollen.dev/hello created"
    result["action"] = "configured"
    assert apply_line(result, dry_run=True) == "workload.pollen.dev/hello configured (dry run)"


def test_diff_of_user_owned_parts_only() -> None:
    live = workload()
    merged = workload(replicas=5)
    merged["status"] = {"readyReplicas": 0}  # status is the node's, never part of a diff
    merged["metadata"]["generation"] = 3
    text = unified_diff(live, merged, "workload.pollen.dev/hello")
    assert text.startswith(
        "--- live/workload.pollen.dev/hello\n+++ merged/workload.pollen.dev/hello\n"
    )
    changed = [line for line in text.splitlines()[2:] if line[:1] in "+-"]
    assert changed == ["-  replicas: 3", "+  replicas: 5"]


def test_no_diff_when_only_status_differs() -> None:
    merged = workload()
    merged["status"] = {}
    assert unified_diff(workload(), merged, "x") == ""


def test_diff_of_a_new_object_adds_everything() -> None:
    text = unified_diff(None, workload(), "x")
    assert "+kind: Workload" in text
    assert not [line for line in text.splitlines()[2:] if line.startswith("-")]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("2m", 120), ("1h", 3600), ("45", 45), ("1.5", 1.5), ("1m30s", 90),
     ("500ms", 0.5), ("0", 0)],
)  # fmt: skip
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "10x", "-5", "5s10", "s", "nan", "inf"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(CliError, match="invalid duration"):
        parse_duration(text)


def test_parse_wait_for() -> None:
    assert parse_wait_for("condition=Ready") == WaitFor(condition="Ready", status="True")
    assert parse_wait_for("condition=Ready=false") == WaitFor(condition="Ready", status="False")
    assert parse_wait_for("delete") == WaitFor(delete=True)
    assert parse_wait_for("create") == WaitFor(create=True)
    assert WaitFor(create=True).met({"metadata": {"name": "x"}})
    for bad in ("ready", "condition=", "condition=Ready=maybe", "jsonpath={.x}"):
        with pytest.raises(CliError, match="unrecognised --for"):
            parse_wait_for(bad)


def test_wait_condition_must_describe_the_current_generation() -> None:
    obj = workload()
    ready = WaitFor(condition="Ready")
    assert not ready.met(obj)  # Ready is False
    obj["status"]["conditions"][0]["status"] = "True"
    assert ready.met(obj)
    obj["metadata"]["generation"] = 3  # a newer spec that no reconciler has looked at yet
    assert not ready.met(obj)
    assert WaitFor(condition="Ready", status="False").met(workload())
    assert not ready.met(replica())  # no Ready condition at all


def test_apply_error_from_the_node_points_at_the_file_and_document() -> None:
    from pollen.api.errors import ApiError
    from pollen.resources.loader import load_bytes

    text = "\n".join(
        yaml.safe_dump(workload(name), sort_keys=False) for name in ("a", "web")
    ).replace("apiVersion", "---\napiVersion")
    loaded = load_bytes(text.encode(), "manifests/web.yaml")
    error = ApiError(
        422,
        "Invalid",
        'items[1] (Workload "web"): spec.replicas: must be >= 0',
        {"index": 1, "field": "spec.replicas"},
    )
    message = str(pctl._apply_error(error, loaded))
    line = loaded[1].location.line
    assert message == (
        f'manifests/web.yaml: document 2, line {line}: Workload "web": spec.replicas: must be >= 0'
    )
    # Without a usable index the node's sentence is passed on as it is.
    assert str(pctl._apply_error(ApiError(409, "Conflict", "busy"), loaded)) == "busy"
