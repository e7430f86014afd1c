"""Small helpers shared by tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def wait_for(
    condition: Callable[[], object], timeout: float = 20.0, what: str = "condition"
) -> object:
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout`` s.

    Tests wait on conditions with a deadline, never on fixed sleeps.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


async def wait_until(
    condition: Callable[[], object], within: float = 20.0, what: str = "condition"
) -> object:
    """:func:`wait_for` for asyncio tests: polls without blocking the event loop; fails after
    ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.01)
