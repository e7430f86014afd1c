"""Plugins that fail in each way a node must survive; their entry points are in pyproject.toml.

``broken-import`` names a module that does not exist.
"""

from __future__ import annotations

import asyncio

from pollen.reconcilers import Context, Request, Result


def raising_factory() -> object:
    """``broken-factory``: the factory itself fails."""
    raise RuntimeError("the plugin's configuration is missing")


class NotAReconciler:
    """``not-a-reconciler``: loads and builds, but has no reconcile."""

    name = "not-a-reconciler"


class Hanging:
    """``hanging``: never finishes a reconcile, so every call runs into the timeout."""

    name = "hanging"
    kind = "Workload"

    async def reconcile(self, request: Request, context: Context) -> Result:
        await asyncio.Event().wait()
        return Result.done()
