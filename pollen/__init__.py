"""Pollen: a leaderless orchestrator for WebAssembly workloads."""

from typing import Final

__version__ = "0.1.0"

#: The API group and version of every resource, request and config file. Defined here, free of
#: imports, so that light clients (pctl) can use it without loading the models.
API_VERSION: Final = "pollen.dev/v1alpha1"
