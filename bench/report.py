"""Result rows and the markdown report that ``make bench`` writes."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import psutil


@dataclass(frozen=True)
class Row:
    """One measured figure, its baseline from the same run, and its target."""

    what: str
    value: str
    baseline: str = "—"
    ratio: str = "—"
    target: str = "—"
    met: bool | None = None


@dataclass(frozen=True)
class Section:
    title: str
    rows: Sequence[Row]
    notes: str = ""


def median_time(fn: Callable[[], object], runs: int) -> tuple[float, list[float]]:
    """Median wall-clock seconds of ``runs`` calls of ``fn``, and every sample."""
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), samples


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds >= 0.1 else f"{seconds * 1000:.1f} ms"


def kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def render_section(section: Section) -> str:
    """One section of docs/benchmarks.md, from its ``##`` title to its notes."""
    lines = [f"## {section.title}", ""]
    lines += ["| what | measured | baseline (same run) | ratio | target | met |"]
    lines += ["|---|---|---|---|---|---|"]
    for row in section.rows:
        met = "—" if row.met is None else ("yes" if row.met else "**no**")
        cells = (row.what, row.value, row.baseline, row.ratio, row.target, met)
        lines.append("| " + " | ".join(cells) + " |")
    if section.notes:
        lines += ["", section.notes.strip()]
    lines.append("")
    return "\n".join(lines)


def splice(document: str, sections: Sequence[Section]) -> str:
    """``document`` (docs/benchmarks.md) with ``sections`` replacing those of the same title,
    or appended: for re-running some benchmarks without the others."""
    parts = document.split("\n## ")
    head, bodies = parts[0], parts[1:]
    by_title = {body.split("\n", 1)[0]: body for body in bodies}
    for section in sections:
        text = render_section(section)[len("## ") :]
        if section.title in by_title:
            bodies[bodies.index(by_title[section.title])] = text
        else:
            bodies.append(text)
    return "\n## ".join([head.rstrip("\n") + "\n", *(b.rstrip("\n") + "\n" for b in bodies)])


def render(sections: Sequence[Section]) -> str:
    """The whole of docs/benchmarks.md."""
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench`; do not edit by hand. Figures are medians of repeated runs on a",
        "noisy shared machine; each is set beside a baseline measured in the same run.",
        "",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / (1 << 30):.0f} GiB, {platform.machine()}",
        f"- Python {platform.python_version()} on {platform.system()}",
        "",
    ]
    for section in sections:
        lines.append(render_section(section))
    return "\n".join(lines)
