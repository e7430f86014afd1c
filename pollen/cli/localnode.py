"""Start ``pollen node`` processes on this machine and wait until they serve.

Used by ``pollen demo`` (and ``pollen up`` later), and by tests and benchmarks, so that every
one of them starts nodes the same way a user would: as separate processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """The path of one of our console scripts next to this interpreter, else its bare name."""
    candidate = BIN / name
    return str(candidate) if candidate.exists() else name


class NodeStartError(Exception):
    """The node process exited or did not start serving in time."""


@dataclass
class LocalNode:
    """A ``pollen node`` process on this machine."""

    data_dir: Path
    log_path: Path
    env: dict[str, str] | None = None
    extra_args: list[str] = field(default_factory=list)
    api: str = "127.0.0.1:0"
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    endpoints: dict[str, object] = field(default_factory=dict)

    @property
    def token(self) -> str:
        return (self.data_dir / "api-token").read_text().strip()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> None:
        """Start the process and return once its API is bound and serving."""
        self.spawn()
        self.wait_serving(timeout)

    def spawn(self) -> None:
        """Start the process without waiting for it (see :meth:`wait_serving`)."""
        from pollen.node import ENDPOINTS_FILE

        url_file = self.data_dir / ENDPOINTS_FILE
        url_file.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    tool("pollen"),
                    "node",
                    "--data-dir",
                    str(self.data_dir),
                    "--api",
                    self.api,
                    *self.extra_args,
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def wait_serving(self, timeout: float = 30.0) -> None:
        """Return once the node announced its endpoints; raise if it exits or takes too long."""
        from pollen.node import ENDPOINTS_FILE

        assert self.proc is not None
        url_file = self.data_dir / ENDPOINTS_FILE
        deadline = time.monotonic() + timeout
        while not url_file.exists():
            if self.proc.poll() is not None:
                raise NodeStartError(
                    f"node in {self.data_dir} exited with status {self.proc.returncode}; "
                    f"log: {self.log_path}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise NodeStartError(f"node in {self.data_dir} did not serve within {timeout}s")
            time.sleep(0.02)
        self.endpoints = orjson.loads(url_file.read_bytes())
        self.url = str(self.endpoints["api"])

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (SIGKILL by default) and reap the process."""
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> int:
        """Stop gracefully with SIGTERM; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


def init_node(
    data_dir: Path, name: str, *, env: dict[str, str] | None = None, cluster: str = "pollen"
) -> None:
    """``pollen init`` a data directory as a user would; raises with its stderr on failure."""
    result = subprocess.run(
        [
            tool("pollen"),
            "init",
            "--data-dir",
            str(data_dir),
            "--name",
            name,
            "--cluster-name",
            cluster,
        ],
        env=env if env is not None else dict(os.environ),
        capture_output=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise NodeStartError(result.stderr.decode(errors="replace").strip())
