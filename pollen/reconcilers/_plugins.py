"""Finding reconcilers: checking that an object is one, and loading plugins by name."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Final

from pollen.reconcilers._contract import Reconciler
from pollen.resources.models import KIND_MODELS

__all__ = ["ENTRY_POINT_GROUP", "LoadedPlugin", "PluginError", "check_reconciler", "load_plugins"]

#: The entry-point group plugin packages register their reconciler factories in.
ENTRY_POINT_GROUP: Final = "pollen.reconcilers"

_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class PluginError(Exception):
    """A plugin could not be loaded, or an object is not a reconciler; one sentence why."""


@dataclass(frozen=True)
class LoadedPlugin:
    """A plugin that loaded: the name it was enabled by and the reconciler its factory made."""

    name: str
    reconciler: Reconciler


def check_reconciler(candidate: object, source: str) -> Reconciler:
    """``candidate`` if it satisfies :class:`Reconciler`, else :class:`PluginError` saying why.

    ``source`` names where it came from, for the message.
    """
    name = getattr(candidate, "name", None)
    kind = getattr(candidate, "kind", None)
    reconcile = getattr(candidate, "reconcile", None)
    if reconcile is None or name is None or kind is None:
        missing = [
            attr
            for attr, value in (("name", name), ("kind", kind), ("reconcile", reconcile))
            if value is None
        ]
        raise PluginError(
            f"{source} gave a {type(candidate).__name__}, which is not a reconciler: "
            f"it has no {', '.join(missing)}"
        )
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise PluginError(
            f"{source}: the reconciler's name {name!r} is not a lowercase DNS label "
            "(a-z, 0-9 and '-', at most 63 characters)"
        )
    if kind not in KIND_MODELS:
        known = ", ".join(sorted(KIND_MODELS))
        raise PluginError(f"{source}: reconciler {name!r} watches kind {kind!r}; known: {known}")
    if not inspect.iscoroutinefunction(reconcile):
        raise PluginError(
            f"{source}: reconciler {name!r} has a reconcile that is not 'async def'; "
            "reconcilers are coroutines (run blocking work with asyncio.to_thread)"
        )
    assert isinstance(candidate, Reconciler)
    return candidate


def _entry_point(name: str) -> EntryPoint:
    if ":" in name:
        # module:attribute, for a plugin that is importable but not packaged (yet).
        return EntryPoint(name=name, value=name, group=ENTRY_POINT_GROUP)
    found = entry_points(group=ENTRY_POINT_GROUP).select(name=name)
    for entry_point in found:
        return entry_point
    installed = sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})
    raise PluginError(
        f'no plugin "{name}" is installed (entry-point group {ENTRY_POINT_GROUP}; '
        + (f"installed: {', '.join(installed)})" if installed else "none is installed)")
    )


def load_plugin(name: str) -> LoadedPlugin:
    """Load the plugin enabled as ``name``: an entry point in ``pollen.reconcilers``, or a
    ``module:attribute`` path. The entry point names a factory (a class or a function) that is
    called without arguments and returns the reconciler. Raises :class:`PluginError`."""
    entry_point = _entry_point(name)
    source = f'plugin "{name}" ({entry_point.value})'
    try:
        factory = entry_point.load()
    except (Exception, SystemExit) as exc:
        raise PluginError(f"{source} cannot be imported: {_describe(exc)}") from exc
    if not callable(factory):
        raise PluginError(f"{source} is a {type(factory).__name__}, not a reconciler factory")
    try:
        candidate = factory()
    except (Exception, SystemExit) as exc:
        raise PluginError(f"{source}: its factory raised {_describe(exc)}") from exc
    return LoadedPlugin(name, check_reconciler(candidate, source))


def load_plugins(names: Iterable[str]) -> tuple[list[LoadedPlugin], list[PluginError]]:
    """Load each plugin named once; the ones that loaded, and why the others did not."""
    loaded: list[LoadedPlugin] = []
    failed: list[PluginError] = []
    for name in dict.fromkeys(names):
        try:
            loaded.append(load_plugin(name))
        except PluginError as exc:
            failed.append(exc)
    return loaded, failed


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
