"""Apply Workloads ``w-0``, ``w-1``, ... one per apply, forever, reporting each acknowledgement.

Usage: ``python state_writer.py STATE_DIR``. Prints ``ready`` once the store is open, then each
Workload's name on its own line, flushed, after its apply returned: a name on stdout is a write
the store acknowledged, which must survive ``kill -9``. Numbering continues after the highest
name already in the store, so the program can be killed and started again on one directory.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

from pollen.resources.models import from_dict
from pollen.state import ResourceStore

DIGEST = "sha256:" + "c" * 64


def main() -> None:
    store = ResourceStore.open(Path(sys.argv[1]))
    taken = [int(obj.name[2:]) for obj in store.list("Workload") if obj.name.startswith("w-")]
    start = max(taken, default=-1) + 1
    print("ready", flush=True)
    for index in itertools.count(start):
        name = f"w-{index}"
        workload = from_dict(
            {
                "apiVersion": "pollen.dev/v1alpha1",
                "kind": "Workload",
                "metadata": {"name": name, "labels": {"writer": "kill9"}},
                "spec": {"artifact": DIGEST, "replicas": index % 5, "args": [name]},
            }
        )
        store.apply([workload])
        sys.stdout.write(name + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
