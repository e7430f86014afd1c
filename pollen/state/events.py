"""Events: a node-local, bounded record of what happened to which object.

Events are telemetry, not desired state, so they never go into the Automerge document (which
keeps all history forever). Each node keeps its most recent events in memory and serves them;
``pctl describe`` and ``pctl events`` read them from the node they talk to.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from pollen.resources.conditions import format_timestamp


class EventType(StrEnum):
    NORMAL = "Normal"
    WARNING = "Warning"


@dataclass(frozen=True)
class Event:
    """One thing that happened to an object, as ``kubectl get events`` shows it."""

    type: EventType
    reason: str
    message: str
    kind: str
    name: str
    timestamp: datetime
    node: str
    count: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": str(self.type),
            "reason": self.reason,
            "message": self.message,
            "involvedObject": {"kind": self.kind, "name": self.name},
            "timestamp": format_timestamp(self.timestamp),
            "node": self.node,
            "count": self.count,
        }


EventListener = Callable[[Event], None]


class EventLog:
    """The last ``capacity`` events of this node, with subscribers for watches.

    A repeat of the latest event for the same object (same type, reason and message) bumps its
    count instead of adding a line, the way Kubernetes aggregates events.
    """

    def __init__(self, node: str, clock: Callable[[], datetime], capacity: int = 1000) -> None:
        self._node = node
        self._clock = clock
        self._events: deque[Event] = deque(maxlen=capacity)
        self._listeners: list[EventListener] = []

    def record(
        self,
        kind: str,
        name: str,
        reason: str,
        message: str,
        event_type: EventType = EventType.NORMAL,
    ) -> Event:
        now = self._clock()
        last = self._events[-1] if self._events else None
        if last is not None and (last.kind, last.name, last.type, last.reason, last.message) == (
            kind,
            name,
            event_type,
            reason,
            message,
        ):
            event = replace(last, count=last.count + 1, timestamp=now)
            self._events[-1] = event
        else:
            event = Event(event_type, reason, message, kind, name, now, self._node)
            self._events.append(event)
        for listener in list(self._listeners):
            listener(event)
        return event

    def list(self, kind: str | None = None, name: str | None = None) -> list[Event]:
        """Events oldest first, optionally only those about one kind or one object."""
        return [
            e
            for e in self._events
            if (kind is None or e.kind == kind) and (name is None or e.name == name)
        ]

    def subscribe(self, listener: EventListener) -> Callable[[], None]:
        """Call ``listener`` for every new event until the returned function is called."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe
