"""``make bench``: run every benchmark and write docs/benchmarks.md."""

from __future__ import annotations

import sys
from pathlib import Path

from bench import (
    artifacts,
    foundation,
    gateway,
    mesh_real,
    mesh_sim,
    placement,
    runtime,
    vivaldi_netns,
)
from bench.report import Section, render, splice

OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


SECTIONS = {
    "foundation": foundation.run,
    "mesh_sim": mesh_sim.run,
    "mesh_real": mesh_real.run,
    "vivaldi_netns": vivaldi_netns.run,
    "runtime": runtime.run,
    "gateway": gateway.run,
    "placement": placement.run,
    "artifacts": artifacts.run,
}


def main(argv: list[str]) -> int:
    """Every benchmark, or only those named (``python -m bench.run placement gateway``): then
    their sections replace the same sections of docs/benchmarks.md and the rest stays."""
    unknown = [name for name in argv if name not in SECTIONS]
    if unknown:
        print(f"unknown benchmarks {unknown}; known: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    chosen = argv or list(SECTIONS)
    sections: list[Section] = [SECTIONS[name]() for name in chosen]
    if argv and OUTPUT.exists():
        OUTPUT.write_text(splice(OUTPUT.read_text(), sections))
    else:
        OUTPUT.write_text(render(sections))
    print(OUTPUT.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
