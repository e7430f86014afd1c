"""Pollen: a leaderless orchestrator for WebAssembly workloads."""

__version__ = "0.1.0"
