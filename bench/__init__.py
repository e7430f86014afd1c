"""Benchmarks: each compares against a baseline in the same run; `make bench` writes
docs/benchmarks.md."""
