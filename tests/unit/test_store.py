"""ResourceStore: kubectl-apply semantics, deletion, status, the change feed and persistence."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pollen.resources.models import (
    Condition,
    ConditionStatus,
    Resource,
    Workload,
    WorkloadStatus,
    from_dict,
)
from pollen.state import (
    ApplyAction,
    ChangeEvent,
    ChangeType,
    Conflict,
    NotFound,
    ResourceStore,
    StateDocument,
    StoreError,
)
from pollen.state.journal import FILENAME, recover

DIGEST = "sha256:" + "b" * 64


class Clock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 5, 10, 0, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: int = 1) -> None:
        self.now += timedelta(seconds=seconds)


def manifest(name: str, **spec: Any) -> Resource:
    metadata = spec.pop("metadata", {})
    status = spec.pop("status", None)
    data: dict[str, Any] = {
        "apiVersion": "pollen.dev/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": name, **metadata},
        "spec": {"artifact": DIGEST, **spec},
    }
    if status is not None:
        data["status"] = status
    return from_dict(data)


def replica(name: str, workload: str) -> Resource:
    return from_dict(
        {
            "kind": "Replica",
            "metadata": {"name": name},
            "spec": {"workload": workload, "artifact": DIGEST},
        }
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[ResourceStore]:
    with ResourceStore.open(tmp_path, clock=clock) as opened:
        yield opened


@pytest.fixture
def events(store: ResourceStore) -> list[ChangeEvent]:
    received: list[ChangeEvent] = []
    store.subscribe(received.append)
    return received


def journal_size(tmp_path: Path) -> int:
    return (tmp_path / FILENAME).stat().st_size


# --- apply ------------------------------------------------------------------------------------


def test_apply_creates(store: ResourceStore, events: list[ChangeEvent]) -> None:
    [outcome] = store.apply([manifest("hello", replicas=2, metadata={"labels": {"app": "hi"}})])
    assert outcome.action == ApplyAction.CREATED
    assert str(outcome.action) == "created"
    assert (outcome.kind, outcome.name) == ("Workload", "hello")
    obj = outcome.object
    assert isinstance(obj, Workload)
    assert uuid.UUID(obj.metadata.uid or "").version == 4
    assert obj.metadata.generation == 1
    assert obj.metadata.creation_timestamp == "2026-11-05T10:00:00Z"
    assert obj.metadata.labels == {"app": "hi"}
    assert obj.spec.replicas == 2
    assert store.get("Workload", "hello") == obj
    assert [(e.type, e.name, e.revision) for e in events] == [(ChangeType.ADDED, "hello", 1)]


def test_apply_drops_status_and_bookkeeping_from_the_manifest(store: ResourceStore) -> None:
    given = manifest(
        "hello",
        metadata={
            "uid": "not-yours",
            "generation": 42,
            "creationTimestamp": "2001-01-01T00:00:00Z",
            "deletionTimestamp": "2001-01-01T00:00:00Z",
        },
        status={"readyReplicas": 3},
    )
    [outcome] = store.apply([given])
    meta = outcome.object.metadata
    assert meta.uid != "not-yours"
    assert meta.generation == 1
    assert meta.creation_timestamp == "2026-11-05T10:00:00Z"
    assert meta.deletion_timestamp is None
    assert outcome.object.status == WorkloadStatus()


def test_apply_again_is_unchanged_and_writes_nothing(
    store: ResourceStore, events: list[ChangeEvent], tmp_path: Path
) -> None:
    store.apply([manifest("hello")])
    heads, size = store.document.heads(), journal_size(tmp_path)
    [outcome] = store.apply([manifest("hello")])
    assert outcome.action == ApplyAction.UNCHANGED
    assert outcome.object == store.get("Workload", "hello")
    assert store.document.heads() == heads
    assert journal_size(tmp_path) == size
    assert len(events) == 1


def test_generation_moves_only_when_spec_changes(
    store: ResourceStore, clock: Clock, events: list[ChangeEvent]
) -> None:
    [created] = store.apply([manifest("hello", replicas=1)])
    clock.advance()
    [labelled] = store.apply([manifest("hello", replicas=1, metadata={"labels": {"a": "b"}})])
    assert labelled.action == ApplyAction.CONFIGURED
    assert labelled.object.metadata.generation == 1
    assert labelled.object.metadata.labels == {"a": "b"}
    [scaled] = store.apply([manifest("hello", replicas=3)])
    assert scaled.action == ApplyAction.CONFIGURED
    assert scaled.object.metadata.generation == 2
    assert scaled.object.metadata.labels == {}  # replaced from the manifest, so removed
    assert scaled.object.metadata.uid == created.object.metadata.uid
    assert scaled.object.metadata.creation_timestamp == created.object.metadata.creation_timestamp
    assert [e.type for e in events] == [ChangeType.ADDED, ChangeType.MODIFIED, ChangeType.MODIFIED]
    assert [e.revision for e in events] == [1, 2, 3]


def test_apply_keeps_status(store: ResourceStore) -> None:
    store.apply([manifest("hello", replicas=1)])
    store.update_status("Workload", "hello", WorkloadStatus(replicas=1, ready_replicas=1))
    [outcome] = store.apply([manifest("hello", replicas=2, status={"readyReplicas": 0})])
    assert outcome.object.status == WorkloadStatus(replicas=1, ready_replicas=1)
    assert outcome.object.metadata.generation == 2


def test_apply_with_a_different_uid_is_a_conflict(store: ResourceStore) -> None:
    store.apply([manifest("hello")])
    with pytest.raises(Conflict, match='workload "hello" has uid'):
        store.apply([manifest("hello", replicas=2, metadata={"uid": "someone-else"})])
    uid = store.get("Workload", "hello").metadata.uid  # type: ignore[union-attr]
    [outcome] = store.apply([manifest("hello", replicas=2, metadata={"uid": uid})])
    assert outcome.action == ApplyAction.CONFIGURED


def test_apply_is_atomic(store: ResourceStore, events: list[ChangeEvent], tmp_path: Path) -> None:
    store.apply([manifest("doomed", metadata={"finalizers": ["pollen.dev/cleanup"]})])
    store.delete("Workload", "doomed")
    heads, size, seen = store.document.heads(), journal_size(tmp_path), len(events)
    batch = [manifest("fresh"), replica("fresh-0", "fresh"), manifest("doomed", replicas=2)]
    with pytest.raises(Conflict, match='workload "doomed" is being deleted'):
        store.apply(batch)
    assert store.get("Workload", "fresh") is None
    assert store.get("Replica", "fresh-0") is None
    assert store.document.heads() == heads
    assert journal_size(tmp_path) == size
    assert len(events) == seen


def test_apply_refuses_duplicates(store: ResourceStore) -> None:
    with pytest.raises(StoreError, match="more than once"):
        store.apply([manifest("twice"), manifest("twice", replicas=2)])
    assert store.get("Workload", "twice") is None


def test_a_batch_is_one_journal_frame(store: ResourceStore, tmp_path: Path) -> None:
    outcomes = store.apply([manifest(f"w-{i}") for i in range(20)] + [replica("r", "w-0")])
    assert [o.action for o in outcomes] == [ApplyAction.CREATED] * 21
    store.close()
    assert len(recover(tmp_path / FILENAME).changes) == 1
    with ResourceStore.open(tmp_path) as reopened:
        assert len(recover(tmp_path / FILENAME).changes) == 0  # compacted on open
        reopened.apply([manifest(f"w-{i}", replicas=5) for i in range(20)])
        reopened.update_status("Workload", "w-0", WorkloadStatus(replicas=1))
    assert len(recover(tmp_path / FILENAME).changes) == 2


def test_dry_run_writes_nothing(
    store: ResourceStore, events: list[ChangeEvent], tmp_path: Path
) -> None:
    store.apply([manifest("hello", replicas=1)])
    heads, size = store.document.heads(), journal_size(tmp_path)
    outcomes = store.apply([manifest("hello", replicas=4), manifest("new")], dry_run=True)
    assert [o.action for o in outcomes] == [ApplyAction.CONFIGURED, ApplyAction.CREATED]
    assert outcomes[0].object.metadata.generation == 2
    assert store.get("Workload", "hello").spec.replicas == 1  # type: ignore[union-attr]
    assert store.get("Workload", "new") is None
    assert store.document.heads() == heads
    assert journal_size(tmp_path) == size
    assert len(events) == 1


# --- delete -----------------------------------------------------------------------------------


def test_delete_without_finalizers_removes(store: ResourceStore, events: list[ChangeEvent]) -> None:
    [created] = store.apply([manifest("hello")])
    deleted = store.delete("Workload", "hello")
    assert deleted == created.object
    assert store.get("Workload", "hello") is None
    assert events[-1].type == ChangeType.DELETED
    assert events[-1].object == created.object
    with pytest.raises(NotFound, match=r'^workload "hello" not found$'):
        store.delete("Workload", "hello")
    # The name can be used again, by a new object.
    [again] = store.apply([manifest("hello")])
    assert again.action == ApplyAction.CREATED
    assert again.object.metadata.uid != created.object.metadata.uid


def test_delete_with_finalizers_marks_once(
    store: ResourceStore, clock: Clock, events: list[ChangeEvent]
) -> None:
    store.apply([manifest("hello", metadata={"finalizers": ["a", "b"]})])
    clock.advance(5)
    marked = store.delete("Workload", "hello")
    assert marked.metadata.deletion_timestamp == "2026-11-05T10:00:05Z"
    assert store.get("Workload", "hello") == marked
    assert events[-1].type == ChangeType.MODIFIED
    clock.advance(5)
    assert store.delete("Workload", "hello") == marked  # timestamp set once
    assert len(events) == 2
    with pytest.raises(Conflict):
        store.apply([manifest("hello", replicas=7)])
    after_a = store.remove_finalizer("Workload", "hello", "a")
    assert after_a is not None
    assert after_a.metadata.finalizers == ["b"]
    assert store.remove_finalizer("Workload", "hello", "not-there") == after_a
    assert store.remove_finalizer("Workload", "hello", "b") is None
    assert store.get("Workload", "hello") is None
    assert [e.type for e in events][-1] == ChangeType.DELETED


def test_removing_the_last_finalizer_of_a_live_object_keeps_it(store: ResourceStore) -> None:
    store.apply([manifest("hello", metadata={"finalizers": ["a"]})])
    kept = store.remove_finalizer("Workload", "hello", "a")
    assert kept is not None
    assert kept.metadata.finalizers == []
    assert store.get("Workload", "hello") == kept


# --- status -----------------------------------------------------------------------------------


def test_update_status(store: ResourceStore, events: list[ChangeEvent]) -> None:
    [created] = store.apply([manifest("hello")])
    ready = Condition(
        type="Ready",
        status=ConditionStatus.TRUE,
        reason="AllReady",
        last_transition_time="2026-11-05T10:00:01Z",
        observed_generation=1,
    )
    status = WorkloadStatus(replicas=1, ready_replicas=1, conditions=[ready])
    updated = store.update_status("Workload", "hello", status)
    assert updated.status == status
    assert updated.spec == created.object.spec
    assert updated.metadata == created.object.metadata
    assert updated.condition("Ready") == ready
    assert [e.type for e in events] == [ChangeType.ADDED, ChangeType.MODIFIED]
    # The same status again changes nothing; a mapping works as well as a model.
    heads = store.document.heads()
    same = store.update_status(
        "Workload",
        "hello",
        {"replicas": 1, "readyReplicas": 1, "conditions": [ready.model_dump(by_alias=True)]},
    )
    assert same == updated
    assert store.document.heads() == heads
    assert len(events) == 2


def test_update_status_errors(store: ResourceStore) -> None:
    with pytest.raises(NotFound):
        store.update_status("Workload", "ghost", WorkloadStatus())
    store.apply([manifest("hello")])
    with pytest.raises(StoreError, match="not valid"):
        store.update_status("Workload", "hello", {"readyReplicas": -1})
    with pytest.raises(StoreError, match="unknown kind"):
        store.update_status("Gadget", "hello", {})


# --- reads ------------------------------------------------------------------------------------


def test_list_sorted_and_label_selector(store: ResourceStore) -> None:
    store.apply(
        [
            manifest("c", metadata={"labels": {"app": "web", "tier": "front"}}),
            manifest("a", metadata={"labels": {"app": "web"}}),
            manifest("b", metadata={"labels": {"app": "db"}}),
            replica("a-0", "a"),
        ]
    )
    assert [o.name for o in store.list("Workload")] == ["a", "b", "c"]
    assert [o.name for o in store.list("Workload", {"app": "web"})] == ["a", "c"]
    assert [o.name for o in store.list("Workload", {"app": "web", "tier": "front"})] == ["c"]
    assert [o.name for o in store.list("Workload", {"app": "none"})] == []
    assert [o.name for o in store.list("Workload", {})] == ["a", "b", "c"]
    assert [o.name for o in store.list("Replica")] == ["a-0"]
    assert store.list("Node") == []
    with pytest.raises(StoreError, match='unknown kind "Gadget"'):
        store.list("Gadget")
    with pytest.raises(StoreError):
        store.get("Gadget", "x")


# --- change feed ------------------------------------------------------------------------------


def test_unsubscribe_and_failing_subscribers(store: ResourceStore) -> None:
    received: list[ChangeEvent] = []

    def broken(event: ChangeEvent) -> None:
        raise RuntimeError("subscriber bug")

    store.subscribe(broken)
    unsubscribe = store.subscribe(received.append)
    store.apply([manifest("a")])
    unsubscribe()
    unsubscribe()  # twice is harmless
    store.apply([manifest("b")])
    assert [e.name for e in received] == ["a"]
    assert store.get("Workload", "b") is not None
    assert store.revision == 2


def test_a_subscriber_that_writes_sees_events_in_order(store: ResourceStore) -> None:
    received: list[ChangeEvent] = []

    def make_replica(event: ChangeEvent) -> None:
        received.append(event)
        if event.kind == "Workload" and event.type == ChangeType.ADDED:
            store.apply([replica(f"{event.name}-0", event.name)])

    store.subscribe(make_replica)
    store.apply([manifest("a"), manifest("b")])
    assert [(e.kind, e.name) for e in received] == [
        ("Workload", "a"),
        ("Workload", "b"),
        ("Replica", "a-0"),
        ("Replica", "b-0"),
    ]
    assert [e.revision for e in received] == [1, 2, 3, 4]


def test_remote_changes_produce_events_and_are_journaled(
    store: ResourceStore, events: list[ChangeEvent], tmp_path: Path
) -> None:
    store.apply([manifest("local")])
    peer = StateDocument.new()
    peer.merge(store.document)
    remote = manifest("remote").model_dump(mode="json", by_alias=True, exclude_none=True)
    remote["metadata"].update(uid="u-remote", generation=1)
    peer.write("Workload", "remote", remote)
    local = store.get("Workload", "local")
    assert local is not None
    changed = local.model_dump(mode="json", by_alias=True, exclude_none=True)
    changed["spec"]["replicas"] = 9
    peer.write("Workload", "local", changed)
    with store.update_document() as doc:
        doc.merge(peer)
    assert [(e.type, e.name) for e in events[1:]] == [
        (ChangeType.MODIFIED, "local"),
        (ChangeType.ADDED, "remote"),
    ]
    assert store.get("Workload", "local").spec.replicas == 9  # type: ignore[union-attr]
    # Merging again moves nothing and says nothing.
    with store.update_document() as doc:
        doc.merge(peer)
    assert len(events) == 3
    peer.remove("Workload", "remote")
    with store.update_document() as doc:
        doc.merge(peer)
    assert events[-1].type == ChangeType.DELETED
    assert events[-1].object.metadata.uid == "u-remote"
    store.close()
    with ResourceStore.open(tmp_path) as reopened:
        assert [o.name for o in reopened.list("Workload")] == ["local"]
        assert reopened.get("Workload", "local").spec.replicas == 9  # type: ignore[union-attr]


def test_invalid_remote_objects_are_ignored(
    store: ResourceStore, events: list[ChangeEvent], caplog: pytest.LogCaptureFixture
) -> None:
    store.apply([manifest("good")])
    peer = StateDocument.new()
    peer.merge(store.document)
    peer.write("Workload", "bad", {"kind": "Workload", "metadata": {"name": "bad"}, "spec": {}})
    peer.write(
        "Workload",
        "liar",
        {"kind": "Workload", "metadata": {"name": "other"}, "spec": {"artifact": DIGEST}},
    )
    peer.write("Gadget", "x", {"anything": True})
    good = peer.read("Workload", "good")
    assert good is not None
    good["spec"]["replicas"] = -5
    peer.write("Workload", "good", good)
    with store.update_document() as doc:
        doc.merge(peer)
    assert store.get("Workload", "bad") is None
    assert store.get("Workload", "liar") is None
    # A valid object turned invalid by a peer disappears from the view, with an event.
    assert store.get("Workload", "good") is None
    assert [(e.type, e.name) for e in events] == [
        (ChangeType.ADDED, "good"),
        (ChangeType.DELETED, "good"),
    ]
    assert "ignoring invalid" in caplog.text


# --- persistence ------------------------------------------------------------------------------


def test_reopen_has_everything_and_compacts(tmp_path: Path, clock: Clock) -> None:
    with ResourceStore.open(tmp_path, clock=clock) as store:
        actor = store.document.actor_id
        for i in range(30):
            store.apply([manifest(f"w-{i}", replicas=i)])
        store.update_status("Workload", "w-3", WorkloadStatus(ready_replicas=3))
        store.delete("Workload", "w-4")
        expected = {o.name: o for o in store.list("Workload")}
    assert len(recover(tmp_path / FILENAME).changes) == 32
    with ResourceStore.open(tmp_path, clock=clock) as reopened:
        assert {o.name: o for o in reopened.list("Workload")} == expected
        assert reopened.document.actor_id != actor  # never reuse an actor id
        assert reopened.revision == 0
    assert recover(tmp_path / FILENAME).changes == []


def test_a_torn_tail_does_not_stop_the_store(tmp_path: Path) -> None:
    with ResourceStore.open(tmp_path) as store:
        store.apply([manifest("kept")])
        store.apply([manifest("torn")])
    path = tmp_path / FILENAME
    # Reopening compacted both writes into the snapshot; tear a write made afterwards instead.
    with ResourceStore.open(tmp_path) as store:
        size = path.stat().st_size
        store.apply([manifest("lost")])
    path.write_bytes(path.read_bytes()[: size + (path.stat().st_size - size) // 2])
    with ResourceStore.open(tmp_path) as store:
        assert [o.name for o in store.list("Workload")] == ["kept", "torn"]
        store.apply([manifest("after")])
    with ResourceStore.open(tmp_path) as store:
        assert [o.name for o in store.list("Workload")] == ["after", "kept", "torn"]


def test_one_store_per_directory_and_closed_store(tmp_path: Path) -> None:
    store = ResourceStore.open(tmp_path)
    with pytest.raises(StoreError, match="in use by another process"):
        ResourceStore.open(tmp_path)
    store.apply([manifest("a")])
    store.close()
    store.close()
    assert store.get("Workload", "a") is not None  # reads still work
    with pytest.raises(StoreError, match="closed"):
        store.apply([manifest("b")])


def test_journal_compacts_itself_past_a_threshold(tmp_path: Path) -> None:
    with ResourceStore.open(tmp_path, compact_after_bytes=4096) as store:
        for i in range(40):
            store.apply([manifest("hello", replicas=i)])
        recovered = recover(tmp_path / FILENAME)
        assert len(recovered.changes) < 40
    with ResourceStore.open(tmp_path) as store:
        assert store.get("Workload", "hello").spec.replicas == 39  # type: ignore[union-attr]


def test_a_write_that_cannot_be_persisted_is_not_applied(
    tmp_path: Path, events: list[ChangeEvent], store: ResourceStore
) -> None:
    store.apply([manifest("durable")])
    heads = store.document.heads()
    # Pull the file out from under the journal: the next append fails like a dying disk.
    journal = store._journal
    assert journal is not None and journal._fd is not None
    os.close(journal._fd)
    with pytest.raises(StoreError, match="cannot persist"):
        store.apply([manifest("lost")])
    assert store.get("Workload", "lost") is None
    assert store.document.heads() == heads
    assert [e.name for e in events] == ["durable"]
    # Nothing more is acknowledged until the store is reopened.
    with pytest.raises(StoreError):
        store.apply([manifest("later")])
    journal._fd = None
    store.close()
    with ResourceStore.open(tmp_path) as reopened:
        assert [o.name for o in reopened.list("Workload")] == ["durable"]
