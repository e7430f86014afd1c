"""The API's failure answer, shared by the server (which raises it) and the client (which
decodes it), so both sides agree on one shape: a Kubernetes-style ``Status`` object."""

from __future__ import annotations

from typing import Any

from pollen import API_VERSION


class ApiError(Exception):
    """A failure answer from the node (a ``Status`` object), or no answer at all.

    ``code`` is the HTTP status, or 0 when the node could not be reached. ``str(error)`` is the
    one-sentence ``message``.
    """

    def __init__(
        self, code: int, reason: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details: dict[str, Any] = details or {}

    def __repr__(self) -> str:
        return f"ApiError({self.code}, {self.reason!r}, {self.message!r}, {self.details!r})"

    def to_status(self) -> dict[str, Any]:
        """The ``Status`` object that carries this error on the wire."""
        body: dict[str, Any] = {
            "apiVersion": API_VERSION,
            "kind": "Status",
            "status": "Failure",
            "code": self.code,
            "reason": self.reason,
            "message": self.message,
        }
        if self.details:
            body["details"] = self.details
        return body
