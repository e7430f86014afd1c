"""The composition root: wires the parts of one node together and runs them.

The parts (store, event log, API) know nothing of each other; this module hands each what it
needs and owns their start and stop order.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson
import psutil
from aiohttp import web
from cryptography import x509

import pollen
from pollen.api.forward import GATEWAY_STREAM
from pollen.api.gateway import Gateway, MeshCallRouter
from pollen.api.proxy import PROXY_STREAM, Channel, NodeProxy, ProxyError
from pollen.api.server import create_app
from pollen.mesh import tokens, wire
from pollen.mesh.bulk import BulkServer, BulkTls
from pollen.mesh.fetch import ARTIFACT_STREAM, ArtifactFetcher, ArtifactServer
from pollen.mesh.identity import NodeIdentity, load_credentials, load_identity
from pollen.mesh.membership import EventKind, MemberEvent, MemberState
from pollen.mesh.service import MeshService
from pollen.mesh.transport import TransportError
from pollen.reconcilers.eviction import MemoryPressureEvictor
from pollen.reconcilers.manager import ReconcilerManager
from pollen.reconcilers.replicas import ReplicaRunner
from pollen.reconcilers.workloads import LiveFacts, WorkloadPlacer
from pollen.resources import (
    Capacity,
    ConditionStatus,
    Node,
    NodeSpec,
    ObjectMeta,
    Replica,
    set_condition,
)
from pollen.runtime.artifacts import ArtifactStore
from pollen.runtime.host import InstanceHost
from pollen.runtime.runtime import Runtime
from pollen.state import ChangeEvent, ChangeType, ResourceStore
from pollen.state.events import EventLog, EventType

log = logging.getLogger(__name__)

#: Written once the node serves: where its endpoints are bound, for local tools (pollen up, tests).
ENDPOINTS_FILE = "endpoints.json"
#: Seconds between two writes of the same peer's Ready by this node (``_reconcile_ready``).
READY_WRITE_INTERVAL = 1.0


#: Default of ``pollen node --artifact-quota`` (ADR 0017).
DEFAULT_ARTIFACT_QUOTA = 1 << 30


@dataclass(frozen=True)
class NodeConfig:
    """How to run one node: what ``pollen node`` was told."""

    data_dir: Path
    api_host: str = "127.0.0.1"
    api_port: int = 7070
    #: Where the gateway serves workloads over HTTP; port 0 (the default): any free port, so
    #: that every node serves one (ADR 0014).
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 0
    listen_host: str = "127.0.0.1"
    listen_port: int = 7946
    name: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    #: Addresses to join at start, besides the peers this node remembers.
    seeds: tuple[tuple[str, int], ...] = ()
    #: Reconciler plugins to enable: entry-point names in ``pollen.reconcilers``, or
    #: ``module:attribute`` paths.
    plugins: tuple[str, ...] = ()
    #: Memory (MB) the machine must keep available; below it the node is under memory pressure
    #: and evicts replicas (the kubelet's ``memory.available<100Mi``).
    memory_reserve_mb: int = 100
    #: Bytes of artifacts this node keeps; the least recently used that no local replica
    #: needs are deleted to stay within it (ADR 0017). None: no quota.
    artifact_quota: int | None = DEFAULT_ARTIFACT_QUOTA


def _utcnow() -> datetime:
    return datetime.now(UTC)


JOIN_TOKEN_ANNOTATION = "pollen.dev/join-token"
CERT_SERIAL_ANNOTATION = "pollen.dev/certificate-serial"
#: Every Node carries this finalizer, so deleting a Node marks it (deletionTimestamp) instead of
#: removing it: the mark is the revocation, and it must outlive the object's other uses.
REVOCATION_FINALIZER = "pollen.dev/revocation"
PEERS_FILE = "peers.json"
#: Where the node keeps artifacts' bytes, under its data directory (ADR 0012).
ARTIFACTS_DIR = "artifacts"
#: Where the node keeps compiled modules, under its data directory (ADR 0006).
MODULES_DIR = "modules"


def _release_startup_memory() -> None:
    """Hand back to the system the heap that start-up used and freed (imports, the document's
    load, compaction): glibc keeps it otherwise, and an idle node would carry it for good."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


class PollenNode:
    """One running node: its state document, event log, mesh and HTTP API."""

    def __init__(self, config: NodeConfig, clock: Callable[[], datetime] = _utcnow) -> None:
        self.config = config
        self.identity: NodeIdentity = load_identity(config.data_dir)
        self.name = config.name or self.identity.node_name
        self._clock = clock
        self.store: ResourceStore | None = None
        self.mesh: MeshService | None = None
        self.events = EventLog(self.name, clock)
        self.reconcilers: ReconcilerManager | None = None
        self._runner: web.AppRunner | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._stopping = False
        #: When this node last wrote each peer's Ready, and the re-check waiting for the
        #: interval to pass (``_reconcile_ready``).
        self._ready_written: dict[str, float] = {}
        self._ready_recheck: asyncio.TimerHandle | None = None
        self.api_url = ""
        self.proxy: NodeProxy | None = None
        #: The artifacts this node holds, and the fetcher that gets the others from holders
        #: (both set by :meth:`start`).
        self.artifacts: ArtifactStore | None = None
        self.fetcher: ArtifactFetcher | None = None
        #: Serves artifacts' chunks over TLS on TCP (ADR 0017); its port goes in manifests.
        self.bulk: BulkServer | None = None
        self._bulk_port: int | None = None
        self.runtime: Runtime | None = None
        self.instances: InstanceHost | None = None
        self.gateway: Gateway | None = None
        self.gateway_url = ""

    async def start(self) -> None:
        """Open the document, join the mesh, serve the API, and register this Node as Ready."""
        self.store = ResourceStore.open(self.identity.state_dir, clock=self._clock)
        # Opened once the document's lock is held: opening deletes unfinished writes, which
        # must never be those of another node process running on this data directory.
        artifacts = self.artifacts = ArtifactStore(
            self.config.data_dir / ARTIFACTS_DIR,
            quota=self.config.artifact_quota,
            pinned=self._pinned_artifacts,
        )
        credentials = load_credentials(self.config.data_dir)
        admitter = None
        if credentials.root_key is not None:
            admitter = tokens.Admitter(
                credentials.root_key,
                credentials.ca_certificate,
                used=self._token_used,
                on_admitted=self._admitted,
                name_taken=lambda name: self._store().get("Node", name) is not None,
            )
        self.mesh = MeshService(
            credentials,
            self.store,
            host=self.config.listen_host,
            port=self.config.listen_port,
            is_revoked=self._is_revoked,
            admitter=admitter,
            labels=self.config.labels,
            load=lambda: psutil.cpu_percent(interval=None) / 100.0,
            on_member_event=self._member_event,
            held_artifacts=lambda: artifacts.recent(wire.MAX_ARTIFACTS),
        )
        await self.mesh.start()
        self.proxy = NodeProxy(self.name, self._open_proxy_channel)
        self.mesh.handle_streams(PROXY_STREAM, self.proxy.serve)
        # Artifacts' bytes go over a TLS side path authenticated like the mesh (ADR 0017).
        tls = BulkTls(credentials, self.mesh.transport.verify_peer)
        server = ArtifactServer(artifacts, self.name, bulk_port=lambda: self._bulk_port)
        self.bulk = BulkServer(tls, server.serve_bulk, host=self.config.listen_host)
        self._bulk_port = await self.bulk.start()
        self.mesh.handle_streams(ARTIFACT_STREAM, server.serve)
        self.fetcher = ArtifactFetcher(self.mesh, artifacts, bulk=tls)
        loop = asyncio.get_running_loop()

        def artifacts_changed() -> None:
            # The store changes from worker threads (fetches, uploads): announce on the loop.
            loop.call_soon_threadsafe(self._artifacts_changed)

        artifacts.on_change = artifacts_changed
        self._unsubscribe = self.store.subscribe(self._on_change)
        app = create_app(
            self.store,
            self.events,
            token=self.identity.api_token,
            node_name=self.name,
            rtt=self.mesh.estimated_rtt,
            holders=self._holders,
            proxy=self.proxy,
            artifacts=artifacts,
            fetcher=self.fetcher,
            # Late-bound: the API serves before the runtime and its instances exist.
            instances=lambda: self.instances,
        )
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.api_host, self.config.api_port)
        await site.start()
        # The bound socket tells the port when port 0 was asked for.
        host, port = self._runner.addresses[0][:2]
        self.api_url = f"http://{host}:{port}"
        self.proxy.serve_locally(self.api_url, self.identity.api_token)
        self._register(ready=True)
        # After registering: a plugin that fails to load is shown on this node's Node.
        reconcilers = self.reconcilers = ReconcilerManager(
            self.store, self.events, node_name=self.name, clock=self._clock
        )
        # pollen.call reaches this node's workloads first, then the swarm's through the gateway.
        calls = MeshCallRouter(asyncio.get_running_loop())
        self.runtime = Runtime(cache_dir=self.config.data_dir / MODULES_DIR, router=calls)
        instances = self.instances = InstanceHost(
            self.runtime, on_change=lambda replica: reconcilers.enqueue("Replica", replica)
        )
        reconcilers.add(
            WorkloadPlacer(
                self._live_view,
                queue_length=lambda: instances.starting,
                reliability=lambda: instances.reliability,
            )
        )
        reconcilers.add(ReplicaRunner(instances, has=artifacts.has, ensure=self.fetcher.ensure))
        reconcilers.add(
            MemoryPressureEvictor(
                lambda: psutil.virtual_memory().available >> 20,
                reserve_mb=self.config.memory_reserve_mb,
            )
        )
        self.reconcilers.enable_plugins(self.config.plugins)
        await self.reconcilers.start()
        gateway = self.gateway = Gateway(
            self.name, store=self.store, instances=instances, mesh=self.mesh
        )
        calls.connect(self.runtime.local, gateway)
        self.mesh.handle_streams(GATEWAY_STREAM, gateway.serve_forwarded)
        self.gateway_url = await gateway.start(self.config.gateway_host, self.config.gateway_port)
        seeds = list(self.config.seeds) + self._remembered_peers()
        if seeds:
            joined = await self.mesh.join(seeds)
            log.info("joined the mesh through %s", ", ".join(joined) or "nobody yet")
        _release_startup_memory()
        log.info(
            "node %s serving the API at %s, the gateway at %s, the mesh at %s",
            self.name,
            self.api_url,
            self.gateway_url,
            self.mesh.address,
        )

    async def stop(self) -> None:
        """Mark this Node not Ready, leave the mesh, stop serving, and close the document."""
        self._stopping = True
        if self.gateway is not None:
            # First: requests in flight are answered while their instances still run.
            await self.gateway.close()
            self.gateway = None
        if self.reconcilers is not None:
            await self.reconcilers.stop()
            self.reconcilers = None
        if self.instances is not None:
            await self.instances.close()
            self.instances = None
        if self.runtime is not None:
            await asyncio.to_thread(self.runtime.close)
            self.runtime = None
        if self.artifacts is not None:
            self.artifacts.on_change = None
        if self.fetcher is not None:
            await self.fetcher.close()
        if self.bulk is not None:
            await self.bulk.close()
            self.bulk = None
        if self.store is not None:
            try:
                self._register(ready=False)
            finally:
                if self._unsubscribe is not None:
                    self._unsubscribe()
                if self.mesh is not None:
                    # Let the NotReady write reach the peers before leaving.
                    self.mesh.document_changed()
                    await self.mesh.stop()
                    self.mesh = None
                if self._runner is not None:
                    await self._runner.cleanup()
                    self._runner = None
                if self.proxy is not None:
                    await self.proxy.close()
                    self.proxy = None
                self.store.close()
                self.store = None
        (self.config.data_dir / ENDPOINTS_FILE).unlink(missing_ok=True)

    def _pinned_artifacts(self) -> set[str]:
        """Digests this node's replicas use: the store's quota never deletes them. Called
        from worker threads; listing copies the store's view atomically."""
        store = self.store
        if store is None:
            return set()
        return {
            replica.spec.artifact
            for replica in store.list("Replica")
            if isinstance(replica, Replica)
            and self.name in (replica.spec.node, replica.status.node)
            and replica.spec.artifact
        }

    def _artifacts_changed(self) -> None:
        if self.mesh is not None and not self._stopping:
            self.mesh.meta_changed()

    def _store(self) -> ResourceStore:
        assert self.store is not None
        return self.store

    async def _open_proxy_channel(self, node: str) -> Channel:
        if self.mesh is None:
            raise ProxyError("this node is shutting down")
        try:
            opened = await self.mesh.open_stream(node, PROXY_STREAM)
        except TransportError as exc:
            raise ProxyError(str(exc)) from None
        return Channel(opened.stream, via=opened.via)

    def _live_view(self) -> dict[str, LiveFacts]:
        """The nodes alive (or only suspected) in this node's membership view, for placement."""
        if self.mesh is None:
            return {}
        live: dict[str, LiveFacts] = {}
        for name, member in self.mesh.members().items():
            if member.state in (MemberState.ALIVE, MemberState.SUSPECT):
                live[name] = LiveFacts(
                    load=member.meta.load,
                    artifacts=frozenset(member.meta.artifacts),
                    rtt=self.mesh.estimated_rtt(name),
                )
        return live

    def _holders(self, digest: str) -> list[str]:
        """The nodes holding ``digest``'s bytes: this one by its store, the others alive or
        suspected by what they announce in membership gossip."""
        holders: set[str] = set()
        if self.mesh is not None:
            live = (MemberState.ALIVE, MemberState.SUSPECT)
            for name, member in self.mesh.members().items():
                if member.state in live and digest in member.meta.artifacts:
                    holders.add(name)
        if self.artifacts is not None and self.artifacts.has(digest):
            holders.add(self.name)
        return sorted(holders)

    def _enqueue_for(self, change: ChangeEvent) -> None:
        """Placement of a Workload depends on more than the Workload: map other changes to it.
        Whether this node may run its Replicas depends on the trust policy and on the
        Artifacts recorded for their digests (ADR 0016): map those to its Replicas."""
        reconcilers = self.reconcilers
        if reconcilers is None:
            return
        if change.kind == "Replica":
            workload = getattr(change.object.spec, "workload", None)
            if isinstance(workload, str):
                reconcilers.enqueue("Workload", workload)
        elif change.kind in ("Node", "Artifact"):
            self._enqueue_workloads()
        if change.kind in ("Artifact", "TrustPolicy") and self.store is not None:
            digest = getattr(change.object.spec, "digest", None)
            for replica in self.store.list("Replica"):
                spec = replica.spec
                if spec.node == self.name and (digest is None or spec.artifact == digest):
                    reconcilers.enqueue("Replica", replica.name)

    def _enqueue_workloads(self) -> None:
        if self.reconcilers is not None and self.store is not None:
            for workload in self.store.list("Workload"):
                self.reconcilers.enqueue("Workload", workload.name)

    def _on_change(self, change: ChangeEvent) -> None:
        self._enqueue_for(change)
        if self.mesh is not None:
            self.mesh.document_changed()
            if (
                change.kind == "Node"
                and change.name != self.name
                and change.object.metadata.deletion_timestamp is not None
            ):
                # A deleted Node is revoked: cut it off now, not at the next periodic check.
                asyncio.get_running_loop().call_soon(self._revoke, change.name)
        if change.kind == "Node" and change.name != self.name and self.mesh is not None:
            # Someone wrote a peer's Ready (perhaps from a view we do not share, e.g. a node
            # that was itself cut off for a while): where we are that peer's writer, our view
            # decides again.
            self._schedule_ready_check(0.0)
        if (
            change.kind == "Node"
            and change.name == self.name
            and change.type != ChangeType.DELETED
            and self.api_url
        ):
            # Level-triggered: whatever changed our own Node (a merge from a peer that created
            # it at admission, a concurrent write that won), make it say what we are again.
            asyncio.get_running_loop().call_soon(self._reassert_own_node)

    def _reassert_own_node(self) -> None:
        if self.store is not None and self.mesh is not None and not self._stopping:
            self._register(ready=None)

    # revocation: deleting a Node marks it, and a marked Node's certificate is refused

    def _is_revoked(self, name: str, serial: int) -> bool:
        node = self._store().get("Node", name) if self.store is not None else None
        if node is None or node.metadata.deletion_timestamp is None:
            return False
        recorded = node.metadata.annotations.get(CERT_SERIAL_ANNOTATION)
        return recorded is None or recorded == str(serial)

    def _revoke(self, name: str) -> None:
        if self.mesh is not None and not self._stopping:
            self.mesh.evict(name)
            self.mesh.transport.recheck_revocations()
            # Revocations are rare: every node that learns of one writes NotReady (the same
            # value, so the writes converge) rather than relying on one membership view.
            self._set_ready(name, False, "NodeRevoked", "the Node was deleted; it is revoked")
            self.events.record(
                "Node",
                name,
                "Revoked",
                f'node "{name}" was deleted: its certificate is refused',
                EventType.WARNING,
            )

    # admission: the document records which tokens were spent, on the Node they admitted

    def _token_used(self, token_id: str) -> bool:
        return any(
            node.metadata.annotations.get(JOIN_TOKEN_ANNOTATION) == token_id
            for node in self._store().list("Node")
        )

    def _admitted(
        self, claims: tokens.TokenClaims, name: str, certificate: x509.Certificate
    ) -> None:
        node = Node(
            metadata=ObjectMeta(
                name=name,
                annotations={
                    JOIN_TOKEN_ANNOTATION: claims.token_id,
                    CERT_SERIAL_ANNOTATION: str(certificate.serial_number),
                },
                finalizers=[REVOCATION_FINALIZER],
            ),
        )
        self._store().apply([node])
        self.events.record("Node", name, "Admitted", f'node "{name}" joined with a token')

    # membership drives the Ready condition of Nodes

    def _member_event(self, event: MemberEvent) -> None:
        if event.member.name == self.name:
            return
        if event.kind in (EventKind.DEAD, EventKind.LEFT, EventKind.JOINED, EventKind.ALIVE):
            self._remember_peers()
            self._reconcile_ready()
            # Who is alive decides which claims count: every Workload is placed again.
            self._enqueue_workloads()

    def _reconcile_ready(self) -> None:
        """Make every Node's Ready follow this node's membership view, where this node writes.

        Level-triggered: each membership change re-checks every member, so that a transition
        whose designated writer was itself dying at the time (both halves of a partition see
        the other half die one by one) is still written once a writer remains.
        """
        if self.mesh is None or self._stopping:
            return
        alive = self.mesh.alive()
        now = time.monotonic()
        for name, member in self.mesh.members().items():
            if name == self.name:
                continue
            if member.state == MemberState.ALIVE:
                known = self._store().get("Node", name)
                if known is not None and known.metadata.deletion_timestamp is not None:
                    continue  # revoked: whatever membership heard, it stays NotReady
                ready, reason, message = True, "NodeReady", "alive in membership"
            elif member.state == MemberState.LEFT:
                ready, reason, message = False, "NodeLeft", "it left the mesh gracefully"
            elif member.state == MemberState.DEAD:
                ready, reason, message = False, "NodeUnreachable", "membership declared it dead"
            else:
                continue  # suspect: not decided yet
            # One member writes each transition (the first alive member by name, the subject
            # aside), so that a death does not become N identical writes in the document.
            writers = [n for n in alive if n != name]
            if not writers or writers[0] != self.name:
                continue
            node = self._store().get("Node", name)
            written = node.condition("Ready") if node is not None else None
            if written is not None and (written.status is ConditionStatus.TRUE) == ready:
                continue
            # At most one write per peer per interval: where views disagree for a moment
            # (a node back from a pause still believes others dead), writes would otherwise
            # go back and forth at the speed of gossip. The last word is written once the
            # interval has passed, from the view then.
            wait = self._ready_written.get(name, -math.inf) + READY_WRITE_INTERVAL - now
            if wait > 0:
                self._schedule_ready_check(wait)
                continue
            self._ready_written[name] = now
            self._set_ready(name, ready, reason, message)

    def _schedule_ready_check(self, delay: float) -> None:
        if self._ready_recheck is not None:
            return  # one re-check is enough: it looks at every member
        loop = asyncio.get_running_loop()

        def recheck() -> None:
            self._ready_recheck = None
            self._reconcile_ready()

        self._ready_recheck = loop.call_later(delay, recheck)

    def _set_ready(self, name: str, ready: bool, reason: str, message: str) -> None:
        store = self._store()
        current = store.get("Node", name)
        if not isinstance(current, Node):
            return
        conditions = set_condition(
            current.status.conditions,
            "Ready",
            ConditionStatus.TRUE if ready else ConditionStatus.FALSE,
            reason=reason,
            message=message,
            observed_generation=current.metadata.generation,
            now=self._clock(),
        )
        status = current.status.model_copy(update={"conditions": conditions})
        if status != current.status:
            store.update_status("Node", name, status)
            self.events.record(
                "Node", name, reason, message, EventType.NORMAL if ready else EventType.WARNING
            )

    def _remembered_peers(self) -> list[tuple[str, int]]:
        try:
            data = orjson.loads((self.config.data_dir / PEERS_FILE).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return []
        peers: list[tuple[str, int]] = []
        for item in data if isinstance(data, list) else []:
            if (
                isinstance(item, list)
                and len(item) == 2
                and isinstance(item[0], str)
                and isinstance(item[1], int)
            ):
                peers.append((item[0], item[1]))
        return peers[:16]

    def _remember_peers(self) -> None:
        """Keep a few peer addresses, so that a restarted node finds the mesh again."""
        assert self.mesh is not None
        addresses = []
        for name in self.mesh.alive():
            if name == self.name:
                continue
            for text in self.mesh.members()[name].meta.addresses[:1]:
                with contextlib.suppress(ValueError):  # a peer's meta is hostile input
                    addresses.append(list(tokens.parse_address(text)))
        if addresses:
            path = self.config.data_dir / PEERS_FILE
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(orjson.dumps(addresses[:16]))
            os.replace(tmp, path)

    def _register(self, *, ready: bool | None) -> None:
        """Write this node's Node object: spec from what it is, Ready from whether it serves.

        ``ready`` None (re-asserting after a change to our Node) leaves an existing Ready
        condition to membership's writer (``_reconcile_ready``): a peer that declared us dead
        wrote NotReady, and it writes Ready again once we refute. Overwriting it at once from
        here made every false suspicion a tug of war of writes between us and that peer, each
        a document change that every node receives and re-evaluates.
        """
        store = self._store()
        memory = psutil.virtual_memory().total // (1 << 20)
        cpus = psutil.cpu_count() or 1
        labels = {"pollen.dev/hostname": self.name, **self.config.labels}
        existing = store.get("Node", self.name)
        if existing is not None and existing.metadata.deletion_timestamp is not None:
            log.warning("this node's Node was deleted: it is revoked and no longer registers")
            return
        annotations = dict(existing.metadata.annotations) if existing is not None else {}
        addresses = [self.api_url]
        if self.mesh is not None:
            addresses.append(f"quic://{self.mesh.address}")
        desired = Node(
            metadata=ObjectMeta(
                name=self.name,
                labels=labels,
                annotations=annotations,
                finalizers=[REVOCATION_FINALIZER],
            ),
            spec=NodeSpec(
                addresses=addresses,
                capacity=Capacity(memory_mb=memory, cpu_millis=cpus * 1000),
            ),
        )
        store.apply([desired])
        current = store.get("Node", self.name)
        assert isinstance(current, Node)
        if ready is None and current.condition("Ready") is None:
            ready = True  # our Node as a peer created it at admission: no Ready yet
        if ready is not None:
            reason, message = (
                ("NodeReady", "node is serving")
                if ready
                else ("NodeShutdown", "node stopped gracefully")
            )
            self._set_ready(self.name, ready, reason, message)
        status = current.status
        if status.api != self.api_url or status.version != pollen.__version__:
            fresh = store.get("Node", self.name)
            assert isinstance(fresh, Node)
            store.update_status(
                "Node",
                self.name,
                fresh.status.model_copy(
                    update={"api": self.api_url, "version": pollen.__version__}
                ),
            )

    def endpoints(self) -> dict[str, object]:
        """Where this node serves, as written to ``endpoints.json``."""
        listen = self.mesh.address if self.mesh is not None else None
        return {
            "name": self.name,
            "api": self.api_url,
            "gateway": self.gateway_url or None,
            "listen": listen,
            "pid": os.getpid(),
        }

    def announce(self) -> None:
        """Write ``endpoints.json`` into the data directory: the node serves, and here.

        Separate from :meth:`start` so that the caller can first finish its own set-up (the
        pctl context), and whoever sees the file can rely on all of it.
        """
        path = self.config.data_dir / ENDPOINTS_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(orjson.dumps(self.endpoints()))
        os.replace(tmp, path)
