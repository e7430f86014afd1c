"""What a reconciler may do: read resources, write status, patch objects, record events."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from pollen.resources.conditions import set_condition
from pollen.resources.models import ConditionStatus, Resource, from_dict, to_dict
from pollen.state.errors import Conflict, NotFound, StoreError, describe
from pollen.state.events import EventLog, EventType
from pollen.state.store import ResourceStore

__all__ = ["Context"]


class Context:
    """A reconciler's handle on its node: the only door to the state document and the events.

    Every method acts at once and synchronously; they are meant to be called from the
    reconciler's coroutine, on the node's event loop, never from another thread. Because of
    that, each write re-reads the object and writes it in one step, so a reconciler never
    overwrites a change it did not see. Writes that change nothing write nothing.

    Methods that name a missing object raise :class:`pollen.state.NotFound`; writes to an object
    being deleted that only ``remove_finalizer`` may make raise :class:`pollen.state.Conflict`.
    Both count as temporary failures if the reconciler lets them through.
    """

    def __init__(
        self,
        store: ResourceStore,
        events: EventLog,
        *,
        node_name: str,
        reconciler_name: str,
        clock: Callable[[], datetime],
        logger: logging.Logger,
    ) -> None:
        """Made by the node for each reconciler; reconcilers never build one."""
        self._store = store
        self._events = events
        self._node_name = node_name
        self._reconciler_name = reconciler_name
        self._clock = clock
        self._log = logger
        self._thread = threading.get_ident()

    @property
    def node_name(self) -> str:
        """The name of the node this reconciler runs on."""
        return self._node_name

    @property
    def log(self) -> logging.Logger:
        """A logger named after the reconciler; the node's log shows what it writes."""
        return self._log

    # --- reading ----------------------------------------------------------------------------

    def get(self, kind: str, name: str) -> Resource | None:
        """The object ``kind``/``name`` as this node knows it now, or None if there is none."""
        self._check_thread()
        return self._store.get(kind, name)

    def list(self, kind: str, labels: Mapping[str, str] | None = None) -> list[Resource]:
        """The objects of ``kind`` sorted by name; with ``labels``, only those carrying every
        one of those labels."""
        self._check_thread()
        return self._store.list(kind, labels)

    # --- status -----------------------------------------------------------------------------

    def set_condition(
        self,
        kind: str,
        name: str,
        condition_type: str,
        status: bool | ConditionStatus,
        *,
        reason: str,
        message: str = "",
    ) -> Resource:
        """Set one condition in the object's ``status.conditions``, with ``observedGeneration``
        from the object's ``metadata.generation``; returns the object as it now is.

        ``lastTransitionTime`` moves only when the status flips. ``reason`` is one CamelCase
        word; ``message`` one sentence for people. Writing the same condition again writes
        nothing, so call it on every reconcile rather than tracking what was written.
        """
        self._check_thread()
        current = self._require(kind, name)
        status_model = current.status
        conditions = set_condition(
            getattr(status_model, "conditions", []),
            condition_type,
            status,
            reason=reason,
            message=message,
            observed_generation=current.metadata.generation,
            now=self._clock(),
        )
        data = self._status_dict(current)
        data["conditions"] = [
            c.model_dump(mode="json", by_alias=True, exclude_none=True) for c in conditions
        ]
        return self._store.update_status(kind, name, data)

    def update_status(self, kind: str, name: str, fields: Mapping[str, Any]) -> Resource:
        """Set top-level fields of the object's status (camelCase, as in a manifest, e.g.
        ``{"readyReplicas": 2}``) and ``status.observedGeneration`` from
        ``metadata.generation``; other fields stay. Returns the object as it now is."""
        self._check_thread()
        current = self._require(kind, name)
        data = self._status_dict(current)
        data.update(fields)
        return self._store.update_status(kind, name, data)

    # --- metadata and spec ------------------------------------------------------------------

    def patch(
        self,
        kind: str,
        name: str,
        *,
        labels: Mapping[str, str | None] | None = None,
        annotations: Mapping[str, str | None] | None = None,
        spec: Mapping[str, Any] | None = None,
    ) -> Resource:
        """Change labels, annotations or spec of an object, as a JSON merge patch (RFC 7386):
        a key set to None is removed, a nested mapping is merged into what is there.

        A spec change moves ``metadata.generation``, as a user's apply would. Returns the object
        as it now is; a patch that changes nothing writes nothing.
        """
        self._check_thread()
        current = self._require(kind, name)
        data = to_dict(current)
        meta = data["metadata"]
        if labels is not None:
            meta["labels"] = _merge_patch(meta.get("labels", {}), labels)
        if annotations is not None:
            meta["annotations"] = _merge_patch(meta.get("annotations", {}), annotations)
        if spec is not None:
            data["spec"] = _merge_patch(data.get("spec") or {}, spec)
        return self._apply(current, data)

    def apply(self, manifest: Mapping[str, Any]) -> Resource:
        """Create or update an object from a manifest, as ``pctl apply`` would: the manifest
        declares labels, annotations and spec; status and the system's metadata stay. Returns
        the object as it now is; an apply that changes nothing writes nothing.

        Raises :class:`pollen.state.StoreError` when the manifest is not a valid object.
        """
        self._check_thread()
        try:
            wanted = from_dict(dict(manifest))
        except (ValidationError, ValueError) as exc:
            raise StoreError(f"the manifest is not a valid object: {exc}") from exc
        outcome = self._store.apply([wanted])
        return outcome[0].object

    def delete(self, kind: str, name: str) -> Resource | None:
        """Delete an object: at once, or, if it has finalizers, mark it for deletion. Returns
        the object as marked, or None if it is gone (or was already)."""
        self._check_thread()
        if self._store.get(kind, name) is None:
            return None
        try:
            deleted = self._store.delete(kind, name)
        except NotFound:
            return None
        return deleted if deleted.metadata.finalizers else None

    def add_finalizer(self, kind: str, name: str, finalizer: str) -> Resource:
        """Add ``finalizer`` to the object, so that deleting it only marks it (sets
        ``metadata.deletionTimestamp``) until :meth:`remove_finalizer` takes the finalizer off:
        the reconciler sees the mark and cleans up first.

        Use a name you own, such as ``example.com/cleanup``. Adding it twice is a no-op; adding
        it to an object already being deleted raises :class:`pollen.state.Conflict`.
        """
        self._check_thread()
        current = self._require(kind, name)
        if finalizer in current.metadata.finalizers:
            return current
        data = to_dict(current)
        data["metadata"]["finalizers"] = [*current.metadata.finalizers, finalizer]
        return self._apply(current, data)

    def remove_finalizer(self, kind: str, name: str, finalizer: str) -> Resource | None:
        """Take ``finalizer`` off the object. If the object is being deleted and this was its
        last finalizer, it is gone now and this returns None; else the object as it now is."""
        self._check_thread()
        return self._store.remove_finalizer(kind, name, finalizer)

    # --- events -----------------------------------------------------------------------------

    def record_event(
        self, kind: str, name: str, reason: str, message: str, *, warning: bool = False
    ) -> None:
        """Record an event about ``kind``/``name`` on this node, as ``pctl events`` and
        ``pctl describe`` show it. Events are kept in memory, not in the document, so they are
        the place for what happens often; ``reason`` is one CamelCase word."""
        self._check_thread()
        self._events.record(
            kind, name, reason, message, EventType.WARNING if warning else EventType.NORMAL
        )

    # --- internals --------------------------------------------------------------------------

    def _check_thread(self) -> None:
        # The store calls its subscribers in the writer's thread, and the node's subscribers
        # expect the event loop's; a write from elsewhere would break them in subtle ways.
        if threading.get_ident() != self._thread:
            raise RuntimeError(
                f"reconciler {self._reconciler_name!r} used its Context from another thread; "
                "call it from the reconcile coroutine and run only blocking work in threads"
            )

    def _require(self, kind: str, name: str) -> Resource:
        current = self._store.get(kind, name)
        if current is None:
            raise NotFound(kind, name)
        return current

    @staticmethod
    def _status_dict(current: Resource) -> dict[str, Any]:
        status = current.status
        data: dict[str, Any] = (
            status.model_dump(mode="json", by_alias=True, exclude_none=True)
            if status is not None
            else {}
        )
        if current.metadata.generation is not None:
            data["observedGeneration"] = current.metadata.generation
        return data

    def _apply(self, current: Resource, data: dict[str, Any]) -> Resource:
        if current.metadata.deletion_timestamp is not None:
            raise Conflict(
                current.kind, current.name, "is being deleted; only finalizers may be removed"
            )
        try:
            updated = from_dict(data)
        except ValidationError as exc:
            raise StoreError(
                f"the patched {describe(current.kind, current.name)} is not valid: {exc}"
            ) from exc
        if updated == current:
            return current
        outcome = self._store.apply([updated])
        return outcome[0].object


def _merge_patch(target: Any, patch: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386: ``patch`` merged into ``target``; None removes a key."""
    result: dict[str, Any] = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, Mapping):
            result[key] = _merge_patch(result.get(key), value)
        else:
            result[key] = value
    return result
