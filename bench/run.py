"""``make bench``: run every benchmark and write docs/benchmarks.md."""

from __future__ import annotations

import sys
from pathlib import Path

from bench import (
    foundation,
    gateway,
    mesh_real,
    mesh_sim,
    placement,
    runtime,
    vivaldi_netns,
)
from bench.report import render

OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def main() -> int:
    sections = [
        foundation.run(),
        mesh_sim.run(),
        mesh_real.run(),
        vivaldi_netns.run(),
        runtime.run(),
        gateway.run(),
        placement.run(),
    ]
    OUTPUT.write_text(render(sections))
    print(OUTPUT.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
