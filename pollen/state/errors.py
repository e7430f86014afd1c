"""Errors of the resource store, each with a one-sentence message fit for a user."""

from __future__ import annotations

__all__ = ["Conflict", "NotFound", "StoreError"]


def describe(kind: str, name: str) -> str:
    """How messages name an object: ``workload "hello"``."""
    return f'{kind.lower()} "{name}"'


class StoreError(Exception):
    """A store operation was refused or failed; nothing was written."""


class NotFound(StoreError):
    """The object does not exist."""

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"{describe(kind, name)} not found")
        self.kind = kind
        self.name = name


class Conflict(StoreError):
    """The operation contradicts the object's current state (for example, it is being deleted)."""

    def __init__(self, kind: str, name: str, reason: str) -> None:
        super().__init__(f"{describe(kind, name)} {reason}")
        self.kind = kind
        self.name = name
