"""The node's side of the reconciler framework: runs every enabled reconciler.

Not part of the plugin API (that is :mod:`pollen.reconcilers`): the node builds one
:class:`ReconcilerManager`, adds its built-in reconcilers and the plugins it was told to enable,
and feeds it the change feed and local runtime events.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from pollen.reconcilers._context import Context
from pollen.reconcilers._contract import Reconciler
from pollen.reconcilers._controller import Controller, ControllerSettings
from pollen.reconcilers._plugins import PluginError, check_reconciler, load_plugins
from pollen.resources.models import ConditionStatus
from pollen.state.errors import StoreError
from pollen.state.events import EventLog, EventType
from pollen.state.store import ChangeEvent, ResourceStore

__all__ = ["PLUGINS_CONDITION", "ControllerSettings", "ReconcilerManager"]

log = logging.getLogger(__name__)

#: Condition on this node's Node: whether every plugin it was told to enable runs.
PLUGINS_CONDITION = "PluginsLoaded"


def _utcnow() -> datetime:
    return datetime.now(UTC)


class ReconcilerManager:
    """Every reconciler of one node, each in its own :class:`Controller`."""

    def __init__(
        self,
        store: ResourceStore,
        events: EventLog,
        *,
        node_name: str,
        settings: ControllerSettings | None = None,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._store = store
        self._events = events
        self._node_name = node_name
        self._settings = settings or ControllerSettings()
        self._clock = clock
        self._reconcilers: list[Reconciler] = []
        self._controllers: dict[str, Controller] = {}
        self._enabled_plugins: list[str] = []
        self._failed_plugins: list[PluginError] = []
        self._unsubscribe: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    # --- what runs --------------------------------------------------------------------------

    def add(self, reconciler: object, *, source: str = "a built-in") -> Reconciler:
        """Run ``reconciler`` (a built-in); raises :class:`PluginError` if it is not one or
        its name is taken. Call before :meth:`start`."""
        checked = check_reconciler(reconciler, source)
        if any(r.name == checked.name for r in self._reconcilers):
            raise PluginError(f"{source}: a reconciler named {checked.name!r} is already enabled")
        self._reconcilers.append(checked)
        return checked

    def enable_plugins(self, names: Iterable[str]) -> list[PluginError]:
        """Load and add the plugins ``names``; one that cannot be loaded is left out, logged in
        one sentence, and recorded as a Warning event on this node's Node. Returns the
        failures. Call before :meth:`start`."""
        loaded, failed = load_plugins(names)
        for plugin in loaded:
            try:
                self.add(plugin.reconciler, source=f'plugin "{plugin.name}"')
                self._enabled_plugins.append(plugin.name)
            except PluginError as exc:
                failed.append(exc)
        for failure in failed:
            log.error("%s; the node runs without it", failure)
            self._events.record(
                "Node",
                self._node_name,
                "PluginFailed",
                f"{failure}; the node runs without it",
                EventType.WARNING,
            )
        for name in self._enabled_plugins:
            log.info('plugin "%s" enabled', name)
        self._failed_plugins.extend(failed)
        return failed

    @property
    def controllers(self) -> dict[str, Controller]:
        """The running controllers by reconciler name."""
        return dict(self._controllers)

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start a controller per reconciler and follow the change feed. Call once this
        node's Node exists, so that plugin failures can be shown on it."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        for reconciler in self._reconcilers:
            context = Context(
                self._store,
                self._events,
                node_name=self._node_name,
                reconciler_name=reconciler.name,
                clock=self._clock,
                logger=logging.getLogger(f"pollen.reconcilers.{reconciler.name}"),
            )
            self._controllers[reconciler.name] = Controller(reconciler, context, self._settings)
        # Subscribe before the initial lists, so that no change falls between the two.
        self._unsubscribe = self._store.subscribe(self._on_change)
        for controller in self._controllers.values():
            controller.start()
        self._show_plugins()

    async def stop(self) -> None:
        """Stop following changes and stop every controller."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        await asyncio.gather(*(c.stop() for c in self._controllers.values()))
        self._controllers.clear()

    # --- feeding ----------------------------------------------------------------------------

    def enqueue(self, kind: str, name: str) -> None:
        """Reconcile ``kind``/``name`` soon with every reconciler of that kind: for local
        events the document does not see (an instance exited, an artifact arrived). Safe to
        call from any thread."""
        self._on_loop(self._enqueue, kind, name)

    def _on_change(self, change: ChangeEvent) -> None:
        # The store calls back in the writer's thread, which is not always the loop's.
        self._on_loop(self._enqueue, change.kind, change.name)

    def _enqueue(self, kind: str, name: str) -> None:
        for controller in self._controllers.values():
            if controller.kind == kind:
                controller.enqueue(name)

    def _on_loop(self, callback: Callable[[str, str], None], kind: str, name: str) -> None:
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            callback(kind, name)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(callback, kind, name)

    def _show_plugins(self) -> None:
        """Say on this node's Node whether every plugin it was told to enable runs.

        Written only when plugins were asked for, and only when it changes (the store skips a
        write that changes nothing): a slow-changing fact, fit for the document.
        """
        if not self._enabled_plugins and not self._failed_plugins:
            return
        if self._failed_plugins:
            status, reason = ConditionStatus.FALSE, "PluginFailed"
            message = "; ".join(str(f) for f in self._failed_plugins)[:8192]
        else:
            status, reason = ConditionStatus.TRUE, "PluginsLoaded"
            message = "running plugins: " + ", ".join(self._enabled_plugins)
        context = Context(
            self._store,
            self._events,
            node_name=self._node_name,
            reconciler_name="plugins",
            clock=self._clock,
            logger=log,
        )
        if self._store.get("Node", self._node_name) is None:
            return
        try:
            context.set_condition(
                "Node", self._node_name, PLUGINS_CONDITION, status, reason=reason, message=message
            )
        except StoreError as exc:
            log.warning("could not write %s on this node's Node: %s", PLUGINS_CONDITION, exc)
