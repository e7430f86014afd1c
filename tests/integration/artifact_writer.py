"""Store artifacts ``a-0``, ``a-1``, ... in an artifact store forever, reporting each commit.

Usage: ``python artifact_writer.py STORE_DIR SEED [--stall]``. Prints ``ready`` once the store
is open, ``writing DIGEST`` before each artifact's first byte and ``stored DIGEST`` after its
commit returned, all flushed. With ``--stall``, it writes half of the first artifact, prints
``stalled DIGEST`` and waits to be killed. The contents are random (seeded), 64 KiB to 2 MiB,
written 64 KiB at a time.
"""

from __future__ import annotations

import hashlib
import random
import sys
import threading
from pathlib import Path

from pollen.runtime.artifacts import ArtifactStore

PIECE = 64 * 1024


def main() -> None:
    store = ArtifactStore(Path(sys.argv[1]))
    rng = random.Random(int(sys.argv[2]))
    stall = "--stall" in sys.argv[3:]
    print("ready", flush=True)
    while True:
        data = rng.randbytes(rng.randint(PIECE, 2 * 1024 * 1024))
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        print(f"writing {digest}", flush=True)
        with store.writer(digest, size=len(data)) as writer:
            for offset in range(0, len(data), PIECE):
                if stall and offset >= len(data) // 2:
                    print(f"stalled {digest}", flush=True)
                    threading.Event().wait()
                writer.write(data[offset : offset + PIECE])
            writer.commit()
        print(f"stored {digest}", flush=True)


if __name__ == "__main__":
    main()
