"""What workloads use, and what the node has: counters for the scheduler and ``pctl top``.

``UsageCounters`` are per workload and updated by the executors from any thread.
``node_telemetry`` reads the machine through psutil; it keeps no state of its own (CPU load
is the difference between two samples, so the caller passes the previous one in).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import psutil


@dataclass(frozen=True)
class UsageSnapshot:
    """A workload's usage at one moment."""

    #: Instances running now, and ever started.
    instances: int
    instances_total: int
    #: Linear memory of the instances running now (as of their start, or their last
    #: measurement), and the largest any one instance reached.
    memory_bytes: int
    memory_peak_bytes: int
    cpu_seconds: float
    requests: int
    errors: int
    errors_by_reason: dict[str, int] = field(default_factory=dict)


class UsageCounters:
    """Thread-safe per-workload counters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._instances = 0
        self._instances_total = 0
        self._memory = 0
        self._memory_peak = 0
        self._cpu = 0.0
        self._requests = 0
        self._errors: Counter[str] = Counter()
        self._typical_memory = 0

    def instance_started(self) -> None:
        """An instance begins; its memory counts at the size the last one ended with."""
        with self._lock:
            self._instances += 1
            self._instances_total += 1
            self._memory += self._typical_memory

    def instance_ended(self, memory_bytes: int, cpu_seconds: float) -> None:
        """An instance ended having used ``memory_bytes`` and ``cpu_seconds``."""
        with self._lock:
            self._instances -= 1
            self._memory = max(0, self._memory - self._typical_memory)
            if memory_bytes:
                self._typical_memory = memory_bytes
            self._memory_peak = max(self._memory_peak, memory_bytes)
            self._cpu += cpu_seconds

    def request(self) -> None:
        """Count one request served (or attempted)."""
        with self._lock:
            self._requests += 1

    def error(self, reason: str) -> None:
        """Count one failure, by condition reason (``Timeout``, ``Trapped``, ...)."""
        with self._lock:
            self._errors[reason] += 1

    def snapshot(self) -> UsageSnapshot:
        """The counters now."""
        with self._lock:
            return UsageSnapshot(
                instances=self._instances,
                instances_total=self._instances_total,
                memory_bytes=self._memory,
                memory_peak_bytes=self._memory_peak,
                cpu_seconds=self._cpu,
                requests=self._requests,
                errors=sum(self._errors.values()),
                errors_by_reason=dict(self._errors),
            )


@dataclass(frozen=True)
class NodeTelemetry:
    """The machine's CPU and memory at one moment, for placement scores."""

    time: float
    cpu_count: int
    #: CPU busy share since the previous sample, 0-100 (None for a first sample).
    cpu_percent: float | None
    load_average_1m: float
    memory_total_bytes: int
    memory_available_bytes: int
    #: Cumulative CPU times, to compute the next sample's ``cpu_percent``.
    cpu_busy_seconds: float
    cpu_total_seconds: float
    process_rss_bytes: int

    @property
    def memory_used_percent(self) -> float:
        """Share of memory in use, 0-100."""
        if not self.memory_total_bytes:
            return 0.0
        return 100.0 * (1 - self.memory_available_bytes / self.memory_total_bytes)


def node_telemetry(previous: NodeTelemetry | None = None) -> NodeTelemetry:
    """Sample the node now; CPU load is measured since ``previous`` when it is given."""
    times = psutil.cpu_times()
    total = float(sum(times))
    idle = float(times.idle + getattr(times, "iowait", 0.0))
    busy = total - idle
    percent: float | None = None
    if previous is not None and total > previous.cpu_total_seconds:
        span = total - previous.cpu_total_seconds
        percent = max(0.0, min(100.0, 100.0 * (busy - previous.cpu_busy_seconds) / span))
    memory = psutil.virtual_memory()
    return NodeTelemetry(
        time=time.time(),
        cpu_count=psutil.cpu_count() or 1,
        cpu_percent=percent,
        load_average_1m=os.getloadavg()[0],
        memory_total_bytes=int(memory.total),
        memory_available_bytes=int(memory.available),
        cpu_busy_seconds=busy,
        cpu_total_seconds=total,
        process_rss_bytes=int(psutil.Process().memory_info().rss),
    )
