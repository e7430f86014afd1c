"""Reconcilers: control loops that make the swarm match its resources. The plugin API.

A reconciler watches one kind. Whenever an object of that kind changes (locally or on a peer),
when the node learns something about it that the document does not say, and every few minutes
regardless, the node calls ``reconcile`` with the object's key. The reconciler reads what is
desired and what is observed through its :class:`Context`, acts, writes what it saw to the
object's status, and returns a :class:`Result`, or raises.

Write one, package it with an entry point in the group ``pollen.reconcilers``, and enable it
with ``pollen node --plugin NAME``; ``docs/plugins.md`` walks through it. Everything a plugin
needs is exported here; the rest of this package is the node's business.

>>> class Hello:
...     name = "hello"
...     kind = "Workload"
...     async def reconcile(self, request: Request, context: Context) -> Result:
...         return Result.done()
"""

from pollen.reconcilers._context import Context
from pollen.reconcilers._contract import (
    PermanentError,
    Reconciler,
    Request,
    Result,
    TemporaryError,
)

__all__ = [
    "Context",
    "PermanentError",
    "Reconciler",
    "Request",
    "Result",
    "TemporaryError",
]
