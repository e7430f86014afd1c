"""JSON objects in stream frames: the heads, requests and answers that stream protocols exchange.

Every frame from a peer is hostile until checked (SPEC section 8): :func:`decode_object` caps
its size before parsing it and insists on a JSON object; the caller checks the fields. Each
protocol keeps its own error type, which it passes in.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["decode_object"]


def decode_object(frame: bytes, what: str, limit: int, error: type[Exception]) -> dict[str, Any]:
    """``frame`` as a JSON object of at most ``limit`` bytes; raises ``error`` with one sentence
    about ``what`` otherwise."""
    if len(frame) > limit:
        raise error(f"the {what} is {len(frame)} bytes, over the limit of {limit}")
    try:
        value = orjson.loads(frame)
    except orjson.JSONDecodeError:
        raise error(f"the {what} is not JSON") from None
    if not isinstance(value, dict):
        raise error(f"the {what} is not a JSON object")
    return value
