"""StateDocument: JSON round trips, differential writes, and which resources a change touched."""

from __future__ import annotations

from typing import Any

import pytest
from automerge import core as am
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pollen.state.document import (
    GENESIS_CHANGE,
    KINDS,
    DocumentError,
    StateDocument,
    _Unparsable,
)


def workload(name: str, replicas: int = 1, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "pollen.dev/v1alpha1",
        "kind": "Workload",
        "metadata": {
            "name": name,
            "uid": "2f1c1f9e-3b1a-4d43-9d55-7c3a4f0f0e11",
            "labels": {"app": name},
            "annotations": {},
            "generation": 1,
            "creationTimestamp": "2026-11-01T10:00:00Z",
            "finalizers": [],
        },
        "spec": {
            "artifact": "sha256:" + "a" * 64,
            "replicas": replicas,
            "executor": "http",
            "resources": {"memoryMB": 64, "cpuMillis": 100, "timeoutMs": 30000},
            "env": {"GREETING": "hello"},
            "args": ["--port", "8080"],
            **spec,
        },
        "status": {
            "conditions": [
                {"type": "Ready", "status": "False", "reason": "Pending", "message": ""}
            ],
            "replicas": 0,
            "readyReplicas": 0,
        },
    }


def change_count(doc: StateDocument, since: list[bytes]) -> int:
    return len(doc.automerge.get_changes(since))


def test_genesis_change_is_reproducible() -> None:
    # How GENESIS_CHANGE was made; if this ever differs, every node must still load the
    # hard-coded bytes, never rebuild them.
    doc = am.Document(actor_id=b"pollen.genesis\x00\x00")
    with doc.transaction() as tx:
        resources = tx.put_object(am.ROOT, "resources", am.ObjType.Map)
        for kind in KINDS:
            tx.put_object(resources, kind, am.ObjType.Map)
    assert doc.get_changes([])[0].bytes == GENESIS_CHANGE
    assert StateDocument.new().heads() == doc.get_heads()


def test_new_documents_share_the_kind_maps() -> None:
    # Two nodes starting independently must write into the same maps, or a merge would hide
    # one side's resources behind a conflict.
    a, b = StateDocument.new(), StateDocument.new()
    assert a.actor_id != b.actor_id
    a.write("Workload", "from-a", workload("from-a"))
    b.write("Workload", "from-b", workload("from-b"))
    a.merge(b)
    assert a.names("Workload") == ["from-a", "from-b"]


def test_round_trip_keeps_json_types() -> None:
    doc = StateDocument.new()
    obj: dict[str, Any] = {
        "bool": True,
        "false": False,
        "int": 1,
        "negative": -(2**63),
        "big": 2**64 - 1,
        "float": 1.0,
        "none": None,
        "text": 'héllo "quoted" \n',
        "nested": {"list": [1, "two", {"three": [3.5, None, False]}], "empty": {}},
        "emptyList": [],
    }
    doc.write("Workload", "types", obj)
    back = doc.read("Workload", "types")
    assert back == obj
    assert back is not None
    assert type(back["bool"]) is bool
    assert type(back["int"]) is int
    assert type(back["float"]) is float


def test_read_of_absent_and_names() -> None:
    doc = StateDocument.new()
    assert doc.read("Workload", "nope") is None
    assert doc.read("NoSuchKind", "nope") is None
    assert doc.names("Workload") == []
    doc.write("Workload", "b", workload("b"))
    doc.write("Workload", "a", workload("a"))
    assert doc.names("Workload") == ["a", "b"]
    assert doc.kinds() == sorted(KINDS)


def test_unknown_kind_gets_a_map() -> None:
    doc = StateDocument.new()
    doc.write("Gadget", "g", {"x": 1})
    assert doc.read("Gadget", "g") == {"x": 1}
    assert "Gadget" in doc.kinds()


@pytest.mark.parametrize(
    "bad", [{1, 2}, float("nan"), float("inf"), 2**64, -(2**63) - 1, b"bytes", {1: "x"}]
)
def test_values_that_are_not_json_are_refused_before_writing(bad: object) -> None:
    doc = StateDocument.new()
    heads = doc.heads()
    with pytest.raises(DocumentError):
        doc.write("Workload", "bad", {"ok": 1, "bad": bad})
    assert doc.heads() == heads


def test_an_unchanged_write_makes_no_change() -> None:
    doc = StateDocument.new()
    doc.write("Workload", "hello", workload("hello"))
    heads = doc.heads()
    doc.write("Workload", "hello", workload("hello"))
    assert doc.heads() == heads


def test_type_changes_are_written_even_when_python_says_equal() -> None:
    doc = StateDocument.new()
    doc.write("Workload", "t", {"v": 1})
    doc.write("Workload", "t", {"v": True})
    assert doc.read("Workload", "t") == {"v": True}
    assert type(doc.read("Workload", "t")["v"]) is bool  # type: ignore[index]
    doc.write("Workload", "t", {"v": 1.0})
    assert type(doc.read("Workload", "t")["v"]) is float  # type: ignore[index]
    doc.write("Workload", "t", {"v": [1]})
    heads = doc.heads()
    doc.write("Workload", "t", {"v": [True]})
    assert doc.heads() != heads
    assert doc.read("Workload", "t") == {"v": [True]}


def test_write_deletes_removed_keys_and_replaces_changed_shapes() -> None:
    doc = StateDocument.new()
    doc.write("Workload", "w", {"a": {"b": 1, "c": 2}, "d": [1, 2], "e": "x"})
    doc.write("Workload", "w", {"a": {"b": 1}, "d": {"now": "a map"}, "f": [{"g": 1}]})
    assert doc.read("Workload", "w") == {"a": {"b": 1}, "d": {"now": "a map"}, "f": [{"g": 1}]}
    doc.write("Workload", "w", {"a": "scalar"})
    assert doc.read("Workload", "w") == {"a": "scalar"}


def test_one_field_update_is_a_small_change() -> None:
    doc = StateDocument.new()
    doc.write("Workload", "hello", workload("hello"))
    heads = doc.heads()
    doc.write("Workload", "hello", workload("hello", replicas=5))
    assert len(doc.changes_since(heads)) < 200
    # An equal list is not rewritten; a different one is replaced.
    heads = doc.heads()
    doc.write("Workload", "hello", workload("hello", replicas=5, args=["--port", "8080"]))
    assert doc.heads() == heads
    doc.write("Workload", "hello", workload("hello", replicas=5, args=["--port", "9090"]))
    assert doc.read("Workload", "hello")["spec"]["args"] == ["--port", "9090"]  # type: ignore[index]


def test_thousand_updates_of_one_field_keep_the_document_small() -> None:
    doc = StateDocument.new()
    for i in range(1000):
        doc.write("Workload", f"w-{i}", workload(f"w-{i}"))
    base = len(doc.save())
    for i in range(1000):
        doc.write("Workload", "w-7", workload("w-7", replicas=2 + i % 50))
    grown = len(doc.save()) - base
    # Measured: about 150 bytes for the thousand updates. Rewriting the object each time would
    # add its whole content a thousand times over (hundreds of kilobytes).
    assert grown < 16 * 1024, grown
    assert doc.read("Workload", "w-7")["spec"]["replicas"] == 2 + 999 % 50  # type: ignore[index]


def test_batch_is_one_change_and_an_exception_discards_it() -> None:
    doc = StateDocument.new()
    heads = doc.heads()
    with doc.batch() as batch:
        batch.write("Workload", "a", workload("a"))
        batch.write("Workload", "b", workload("b"))
        batch.write("Replica", "a-0", {"kind": "Replica"})
        assert batch.touched == {("Workload", "a"), ("Workload", "b"), ("Replica", "a-0")}
    assert change_count(doc, heads) == 1
    heads = doc.heads()
    with pytest.raises(RuntimeError), doc.batch() as batch:
        batch.write("Workload", "c", workload("c"))
        batch.remove("Workload", "a")
        raise RuntimeError("abort")
    assert doc.heads() == heads
    assert doc.names("Workload") == ["a", "b"]


def test_remove() -> None:
    doc = StateDocument.new()
    doc.write("Workload", "a", workload("a"))
    assert doc.remove("Workload", "a") is True
    assert doc.read("Workload", "a") is None
    heads = doc.heads()
    assert doc.remove("Workload", "a") is False
    assert doc.remove("Gadget", "a") is False
    assert doc.heads() == heads


def test_save_load_and_changes_since_rebuild_the_document() -> None:
    doc = StateDocument.new()
    doc.write("Workload", "a", workload("a"))
    snapshot = doc.save()
    heads = doc.heads()
    doc.write("Workload", "a", workload("a", replicas=3))
    doc.write("Workload", "b", workload("b"))
    loaded = StateDocument.load(snapshot + doc.changes_since(heads))
    assert loaded.heads() == doc.heads()
    assert loaded.read("Workload", "a") == workload("a", replicas=3)
    assert loaded.actor_id != doc.actor_id
    assert doc.changes_since(doc.heads()) == b""


def test_load_of_garbage_is_a_document_error() -> None:
    with pytest.raises(DocumentError):
        StateDocument.load(b"definitely not automerge")


def test_read_as_of_heads() -> None:
    doc = StateDocument.new()
    doc.write("Workload", "a", workload("a"))
    old = doc.heads()
    doc.write("Workload", "a", workload("a", replicas=9))
    doc.remove("Workload", "a")
    assert doc.read("Workload", "a") is None
    assert doc.read("Workload", "a", heads=old) == workload("a")
    assert doc.names("Workload", heads=old) == ["a"]


# --- touched ----------------------------------------------------------------------------------


def test_touched_by_local_writes() -> None:
    doc = StateDocument.new()
    start = doc.heads()
    assert doc.touched(start) == set()
    doc.write("Workload", "a", workload("a"))
    doc.write("Replica", "a-0", {"spec": {"workload": "a"}})
    after_create = doc.heads()
    assert doc.touched(start) == {("Workload", "a"), ("Replica", "a-0")}
    doc.write("Workload", "a", workload("a", replicas=2))
    assert doc.touched(after_create) == {("Workload", "a")}
    middle = doc.heads()
    doc.remove("Replica", "a-0")
    assert doc.touched(middle) == {("Replica", "a-0")}
    # Any two points, not only "since before my last write".
    assert doc.touched(start, middle) == {("Workload", "a"), ("Replica", "a-0")}
    assert doc.touched(middle, middle) == set()


def test_touched_by_changes_merged_from_a_peer() -> None:
    ours, theirs = StateDocument.new(), StateDocument.new()
    ours.write("Workload", "shared", workload("shared"))
    theirs.merge(ours)
    theirs.write("Workload", "shared", workload("shared", replicas=4))
    theirs.write("Node", "n1", {"kind": "Node"})
    ours.write("Workload", "mine", workload("mine"))
    before = ours.heads()
    ours.merge(theirs)
    assert ours.touched(before) == {("Workload", "shared"), ("Node", "n1")}
    assert ours.read("Workload", "shared")["spec"]["replicas"] == 4  # type: ignore[index]


def test_touched_by_a_concurrent_create_of_the_same_name() -> None:
    ours, theirs = StateDocument.new(), StateDocument.new()
    ours.write("Workload", "same", workload("same", replicas=1))
    theirs.write("Workload", "same", workload("same", replicas=2))
    before = ours.heads()
    ours.merge(theirs)
    assert ours.touched(before) == {("Workload", "same")}


def test_touched_when_the_resources_map_itself_is_replaced() -> None:
    # A peer that did not start from the genesis change creates its own "resources" map; the
    # merge makes one of the two maps win. The diff then is about the root, and touched() must
    # fall back to every resource on both sides.
    ours = StateDocument.new()
    ours.write("Workload", "a", workload("a"))
    foreign = am.Document()
    with foreign.transaction() as tx:
        resources = tx.put_object(am.ROOT, "resources", am.ObjType.Map)
        kind = tx.put_object(resources, "Workload", am.ObjType.Map)
        tx.put_object(kind, "z", am.ObjType.Map)
    before = ours.heads()
    ours.automerge.merge(foreign)
    # Which map wins depends on the (random) actor ids; either way, all that was visible
    # before or is visible after counts as touched.
    after = ours.keys()
    assert after in ({("Workload", "a")}, {("Workload", "z")})
    assert ours.touched(before) == {("Workload", "a")} | after


def test_touched_when_a_kind_map_is_replaced() -> None:
    ours, theirs = StateDocument.new(), StateDocument.new()
    ours.write("Workload", "a", workload("a"))
    resources = theirs.automerge.get(am.ROOT, "resources")
    assert resources is not None
    with theirs.automerge.transaction() as tx:
        kind = tx.put_object(resources[1], "Workload", am.ObjType.Map)
        tx.put_object(kind, "b", am.ObjType.Map)
    before = ours.heads()
    ours.merge(theirs)
    assert ours.touched(before) >= {("Workload", "a"), ("Workload", "b")}


def test_changes_outside_resources_touch_nothing() -> None:
    doc = StateDocument.new()
    before = doc.heads()
    with doc.automerge.transaction() as tx:
        tx.put(am.ROOT, "epoch", am.ScalarType.Int, 2)
        meta = tx.put_object(am.ROOT, "meta", am.ObjType.Map)
        tx.put(meta, "x", am.ScalarType.Str, "y")
    assert doc.touched(before) == set()


def test_touched_by_text_and_list_edits_inside_a_resource() -> None:
    doc = StateDocument.new()
    doc.write("Workload", "a", {"args": ["x"]})
    before = doc.heads()
    found = doc.automerge.get(am.ROOT, "resources")
    assert found is not None
    kinds = doc.automerge.get(found[1], "Workload")
    assert kinds is not None
    obj = doc.automerge.get(kinds[1], "a")
    assert obj is not None
    args = doc.automerge.get(obj[1], "args")
    assert args is not None
    with doc.automerge.transaction() as tx:
        tx.insert(args[1], 1, am.ScalarType.Str, "y")
        tx.delete(args[1], 0)
        text = tx.put_object(obj[1], "note", am.ObjType.Text)
        tx.insert(text, 0, am.ScalarType.Str, "n")
    assert doc.touched(before) == {("Workload", "a")}
    assert doc.read("Workload", "a") == {"args": ["y"], "note": "n"}


_ID = 'Id(5, ActorID("706f6c6c656e2e67656e657369730000"), 0)'
_KIND_PATH = f'[(Root, Map("resources")), ({_ID}, Map("Workload"))]'


@pytest.mark.parametrize(
    ("text", "touched", "whole_kinds"),
    [
        # Patch shapes that local writes never make but a peer's changes can.
        (
            f'Patch {{ obj: {_ID}, path: {_KIND_PATH}, action: Increment {{ prop: Map("c"), '
            "value: 1 } }",
            {("Workload", "c")},
            set(),
        ),
        (
            f'Patch {{ obj: {_ID}, path: {_KIND_PATH}, action: Conflict {{ prop: Map("c") }} }}',
            {("Workload", "c")},
            set(),
        ),
        (
            f"Patch {{ obj: {_ID}, path: {_KIND_PATH}, action: Mark {{ marks: [] }} }}",
            set(),
            {"Workload"},
        ),
        (
            f'Patch {{ obj: {_ID}, path: [(Root, Map("resources"))], action: DeleteMap '
            '{ key: "Node" } }',
            set(),
            {"Node"},
        ),
        (
            'Patch { obj: Root, path: [], action: PutMap { key: "other", value: x } }',
            set(),
            set(),
        ),
    ],
)
def test_touched_parses_patches_of_other_shapes(
    text: str, touched: set[tuple[str, str]], whole_kinds: set[str]
) -> None:
    found: set[tuple[str, str]] = set()
    kinds: set[str] = set()
    StateDocument._touched_by(text, found, kinds)
    assert (found, kinds) == (touched, whole_kinds)


@pytest.mark.parametrize(
    "text",
    [
        "Patch { something new }",
        'Patch { obj: Root, path: [], action: PutMap { key: "resources", value: x } }',
        f'Patch {{ obj: {_ID}, path: [(Root, Map("resources")), ({_ID}, Seq(0))], action: '
        'DeleteMap { key: "x" } }',
        f'Patch {{ obj: {_ID}, path: {_KIND_PATH}, action: PutMap {{ key: "bad\\q" }} }}',
    ],
)
def test_unparsable_patches_mean_everything(text: str) -> None:
    with pytest.raises(_Unparsable):
        StateDocument._touched_by(text, set(), set())


_awkward_text = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=_awkward_text, name=_awkward_text, key=_awkward_text)
def test_touched_survives_any_characters_in_keys(kind: str, name: str, key: str) -> None:
    # Keys reach us in Rust's Debug escaping: quotes, backslashes, control characters and
    # unusual code points must come back out exactly.
    doc = StateDocument.new()
    start = doc.heads()
    doc.write(kind, name, {key: 1})
    assert doc.touched(start) == {(kind, name)}
    middle = doc.heads()
    doc.write(kind, name, {key: 2})
    assert doc.touched(middle) == {(kind, name)}
    middle = doc.heads()
    doc.remove(kind, name)
    assert doc.touched(middle) == {(kind, name)}
