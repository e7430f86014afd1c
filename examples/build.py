"""Build the example workloads into ``build/examples/NAME.wasm``.

    python examples/build.py [--out build/examples] [--force] [NAME ...]

C sources are compiled for wasm32-wasi with the ``ziglang`` package from PyPI (no toolchain to
install by hand); ``.wat`` sources are assembled with ``wasmtime.wat2wasm``. A module is rebuilt
only when it is older than its source or the header it may include, so a second run is instant.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
INCLUDE = HERE / "include"
DEFAULT_OUT = HERE.parent / "build" / "examples"
# Flags from SPEC section 9: small modules, no debug sections.
CFLAGS = [
    "--target=wasm32-wasi",
    "-Os",
    "-s",
    "-Wall",
    "-Werror",
    # zig links a 16 MiB stack by default, which alone would not fit a 16 MB memory limit;
    # 256 KiB is plenty for these programs and leaves the rest of memoryMB to the heap.
    "-Wl,-z,stack-size=262144",
]


def sources() -> dict[str, Path]:
    """Every example, by name: ``NAME.c`` or ``NAME.wat`` in this folder."""
    found: dict[str, Path] = {}
    for path in sorted(HERE.iterdir()):
        if path.suffix in (".c", ".wat"):
            if path.stem in found:
                raise SystemExit(f"two sources for example {path.stem!r}")
            found[path.stem] = path
    return found


def _inputs(source: Path) -> list[Path]:
    if source.suffix == ".c":
        return [source, *sorted(INCLUDE.glob("*.h"))]
    return [source]


def up_to_date(source: Path, target: Path) -> bool:
    """Whether ``target`` exists and is newer than everything it is built from."""
    if not target.exists():
        return False
    built = target.stat().st_mtime_ns
    return all(path.stat().st_mtime_ns <= built for path in _inputs(source))


def build_one(source: Path, target: Path) -> None:
    """Build ``source`` into ``target``, writing a temporary file first so that a failed or
    interrupted build never leaves a truncated module that looks up to date."""
    tmp = target.with_name(f".{target.name}.tmp")
    if source.suffix == ".wat":
        import wasmtime

        tmp.write_bytes(wasmtime.wat2wasm(source.read_text()))
    else:
        command = [
            sys.executable,
            "-m",
            "ziglang",
            "cc",
            *CFLAGS,
            f"-I{INCLUDE}",
            str(source),
            "-o",
            str(tmp),
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"{source.name} did not compile:\n{result.stderr.strip()}")
    tmp.replace(target)


def build(
    out: Path = DEFAULT_OUT, names: list[str] | None = None, force: bool = False
) -> dict[str, Path]:
    """Build the examples (all, or ``names``) into ``out``; return every module's path."""
    available = sources()
    wanted = names or list(available)
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise SystemExit(f"unknown example(s): {', '.join(unknown)}; known: {', '.join(available)}")
    out.mkdir(parents=True, exist_ok=True)
    targets = {name: out / f"{name}.wasm" for name in wanted}
    stale = [name for name in wanted if force or not up_to_date(available[name], targets[name])]
    # Compiles are separate processes: run a few at once.
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(build_one, available[name], targets[name]) for name in stale]
        errors = []
        for future in futures:
            try:
                future.result()
            except RuntimeError as exc:
                errors.append(str(exc))
    if errors:
        raise RuntimeError("\n".join(errors))
    return targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the example workloads.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument("names", nargs="*", help="examples to build (default: all)")
    args = parser.parse_args(argv)
    try:
        targets = build(args.out, args.names or None, args.force)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, path in targets.items():
        print(f"{name}: {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
