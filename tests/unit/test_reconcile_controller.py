"""The reconciler framework's asyncio shell, on a real store and a real event loop.

Reconcilers that raise, hang, ignore cancellation, exit or are slow run next to well-behaved
ones; the well-behaved ones must keep working and the failures must show as a condition (on
transitions only) and as events.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pollen.reconcilers import Context, PermanentError, Request, Result, TemporaryError
from pollen.reconcilers.manager import ControllerSettings, ReconcilerManager
from pollen.resources.models import ConditionStatus, Node, ObjectMeta, Resource, from_dict
from pollen.state import ChangeEvent, ResourceStore
from pollen.state.events import EventLog, EventType
from tests.helpers import wait_until

DIGEST = "sha256:" + "c" * 64
NODE = "node-1"
FAST = ControllerSettings(
    workers=2, timeout=0.3, cancel_grace=0.1, resync_period=3600, base_delay=0.02, max_delay=0.1
)


def workload(name: str, **spec: Any) -> Resource:
    return from_dict(
        {
            "apiVersion": "pollen.dev/v1alpha1",
            "kind": "Workload",
            "metadata": {"name": name},
            "spec": {"artifact": DIGEST, **spec},
        }
    )


class Recorder:
    """Well-behaved: labels every Workload it sees and remembers what it saw."""

    name = "recorder"
    kind = "Workload"

    def __init__(self) -> None:
        self.seen: list[tuple[str, int | None]] = []

    async def reconcile(self, request: Request, context: Context) -> Result:
        obj = context.get(request.kind, request.name)
        self.seen.append((request.name, obj.metadata.generation if obj else None))
        if obj is not None:
            context.patch(request.kind, request.name, labels={"recorded": "yes"})
        return Result.done()


class Raising:
    name = "raising"
    kind = "Workload"

    def __init__(self) -> None:
        self.fail = True

    async def reconcile(self, request: Request, context: Context) -> Result:
        if self.fail:
            raise RuntimeError("the disk is on fire")
        return Result.done()


class Hanging:
    name = "hanging"
    kind = "Workload"

    async def reconcile(self, request: Request, context: Context) -> Result:
        await asyncio.Event().wait()
        return Result.done()


class Stubborn:
    """Ignores its cancellation until released."""

    name = "stubborn"
    kind = "Workload"

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.in_flight: Counter[str] = Counter()
        self.most_at_once = 0
        self.finished: list[str] = []

    async def reconcile(self, request: Request, context: Context) -> Result:
        self.in_flight[request.name] += 1
        self.most_at_once = max(self.most_at_once, self.in_flight[request.name])
        try:
            if request.name == "stuck":
                while not self.release.is_set():
                    try:
                        await self.release.wait()
                    except asyncio.CancelledError:
                        continue  # what a badly written plugin does
            self.finished.append(request.name)
            return Result.done()
        finally:
            self.in_flight[request.name] -= 1


class Exiting:
    name = "exiting"
    kind = "Workload"

    async def reconcile(self, request: Request, context: Context) -> Result:
        sys.exit(3)


@pytest.fixture
def store(tmp_path: Path) -> ResourceStore:
    with ResourceStore.open(tmp_path / "state") as opened:
        yield opened  # type: ignore[misc]


@pytest.fixture
def events() -> EventLog:
    from datetime import UTC, datetime

    return EventLog(NODE, lambda: datetime.now(UTC))


@pytest.fixture
async def manager_factory(store: ResourceStore, events: EventLog) -> AsyncIterator[Any]:
    managers: list[ReconcilerManager] = []

    async def make(*reconcilers: object, settings: ControllerSettings = FAST) -> ReconcilerManager:
        manager = ReconcilerManager(store, events, node_name=NODE, settings=settings)
        for reconciler in reconcilers:
            manager.add(reconciler)
        await manager.start()
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        await manager.stop()


def condition_of(store: ResourceStore, name: str, condition_type: str) -> Any:
    obj = store.get("Workload", name)
    return obj.condition(condition_type) if obj is not None else None


def writes_to(store: ResourceStore, name: str) -> list[ChangeEvent]:
    seen: list[ChangeEvent] = []
    store.subscribe(lambda change: seen.append(change) if change.name == name else None)
    return seen


async def test_existing_and_new_objects_are_reconciled(
    store: ResourceStore, manager_factory: Any
) -> None:
    store.apply([workload("a")])
    recorder = Recorder()
    await manager_factory(recorder)
    await wait_until(lambda: store.get("Workload", "a").metadata.labels.get("recorded"))
    store.apply([workload("b")])
    await wait_until(lambda: store.get("Workload", "b").metadata.labels.get("recorded"))
    store.delete("Workload", "b")
    # Deletions are reconciled too: the reconciler finds nothing and is done.
    await wait_until(lambda: ("b", None) in recorder.seen)


async def test_a_failing_reconciler_shows_one_condition_and_events_and_others_carry_on(
    store: ResourceStore, events: EventLog, manager_factory: Any
) -> None:
    store.apply([workload("a")])
    writes = writes_to(store, "a")
    raising, recorder = Raising(), Recorder()
    manager = await manager_factory(raising, recorder)
    controller = manager.controllers["raising"]
    await wait_until(lambda: controller.calls.get("ReconcileError", 0) >= 4, what="retries")
    condition = condition_of(store, "a", "raising/Reconciled")
    assert condition.status == ConditionStatus.FALSE
    assert condition.reason == "ReconcileError"
    assert "RuntimeError: the disk is on fire" in condition.message
    assert NODE in condition.message
    assert condition.observed_generation == 1
    # One document write for the condition however many retries failed; the other reconciler
    # wrote its label meanwhile.
    condition_writes = [w for w in writes if w.object.condition("raising/Reconciled") is not None]
    assert len({w.object.condition("raising/Reconciled") for w in condition_writes}) == 1
    warnings = [e for e in events.list("Workload", "a") if e.type == EventType.WARNING]
    assert warnings and warnings[-1].reason == "ReconcileError"
    assert sum(e.count for e in warnings) >= 4
    store.apply([workload("b")])
    await wait_until(lambda: store.get("Workload", "b").metadata.labels.get("recorded"))
    # Recovery flips the condition, once.
    raising.fail = False
    await wait_until(
        lambda: condition_of(store, "a", "raising/Reconciled").status == ConditionStatus.TRUE,
        what="recovery",
    )
    assert condition_of(store, "a", "raising/Reconciled").reason == "Reconciled"
    assert events.list("Workload", "a")[-1].reason == "Reconciled"


async def test_a_reconciler_that_never_failed_writes_no_condition(
    store: ResourceStore, manager_factory: Any
) -> None:
    store.apply([workload("a")])
    recorder = Recorder()
    await manager_factory(recorder)
    await wait_until(lambda: store.get("Workload", "a").metadata.labels.get("recorded"))
    assert condition_of(store, "a", "recorder/Reconciled") is None


async def test_a_hanging_reconciler_is_cancelled_retried_and_delays_nobody(
    store: ResourceStore, manager_factory: Any
) -> None:
    store.apply([workload("a")])
    recorder = Recorder()
    manager = await manager_factory(Hanging(), recorder)
    controller = manager.controllers["hanging"]
    await wait_until(lambda: controller.calls.get("ReconcileTimeout", 0) >= 2, what="timeouts")
    condition = condition_of(store, "a", "hanging/Reconciled")
    assert condition.reason == "ReconcileTimeout"
    assert "0.3s" in condition.message
    for index in range(5):
        store.apply([workload(f"w{index}")])
    await wait_until(
        lambda: all(
            store.get("Workload", f"w{i}").metadata.labels.get("recorded") for i in range(5)
        )
    )


async def test_a_call_that_ignores_cancellation_is_abandoned_and_its_object_not_rerun(
    store: ResourceStore, manager_factory: Any
) -> None:
    store.apply([workload("stuck")])
    stubborn = Stubborn()
    manager = await manager_factory(
        stubborn, settings=ControllerSettings(**{**FAST.__dict__, "workers": 1})
    )
    controller = manager.controllers["stubborn"]
    await wait_until(lambda: controller.calls.get("ReconcileTimeout", 0) >= 1)
    assert condition_of(store, "stuck", "stubborn/Reconciled").reason == "ReconcileTimeout"
    # The only worker is free again: other objects are reconciled...
    store.apply([workload("other")])
    await wait_until(lambda: "other" in stubborn.finished)
    # ...while changes to the stuck one wait for the abandoned call to end.
    store.apply([workload("stuck", args=["changed"])])
    store.apply([workload("stuck", args=["changed again"])])
    await wait_until(lambda: "other" in stubborn.finished and len(stubborn.finished) >= 1)
    assert stubborn.in_flight["stuck"] == 1
    stubborn.release.set()
    await wait_until(lambda: stubborn.finished.count("stuck") >= 2, what="the rerun")
    assert stubborn.most_at_once == 1


async def test_the_same_object_is_never_reconciled_twice_at_once_and_the_last_state_wins(
    store: ResourceStore, manager_factory: Any
) -> None:
    in_flight: Counter[str] = Counter()
    most = Counter[str]()
    seen: dict[str, int] = {}

    class Slow:
        name = "slow"
        kind = "Workload"

        async def reconcile(self, request: Request, context: Context) -> Result:
            in_flight[request.name] += 1
            most[request.name] = max(most[request.name], in_flight[request.name])
            try:
                await asyncio.sleep(0.005)
                obj = context.get(request.kind, request.name)
                if obj is not None:
                    seen[request.name] = obj.metadata.generation or 0
                return Result.done()
            finally:
                in_flight[request.name] -= 1

    await manager_factory(Slow(), settings=ControllerSettings(**{**FAST.__dict__, "workers": 8}))
    for round_ in range(30):
        store.apply([workload(name, args=[str(round_)]) for name in ("a", "b", "c")])
        await asyncio.sleep(0)
    await wait_until(lambda: all(seen.get(n) == 30 for n in ("a", "b", "c")), what="last state")
    assert max(most.values()) == 1


async def test_a_permanent_error_is_not_retried_until_the_object_changes(
    store: ResourceStore, manager_factory: Any
) -> None:
    calls: list[int] = []

    class Strict:
        name = "strict"
        kind = "Workload"

        async def reconcile(self, request: Request, context: Context) -> Result:
            obj = context.get(request.kind, request.name)
            calls.append(obj.metadata.generation if obj else 0)
            if obj is not None and obj.metadata.generation == 1:
                raise PermanentError("generation 1 is not acceptable")
            return Result.done()

    store.apply([workload("a")])
    manager = await manager_factory(Strict())
    controller = manager.controllers["strict"]
    await wait_until(lambda: controller.calls.get("PermanentError"))
    condition = condition_of(store, "a", "strict/Reconciled")
    assert (condition.reason, condition.message.split(" (")[0]) == (
        "PermanentError",
        "generation 1 is not acceptable",
    )
    # Nothing waits: no retry is scheduled.
    queue = controller._queue
    assert len(queue) == 0 and queue.next_deadline() is None
    store.apply([workload("a", args=["fixed"])])
    await wait_until(
        lambda: condition_of(store, "a", "strict/Reconciled").status == ConditionStatus.TRUE
    )
    assert calls == [1, 2]


async def test_temporary_errors_requeues_and_their_delays(
    store: ResourceStore, manager_factory: Any
) -> None:
    counts: Counter[str] = Counter()

    class Polling:
        name = "polling"
        kind = "Workload"

        async def reconcile(self, request: Request, context: Context) -> Result:
            counts[request.name] += 1
            if request.name == "flaky":
                raise TemporaryError("the registry is busy", delay=0.01)
            return Result.requeue_after(0.01)

    store.apply([workload("flaky"), workload("poll")])
    await manager_factory(Polling())
    await wait_until(lambda: counts["flaky"] >= 3 and counts["poll"] >= 3)
    condition = condition_of(store, "flaky", "polling/Reconciled")
    assert condition.reason == "TemporaryError"
    assert condition.message.startswith("the registry is busy")
    assert condition_of(store, "poll", "polling/Reconciled") is None


async def test_a_reconciler_that_exits_or_returns_garbage_does_not_stop_the_node(
    store: ResourceStore, manager_factory: Any
) -> None:
    class Garbage:
        name = "garbage"
        kind = "Workload"

        async def reconcile(self, request: Request, context: Context) -> Result:
            return "done"  # type: ignore[return-value]

    store.apply([workload("a")])
    manager = await manager_factory(Exiting(), Garbage(), Recorder())
    await wait_until(lambda: manager.controllers["exiting"].calls.get("ReconcileError", 0) >= 2)
    assert "SystemExit" in condition_of(store, "a", "exiting/Reconciled").message
    await wait_until(lambda: condition_of(store, "a", "garbage/Reconciled"))
    assert "returned str, not a Result" in condition_of(store, "a", "garbage/Reconciled").message
    store.apply([workload("b")])
    await wait_until(lambda: store.get("Workload", "b").metadata.labels.get("recorded"))


async def test_resync_reconciles_every_object_again(
    store: ResourceStore, manager_factory: Any
) -> None:
    store.apply([workload("a")])
    recorder = Recorder()
    await manager_factory(
        recorder, settings=ControllerSettings(**{**FAST.__dict__, "resync_period": 0.02})
    )
    await wait_until(lambda: recorder.seen.count(("a", 1)) >= 4, what="resyncs")


async def test_changes_and_enqueues_from_other_threads_reach_the_loop(
    store: ResourceStore, manager_factory: Any
) -> None:
    recorder = Recorder()
    manager = await manager_factory(recorder)
    await asyncio.to_thread(store.apply, [workload("from-thread")])
    await wait_until(lambda: ("from-thread", 1) in recorder.seen)
    before = recorder.seen.count(("from-thread", 1))
    thread = threading.Thread(target=manager.enqueue, args=("Workload", "from-thread"))
    thread.start()
    thread.join()
    await wait_until(lambda: recorder.seen.count(("from-thread", 1)) > before)
    # A local event for a kind nobody watches is fine.
    manager.enqueue("Artifact", "whatever")


async def test_a_finalizer_holds_a_deletion_until_cleanup_is_done(
    store: ResourceStore, manager_factory: Any
) -> None:
    cleaned: list[str] = []
    finalizer = "example.com/cleanup"

    class Cleaning:
        name = "cleaning"
        kind = "Workload"

        async def reconcile(self, request: Request, context: Context) -> Result:
            obj = context.get(request.kind, request.name)
            if obj is None:
                return Result.done()
            if obj.metadata.deletion_timestamp is None:
                context.add_finalizer(request.kind, request.name, finalizer)
                return Result.done()
            cleaned.append(request.name)
            context.remove_finalizer(request.kind, request.name, finalizer)
            return Result.done()

    store.apply([workload("a")])
    await manager_factory(Cleaning())
    await wait_until(lambda: store.get("Workload", "a").metadata.finalizers == [finalizer])
    marked = store.delete("Workload", "a")
    assert marked.metadata.deletion_timestamp is not None
    await wait_until(lambda: store.get("Workload", "a") is None, what="deletion to complete")
    assert cleaned == ["a"]


async def test_context_writes_status_with_observed_generation_and_patches_atomically(
    store: ResourceStore, manager_factory: Any
) -> None:
    done = asyncio.Event()

    class Writer:
        name = "writer"
        kind = "Workload"

        async def reconcile(self, request: Request, context: Context) -> Result:
            obj = context.get(request.kind, request.name)
            if obj is None or obj.metadata.generation != 2:
                return Result.done()
            context.set_condition(
                request.kind, request.name, "Tidy", True, reason="Tidied", message="all tidy"
            )
            context.update_status(request.kind, request.name, {"readyReplicas": 1})
            context.patch(
                request.kind,
                request.name,
                labels={"tidy": "yes", "stale": None},
                annotations={"example.com/note": "hi"},
            )
            patched = context.patch(request.kind, request.name, spec={"env": {"A": "1"}})
            assert patched.metadata.generation == 3
            unchanged = context.patch(request.kind, request.name, labels={"tidy": "yes"})
            assert unchanged == patched
            context.record_event(request.kind, request.name, "Tidied", "tidied it")
            done.set()
            return Result.done()

    store.apply([workload("a", args=["x"])])
    labelled = store.get("Workload", "a").model_copy(deep=True)
    data = labelled.model_dump(mode="json", by_alias=True, exclude_none=True)
    data["metadata"]["labels"] = {"stale": "1"}
    data["spec"]["args"] = ["y"]
    await manager_factory(Writer())
    store.apply([from_dict(data)])
    await asyncio.wait_for(done.wait(), 10)
    obj = store.get("Workload", "a")
    condition = obj.condition("Tidy")
    assert (condition.status, condition.reason, condition.observed_generation) == (
        ConditionStatus.TRUE,
        "Tidied",
        2,
    )
    assert obj.status.ready_replicas == 1
    assert obj.status.observed_generation == 2
    assert obj.metadata.labels == {"tidy": "yes"}
    assert obj.metadata.annotations == {"example.com/note": "hi"}
    assert obj.spec.env == {"A": "1"} and obj.spec.args == ["y"]


async def test_the_context_refuses_other_threads(
    store: ResourceStore, manager_factory: Any
) -> None:
    failure: list[BaseException] = []
    done = asyncio.Event()

    class Threaded:
        name = "threaded"
        kind = "Workload"

        async def reconcile(self, request: Request, context: Context) -> Result:
            try:
                await asyncio.to_thread(context.get, request.kind, request.name)
            except RuntimeError as exc:
                failure.append(exc)
            done.set()
            return Result.done()

    store.apply([workload("a")])
    await manager_factory(Threaded())
    await asyncio.wait_for(done.wait(), 10)
    assert "from another thread" in str(failure[0])


def test_manager_refuses_what_is_not_a_reconciler(store: ResourceStore, events: EventLog) -> None:
    from pollen.reconcilers._plugins import PluginError

    manager = ReconcilerManager(store, events, node_name=NODE)

    class SyncReconciler:
        name = "sync"
        kind = "Workload"

        def reconcile(self, request: Request, context: Context) -> Result:
            return Result.done()

    class BadKind:
        name = "bad-kind"
        kind = "Pod"

        async def reconcile(self, request: Request, context: Context) -> Result:
            return Result.done()

    class BadName(BadKind):
        name = "Bad_Name"
        kind = "Workload"

    with pytest.raises(PluginError, match="not 'async def'"):
        manager.add(SyncReconciler())
    with pytest.raises(PluginError, match="watches kind 'Pod'"):
        manager.add(BadKind())
    with pytest.raises(PluginError, match="not a lowercase DNS label"):
        manager.add(BadName())
    with pytest.raises(PluginError, match="has no name, kind, reconcile"):
        manager.add(object())
    manager.add(Recorder())
    with pytest.raises(PluginError, match="already enabled"):
        manager.add(Recorder())


async def test_plugins_that_do_not_load_leave_the_node_running_and_say_why(
    store: ResourceStore, events: EventLog, manager_factory: Any
) -> None:
    store.apply([Node(metadata=ObjectMeta(name=NODE))])
    manager = ReconcilerManager(store, events, node_name=NODE, settings=FAST)
    failures = manager.enable_plugins(
        [
            "no-such-plugin",
            "tests.unit.plugin_objects:missing",
            "tests.unit.no_such_module:factory",
            "tests.unit.plugin_objects:raising_factory",
            "tests.unit.plugin_objects:not_a_reconciler",
            "tests.unit.plugin_objects:Labeller",
        ]
    )
    messages = [str(f) for f in failures]
    assert len(messages) == 5, messages
    assert 'no plugin "no-such-plugin" is installed' in messages[0]
    assert "cannot be imported: AttributeError" in messages[1]
    assert "cannot be imported: ModuleNotFoundError" in messages[2]
    assert "its factory raised ValueError: no configuration" in messages[3]
    assert "not a reconciler" in messages[4]
    await manager.start()
    try:
        store.apply([workload("a")])
        await wait_until(lambda: store.get("Workload", "a").metadata.labels.get("labelled"))
        node = store.get("Node", NODE)
        condition = node.condition("PluginsLoaded")
        assert condition.status == ConditionStatus.FALSE
        assert condition.reason == "PluginFailed"
        assert "no-such-plugin" in condition.message
        node_events = [e for e in events.list("Node", NODE) if e.reason == "PluginFailed"]
        assert len(node_events) == 5
        assert all(e.type == EventType.WARNING for e in node_events)
    finally:
        await manager.stop()


async def test_a_node_whose_plugins_all_load_says_so(
    store: ResourceStore, events: EventLog
) -> None:
    store.apply([Node(metadata=ObjectMeta(name=NODE))])
    manager = ReconcilerManager(store, events, node_name=NODE, settings=FAST)
    assert manager.enable_plugins(["tests.unit.plugin_objects:Labeller"]) == []
    await manager.start()
    try:
        condition = store.get("Node", NODE).condition("PluginsLoaded")
        assert condition.status == ConditionStatus.TRUE
        assert "tests.unit.plugin_objects:Labeller" in condition.message
    finally:
        await manager.stop()


async def test_stopping_ends_even_a_call_that_ignores_cancellation(
    store: ResourceStore, events: EventLog
) -> None:
    store.apply([workload("stuck")])
    stubborn = Stubborn()
    manager = ReconcilerManager(store, events, node_name=NODE, settings=FAST)
    manager.add(stubborn)
    await manager.start()
    await wait_until(lambda: stubborn.in_flight["stuck"] == 1)
    calls = [t for t in asyncio.all_tasks() if t.get_name().startswith("reconcile stubborn")]
    await manager.stop()
    # What asyncio.run does at exit: cancel what is left and wait for it.
    for task in calls:
        task.cancel()
    finished, _ = await asyncio.wait(calls, timeout=5)
    assert set(finished) == set(calls)
    assert stubborn.in_flight["stuck"] == 0  # its finally block ran
