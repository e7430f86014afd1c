"""Simulation tests: whole swarms in one process on virtual time."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "sim: runs the deterministic simulator (seconds of CPU, not of waiting)"
    )
