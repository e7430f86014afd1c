"""The composition root: wires the parts of one node together and runs them.

The parts (store, event log, API) know nothing of each other; this module hands each what it
needs and owns their start and stop order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson
import psutil
from aiohttp import web

import pollen
from pollen.api.server import create_app
from pollen.mesh.identity import NodeIdentity, load_identity
from pollen.resources import (
    Capacity,
    ConditionStatus,
    Node,
    NodeSpec,
    NodeStatus,
    ObjectMeta,
    set_condition,
)
from pollen.state import ResourceStore
from pollen.state.events import EventLog, EventType

log = logging.getLogger(__name__)

#: Written once the node serves: where its endpoints are bound, for local tools (pollen up, tests).
ENDPOINTS_FILE = "endpoints.json"


@dataclass(frozen=True)
class NodeConfig:
    """How to run one node: what ``pollen node`` was told."""

    data_dir: Path
    api_host: str = "127.0.0.1"
    api_port: int = 7070
    name: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class PollenNode:
    """One running node: its state document, event log and HTTP API."""

    def __init__(self, config: NodeConfig, clock: Callable[[], datetime] = _utcnow) -> None:
        self.config = config
        self.identity: NodeIdentity = load_identity(config.data_dir)
        self.name = config.name or self.identity.node_name
        self._clock = clock
        self.store: ResourceStore | None = None
        self.events = EventLog(self.name, clock)
        self._runner: web.AppRunner | None = None
        self.api_url = ""

    async def start(self) -> None:
        """Open the document, start serving the API, and register this Node as Ready."""
        self.store = ResourceStore.open(self.identity.state_dir, clock=self._clock)
        app = create_app(
            self.store, self.events, token=self.identity.api_token, node_name=self.name
        )
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.api_host, self.config.api_port)
        await site.start()
        # The bound socket tells the port when port 0 was asked for.
        host, port = self._runner.addresses[0][:2]
        self.api_url = f"http://{host}:{port}"
        self._register(ready=True)
        log.info("node %s serving the API at %s", self.name, self.api_url)

    async def stop(self) -> None:
        """Mark this Node not Ready, stop serving, and close the document."""
        if self.store is not None:
            try:
                self._register(ready=False)
            finally:
                if self._runner is not None:
                    await self._runner.cleanup()
                    self._runner = None
                self.store.close()
                self.store = None
        (self.config.data_dir / ENDPOINTS_FILE).unlink(missing_ok=True)

    def _register(self, *, ready: bool) -> None:
        """Write this node's Node object: spec from what it is, Ready from whether it serves."""
        assert self.store is not None
        memory = psutil.virtual_memory().total // (1 << 20)
        cpus = psutil.cpu_count() or 1
        labels = {"pollen.dev/hostname": self.name, **self.config.labels}
        desired = Node(
            metadata=ObjectMeta(name=self.name, labels=labels),
            spec=NodeSpec(
                addresses=[self.api_url],
                capacity=Capacity(memory_mb=memory, cpu_millis=cpus * 1000),
            ),
        )
        self.store.apply([desired])
        current = self.store.get("Node", self.name)
        assert isinstance(current, Node)
        reason, message = (
            ("NodeReady", "node is serving")
            if ready
            else ("NodeShutdown", "node stopped gracefully")
        )
        conditions = set_condition(
            current.status.conditions,
            "Ready",
            ConditionStatus.TRUE if ready else ConditionStatus.FALSE,
            reason=reason,
            message=message,
            observed_generation=current.metadata.generation,
            now=self._clock(),
        )
        status = NodeStatus(
            observed_generation=current.metadata.generation,
            conditions=conditions,
            api=self.api_url,
            version=pollen.__version__,
        )
        if status != current.status:
            self.store.update_status("Node", self.name, status)
            self.events.record(
                "Node",
                self.name,
                reason,
                message,
                EventType.NORMAL,
            )

    def endpoints(self) -> dict[str, object]:
        """Where this node serves, as written to ``endpoints.json``."""
        return {"name": self.name, "api": self.api_url, "pid": os.getpid()}

    def announce(self) -> None:
        """Write ``endpoints.json`` into the data directory: the node serves, and here.

        Separate from :meth:`start` so that the caller can first finish its own set-up (the
        pctl context), and whoever sees the file can rely on all of it.
        """
        path = self.config.data_dir / ENDPOINTS_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(orjson.dumps(self.endpoints()))
        os.replace(tmp, path)
