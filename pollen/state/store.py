"""The typed resource store: apply, get, list, delete, status updates and a change feed.

The Automerge document is the source of truth. Reads are served from a materialized view (one
validated model per object) that the change feed keeps current: after any movement of the
document's heads, whether from a local write or from changes merged from a peer, the store asks
the document which resources were touched, re-reads those, compares them with the view and emits
one event per real difference. That single path is what makes local and remote changes look the
same to subscribers.

Every write is one Automerge change and one fsynced journal frame, made after all checks passed,
so a refused request writes nothing and an acknowledged one survives ``kill -9``.

The store is sans-IO in the asyncio sense: no event loop, callbacks are called synchronously.
"""

from __future__ import annotations

import builtins
import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

from automerge import core as am
from pydantic import BaseModel, ValidationError

from pollen.resources.conditions import format_timestamp
from pollen.resources.models import KIND_MODELS, Resource, UnknownKindError, from_dict, to_dict
from pollen.state.document import Batch, DocumentError, StateDocument
from pollen.state.errors import Conflict, NotFound, StoreError, describe
from pollen.state.journal import Journal, JournalError, Recovered

__all__ = [
    "ApplyAction",
    "ApplyOutcome",
    "ChangeEvent",
    "ChangeType",
    "ResourceStore",
]

log = logging.getLogger(__name__)

#: Appended journal bytes after which the journal is compacted without waiting for a restart.
DEFAULT_COMPACT_AFTER_BYTES: Final = 64 * 1024 * 1024


class ChangeType(StrEnum):
    """What happened to an object, as in a Kubernetes watch."""

    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


@dataclass(frozen=True)
class ChangeEvent:
    """One change of one object. For DELETED, ``object`` is the last version the store knew."""

    type: ChangeType
    kind: str
    name: str
    object: Resource
    #: Position in this store's feed: increases by one per event, starts at 1 after opening.
    revision: int


class ApplyAction(StrEnum):
    """What :meth:`ResourceStore.apply` did to one object, in ``pctl apply`` words."""

    CREATED = "created"
    CONFIGURED = "configured"
    UNCHANGED = "unchanged"


@dataclass(frozen=True)
class ApplyOutcome:
    """The result of applying one object."""

    kind: str
    name: str
    action: ApplyAction
    object: Resource


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _load_document(recovered: Recovered) -> StateDocument:
    """The document a recovered journal holds, dropping trailing changes that will not load."""
    if recovered.snapshot is None:
        return StateDocument.new()
    changes = recovered.changes
    # Every frame passed its checksum, so a load failure means a frame was written whole but is
    # not a valid change; keep as much as loads rather than refusing to start.
    for keep in range(len(changes), -1, -1):
        try:
            doc = StateDocument.load(recovered.snapshot + b"".join(changes[:keep]))
        except DocumentError as exc:
            if keep == 0:
                raise StoreError(f"the state snapshot cannot be loaded: {exc}") from exc
            continue
        if keep < len(changes):
            log.error(
                "state journal: %d of %d change frames would not load and were dropped",
                len(changes) - keep,
                len(changes),
            )
        return doc
    raise AssertionError("unreachable")


class ResourceStore:
    """Resources of every kind, persisted in a state directory, with a change feed."""

    def __init__(
        self,
        doc: StateDocument,
        journal: Journal,
        *,
        clock: Callable[[], datetime] | None = None,
        compact_after_bytes: int = DEFAULT_COMPACT_AFTER_BYTES,
    ) -> None:
        """Use :meth:`open`."""
        self._doc = doc
        self._journal: Journal | None = journal
        self._clock = clock or _utc_now
        self._compact_after_bytes = compact_after_bytes
        # Writes may come from more than one thread (an API handler in an executor, say);
        # reentrant because a subscriber may write from inside its callback.
        self._lock = threading.RLock()
        self._view: dict[str, dict[str, Resource]] = {kind: {} for kind in KIND_MODELS}
        self._revision = 0
        self._subscribers: builtins.list[Callable[[ChangeEvent], None]] = []
        self._pending: deque[ChangeEvent] = deque()
        self._dispatching = False
        for kind in KIND_MODELS:
            for name in doc.names(kind):
                obj = self._parse(kind, name, doc.read(kind, name))
                if obj is not None:
                    self._view[kind][name] = obj

    @classmethod
    def open(
        cls,
        state_dir: Path,
        *,
        clock: Callable[[], datetime] | None = None,
        compact_after_bytes: int = DEFAULT_COMPACT_AFTER_BYTES,
    ) -> ResourceStore:
        """Open the store kept in ``state_dir`` (a node's ``DATA_DIR/state``), creating it if
        needed.

        Recovers the journal (cutting a torn tail), loads the document with a fresh actor id
        and compacts the journal into a single snapshot.
        """
        try:
            journal = Journal.open(Path(state_dir))
        except (JournalError, OSError) as exc:
            raise StoreError(f"cannot open the state journal: {exc}") from exc
        try:
            # A fresh random actor id on every start: the changes of a torn tail were lost
            # from disk but may have reached peers, and reusing their sequence numbers for
            # different changes would fork the history.
            doc = _load_document(journal.recovered)
            journal.compact(doc.save())
            return cls(doc, journal, clock=clock, compact_after_bytes=compact_after_bytes)
        except BaseException:
            journal.close()
            raise

    def close(self) -> None:
        """Close the journal; later writes raise :class:`StoreError`. Idempotent."""
        with self._lock:
            if self._journal is not None:
                self._journal.close()
                self._journal = None

    def __enter__(self) -> ResourceStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- reading ----------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        """The revision of the latest event emitted (0 before any)."""
        return self._revision

    @property
    def document(self) -> StateDocument:
        """The state document, to read from; change it only through :meth:`update_document`."""
        return self._doc

    def get(self, kind: str, name: str) -> Resource | None:
        """The object ``kind``/``name``, or None."""
        self._check_kind(kind)
        return self._view[kind].get(name)

    def list(
        self, kind: str, label_selector: Mapping[str, str] | None = None
    ) -> builtins.list[Resource]:
        """The objects of ``kind`` sorted by name; with a selector, those whose labels match
        every pair in it."""
        self._check_kind(kind)
        # Copying is atomic under the GIL; iterating a dict that another thread writes is not.
        objects = dict(self._view[kind])
        return [
            objects[name]
            for name in sorted(objects)
            if not label_selector
            or all(
                objects[name].metadata.labels.get(key) == value
                for key, value in label_selector.items()
            )
        ]

    # --- writing ----------------------------------------------------------------------------

    def apply(
        self, resources: Sequence[Resource], *, dry_run: bool = False
    ) -> builtins.list[ApplyOutcome]:
        """Create or update objects from manifests, the way ``kubectl apply`` does, atomically.

        A new object gets a uid, generation 1 and a creation timestamp; its manifest's status
        is dropped (status belongs to reconcilers). An existing one takes spec, labels,
        annotations and finalizers from the manifest and keeps uid, creation timestamp and
        status; its generation moves only when its spec changed.

        Everything is checked before anything is written: a duplicate object in
        ``resources`` (:class:`StoreError`), an object being deleted or a manifest uid that
        differs from the object's (:class:`Conflict`) fails the whole batch. The writes are one
        change, one journal frame. With ``dry_run`` nothing is written.
        """
        with self._lock:
            plans = self._plan_apply(resources)
            if dry_run:
                return plans
            writes = [plan for plan in plans if plan.action != ApplyAction.UNCHANGED]
            if not writes:
                return plans

            def write(batch: Batch) -> None:
                for plan in writes:
                    batch.write(plan.kind, plan.name, to_dict(plan.object))

            self._commit(write)
            # Return what the view now holds: what was read back from the document.
            return [
                ApplyOutcome(p.kind, p.name, p.action, self._view[p.kind].get(p.name, p.object))
                for p in plans
            ]

    def _plan_apply(self, resources: Sequence[Resource]) -> builtins.list[ApplyOutcome]:
        seen: set[tuple[str, str]] = set()
        for resource in resources:
            self._check_kind(resource.kind)
            key = (resource.kind, resource.name)
            if key in seen:
                raise StoreError(
                    f"{describe(*key)} appears more than once in one apply; give each object once"
                )
            seen.add(key)
        now = format_timestamp(self._clock())
        plans: builtins.list[ApplyOutcome] = []
        for resource in resources:
            kind, name = resource.kind, resource.name
            current = self._view[kind].get(name)
            manifest = to_dict(resource)
            if current is None:
                plans.append(
                    ApplyOutcome(kind, name, ApplyAction.CREATED, self._created(manifest, now))
                )
                continue
            if current.metadata.deletion_timestamp is not None:
                raise Conflict(kind, name, "is being deleted; wait until it is gone to apply it")
            uid = resource.metadata.uid
            if uid is not None and uid != current.metadata.uid:
                raise Conflict(
                    kind, name, f"has uid {current.metadata.uid}, not {uid} as the manifest says"
                )
            updated = self._configured(current, manifest)
            action = ApplyAction.UNCHANGED if updated == current else ApplyAction.CONFIGURED
            plans.append(
                ApplyOutcome(kind, name, action, current if updated == current else updated)
            )
        return plans

    @staticmethod
    def _created(manifest: dict[str, Any], now: str) -> Resource:
        meta = manifest["metadata"]
        data = {
            **manifest,
            "metadata": {
                "name": meta["name"],
                "uid": str(uuid.uuid4()),
                "labels": meta.get("labels", {}),
                "annotations": meta.get("annotations", {}),
                "generation": 1,
                "creationTimestamp": now,
                "finalizers": meta.get("finalizers", []),
            },
        }
        data.pop("status", None)  # reverts to the kind's empty status
        return _validated(data)

    @staticmethod
    def _configured(current: Resource, manifest: dict[str, Any]) -> Resource:
        data = to_dict(current)
        meta, new_meta = data["metadata"], manifest["metadata"]
        for field in ("labels", "annotations", "finalizers"):
            meta[field] = new_meta.get(field, [] if field == "finalizers" else {})
        # Compared as JSON so that the answer does not depend on how the models were built.
        if manifest.get("spec") != data.get("spec"):
            meta["generation"] = (current.metadata.generation or 0) + 1
            data["spec"] = manifest.get("spec")
            if data["spec"] is None:
                del data["spec"]
        return _validated(data)

    def delete(self, kind: str, name: str) -> Resource:
        """Delete ``kind``/``name``: at once, or, while it has finalizers, by marking it with a
        deletion timestamp (set once) for the finalizers' owners to act on.

        Returns the object as it was removed, or as marked. Raises :class:`NotFound`.
        """
        with self._lock:
            current = self._require(kind, name)
            if current.metadata.finalizers:
                if current.metadata.deletion_timestamp is not None:
                    return current
                data = to_dict(current)
                data["metadata"]["deletionTimestamp"] = format_timestamp(self._clock())
                return self._write_one(_validated(data))
            self._remove(kind, name)
            return current

    def remove_finalizer(self, kind: str, name: str, finalizer: str) -> Resource | None:
        """Drop ``finalizer`` from ``kind``/``name``. An object being deleted goes once its last
        finalizer does: then this returns None, else the object as it now is."""
        with self._lock:
            current = self._require(kind, name)
            finalizers = current.metadata.finalizers
            if finalizer not in finalizers:
                return current
            remaining = [item for item in finalizers if item != finalizer]
            if not remaining and current.metadata.deletion_timestamp is not None:
                self._remove(kind, name)
                return None
            data = to_dict(current)
            data["metadata"]["finalizers"] = remaining
            return self._write_one(_validated(data))

    def update_status(
        self, kind: str, name: str, status: BaseModel | Mapping[str, Any]
    ) -> Resource:
        """Replace the status of ``kind``/``name``; spec, metadata and generation stay as they
        are. Only the fields that changed are written. Raises :class:`NotFound`, or
        :class:`StoreError` for a status that is not valid for the kind."""
        with self._lock:
            current = self._require(kind, name)
            data = to_dict(current)
            if isinstance(status, BaseModel):
                data["status"] = status.model_dump(mode="json", by_alias=True, exclude_none=True)
            else:
                data["status"] = dict(status)
            updated = _validated(data)
            if updated == current:
                return current
            return self._write_one(updated)

    def subscribe(self, callback: Callable[[ChangeEvent], None]) -> Callable[[], None]:
        """Call ``callback`` with every later event, in revision order; returns a function that
        unsubscribes. Callbacks run synchronously in the writer's thread and must not block; an
        exception in one is logged and does not stop the others."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    @contextmanager
    def update_document(self) -> Iterator[StateDocument]:
        """Change the document directly (to merge or sync changes from peers).

        On leaving the block, whatever moved the heads is journaled and turned into events,
        even if the block raised: changes already in the document must not go unrecorded.
        """
        with self._lock:
            self._check_open()
            before = self._doc.heads()
            try:
                yield self._doc
            finally:
                if self._doc.heads() != before:
                    self._persist_and_publish(before, None)

    # --- internals --------------------------------------------------------------------------

    def _check_kind(self, kind: str) -> None:
        if kind not in self._view:
            known = ", ".join(sorted(KIND_MODELS))
            raise StoreError(f'unknown kind "{kind}"; known kinds: {known}')

    def _check_open(self) -> None:
        if self._journal is None:
            raise StoreError("the store is closed")

    def _require(self, kind: str, name: str) -> Resource:
        self._check_kind(kind)
        current = self._view[kind].get(name)
        if current is None:
            raise NotFound(kind, name)
        return current

    def _remove(self, kind: str, name: str) -> None:
        def remove(batch: Batch) -> None:
            batch.remove(kind, name)

        self._commit(remove)

    def _write_one(self, obj: Resource) -> Resource:
        self._commit(lambda batch: batch.write(obj.kind, obj.name, to_dict(obj)))
        return self._view[obj.kind].get(obj.name, obj)

    def _commit(self, write: Callable[[Batch], None]) -> None:
        """Make ``write``'s writes one change, journal it, then publish its events."""
        self._check_open()
        before = self._doc.heads()
        try:
            with self._doc.batch() as batch:
                write(batch)
        except DocumentError as exc:  # the transaction was rolled back
            raise StoreError(f"cannot store the object: {exc}") from exc
        if self._doc.heads() == before:
            return
        self._persist_and_publish(before, batch.touched)

    def _persist_and_publish(
        self, before: builtins.list[bytes], touched: set[tuple[str, str]] | None
    ) -> None:
        journal = self._journal
        assert journal is not None
        try:
            journal.append(self._doc.changes_since(before))
        except (JournalError, OSError) as exc:
            # Not durable, so not acknowledged: go back to the heads before the write, under a
            # new actor id because the lost change's sequence number must not be reused.
            self._doc = StateDocument(self._doc.automerge.fork(before))
            self._doc.automerge.set_actor(am.random_actor_id())
            raise StoreError(f"cannot persist the change: {exc}") from exc
        self._publish(before, touched)
        if journal.appended_bytes > self._compact_after_bytes:
            try:
                journal.compact(self._doc.save())
            except (JournalError, OSError) as exc:
                # The journal as it is still holds everything; compaction can wait.
                log.warning("state journal compaction failed: %s", exc)

    def _publish(self, before: builtins.list[bytes], touched: set[tuple[str, str]] | None) -> None:
        """Bring the view up to date with the document and emit an event per difference.

        ``touched`` is the set of keys a local batch wrote, which is exactly what its change
        can touch; otherwise the document's diff since ``before`` says what to re-read.
        """
        if touched is None:
            touched = self._doc.touched(before)
        for kind, name in sorted(touched):
            if kind not in self._view:
                continue  # a kind this version does not know, written by a peer
            new = self._parse(kind, name, self._doc.read(kind, name))
            old = self._view[kind].get(name)
            if new is None:
                if old is None:
                    continue
                del self._view[kind][name]
                self._emit(ChangeType.DELETED, old)
            elif old is None:
                self._view[kind][name] = new
                self._emit(ChangeType.ADDED, new)
            elif new != old:
                self._view[kind][name] = new
                self._emit(ChangeType.MODIFIED, new)
        self._dispatch()

    def _emit(self, event_type: ChangeType, obj: Resource) -> None:
        self._revision += 1
        self._pending.append(ChangeEvent(event_type, obj.kind, obj.name, obj, self._revision))

    def _dispatch(self) -> None:
        # A callback that writes publishes from inside this loop; its events are queued and
        # delivered after the current one, so every subscriber sees revisions in order.
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while self._pending:
                event = self._pending.popleft()
                for callback in builtins.list(self._subscribers):
                    try:
                        callback(event)
                    except Exception:
                        log.exception("a change feed subscriber failed on %s", event)
        finally:
            self._dispatching = False

    @staticmethod
    def _parse(kind: str, name: str, data: dict[str, Any] | None) -> Resource | None:
        """The validated object in the document under ``kind``/``name``, or None.

        Peers are untrusted: an object that does not validate, or whose content names another
        kind or name than its key, is treated as absent and logged.
        """
        if data is None:
            return None
        try:
            obj = from_dict(data)
        except (ValidationError, UnknownKindError) as exc:
            log.warning("ignoring invalid %s in the state document: %s", describe(kind, name), exc)
            return None
        if obj.kind != kind or obj.name != name:
            log.warning(
                "ignoring %s in the state document: its content says %s",
                describe(kind, name),
                describe(obj.kind, obj.name),
            )
            return None
        return obj


def _validated(data: dict[str, Any]) -> Resource:
    try:
        return from_dict(data)
    except (ValidationError, UnknownKindError) as exc:
        raise StoreError(f"the resulting object is not valid: {exc}") from exc
