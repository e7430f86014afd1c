"""Objects that plugin-loading tests name as ``module:attribute``."""

from __future__ import annotations

from pollen.reconcilers import Context, Request, Result


class Labeller:
    """A working reconciler: labels every Workload."""

    name = "labeller"
    kind = "Workload"

    async def reconcile(self, request: Request, context: Context) -> Result:
        if context.get(request.kind, request.name) is not None:
            context.patch(request.kind, request.name, labels={"labelled": "yes"})
        return Result.done()


def raising_factory() -> Labeller:
    raise ValueError("no configuration")


not_a_reconciler = dict
