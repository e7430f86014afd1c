"""The state of the swarm: the Automerge document, its journal, and the typed resource store."""

from pollen.state.document import Batch, DocumentError, StateDocument
from pollen.state.errors import Conflict, NotFound, StoreError
from pollen.state.journal import Journal, JournalError, Recovered
from pollen.state.store import (
    ApplyAction,
    ApplyOutcome,
    ChangeEvent,
    ChangeType,
    ResourceStore,
)

__all__ = [
    "ApplyAction",
    "ApplyOutcome",
    "Batch",
    "ChangeEvent",
    "ChangeType",
    "Conflict",
    "DocumentError",
    "Journal",
    "JournalError",
    "NotFound",
    "Recovered",
    "ResourceStore",
    "StateDocument",
    "StoreError",
]
