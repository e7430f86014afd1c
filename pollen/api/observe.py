"""Observing what runs: workload logs and usage, node usage (``pctl logs``, ``pctl top``).

The routes (``docs/api.md``, ADR 0015) come in two layers. With ``?local=true`` a node answers
for the replicas it runs itself, from their ring buffers and counters (``pollen.runtime``).
Without it, the node answers for the swarm: it finds the nodes holding Replicas of the workload
in the document, asks each for its local answer through the node proxy (``NodeProxy.request``,
so relays work too), and merges what comes back, every line and row tagged with its node and
replica. A local request never fans out again, so one request costs at most one level of fan-out.
A holder that cannot be reached adds one warning and does not fail the rest.

Everything a holder sends back is hostile input (SPEC section 8): lines are size-capped, decoded
strictly and rebuilt field by field before they are passed on.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlencode

import orjson
from aiohttp import web

from pollen import API_VERSION
from pollen.api.errors import ApiError
from pollen.api.proxy import PROXIED_HEADER, NodeProxy, ProxyRequest
from pollen.api.server import (
    ARTIFACTS_KEY,
    NODE_NAME_KEY,
    PREFIX,
    PROXY_KEY,
    STORE_KEY,
    WATCH_BOOKMARK_SECONDS,
    _flag,
    _json_response,
)
from pollen.resources.models import ConditionStatus, Node, Replica, ReplicaPhase
from pollen.runtime.telemetry import NodeTelemetry, node_telemetry
from pollen.state import ResourceStore

if TYPE_CHECKING:
    from pollen.runtime.host import HostedInstance, InstanceHost
    from pollen.runtime.logs import LogLine

__all__ = [
    "BACKLOG_SECONDS",
    "MAX_TAIL",
    "SOURCE_SILENCE_SECONDS",
    "InstancesOf",
    "NodeSampler",
    "add_routes",
    "local_logs",
    "remote_logs",
]

Obj = dict[str, Any]
InstancesOf = Callable[[], "InstanceHost | None"]
"""This node's instance host, or None before it has one (the API serves before the runtime)."""

#: The largest ``tail`` asked for; a node keeps 10,000 lines per replica, so more is never needed.
MAX_TAIL: Final = 1_000_000
#: How long the swarm view waits for every holder's kept lines before it sends what it has: a
#: slow holder's kept lines then come later, among the new ones.
BACKLOG_SECONDS: Final = 10.0
#: A holder that sends nothing, not even a bookmark, for this long is taken for gone (its own
#: bookmarks come every 15 s).
SOURCE_SILENCE_SECONDS: Final = 35.0
#: How long the swarm view of usage waits for one holder.
USAGE_SECONDS: Final = 10.0
#: Cut-offs for what holders send back: one line, one usage answer, one error answer.
MAX_REMOTE_LINE: Final = 256 * 1024
MAX_REMOTE_USAGE: Final = 4 * 1024 * 1024
MAX_REMOTE_ERROR: Final = 64 * 1024
#: Batches of lines queued between the holders' streams and the merged answer; a full queue
#: holds the readers back (flow control down to the holders) rather than growing memory.
MERGE_QUEUE_BATCHES: Final = 64
#: Phases in which an instance will not log again: a follower stops following it.
FINISHED: Final = frozenset({ReplicaPhase.STOPPED, ReplicaPhase.FAILED})
#: The window over which a node's CPU share is measured, at least: samples closer together than
#: this would make the percentage noise, so a request that comes sooner gets the last figure.
MIN_CPU_WINDOW: Final = 1.0

BOOKMARK: Final[Obj] = {"type": "BOOKMARK"}
_TAIL_RE = re.compile(r"^[0-9]{1,7}\Z")
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,253}\Z")

INSTANCES_KEY: web.AppKey[InstancesOf] = web.AppKey("instances")
SAMPLER_KEY: web.AppKey[NodeSampler] = web.AppKey("sampler")


# --- query parameters and small values ------------------------------------------------------


def _tail(request: web.Request) -> int | None:
    """``tail=N``: the last N lines of each replica; None (every kept line) when absent."""
    raw = request.query.get("tail")
    if raw is None:
        return None
    if not _TAIL_RE.match(raw) or int(raw) > MAX_TAIL:
        raise ApiError(
            400, "BadRequest", f"query parameter tail must be a whole number from 0 to {MAX_TAIL}"
        )
    return int(raw)


def _timestamp(seconds: float) -> str:
    """RFC 3339 with microseconds, fixed width: sorting the strings sorts the times."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _warning(message: str, node: str | None = None) -> Obj:
    line: Obj = {"type": "WARNING", "message": message}
    if node is not None:
        line["node"] = node
    return line


def _ndjson(lines: Iterable[Obj]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def _status_message(body: bytes, fallback: str) -> str:
    """The ``message`` of a Status answer, else ``fallback``."""
    try:
        status = orjson.loads(body)
    except orjson.JSONDecodeError:
        return fallback
    message = status.get("message") if isinstance(status, dict) else None
    return message[:1000] if isinstance(message, str) and message else fallback


def _about(node: str, message: str) -> str:
    """``message`` about ``node``, naming it unless the message already does."""
    return message if f"node {node}" in message else f"node {node}: {message}"


def _is_ready(node: Node) -> bool:
    return any(
        c.type == "Ready" and c.status is ConditionStatus.TRUE for c in node.status.conditions
    )


# --- this node's own replicas ----------------------------------------------------------------


def _host(request: web.Request) -> InstanceHost | None:
    return request.app[INSTANCES_KEY]()


def _hosted_of(host: InstanceHost | None, workload: str) -> list[HostedInstance]:
    return [h for h in host.replicas() if h.workload == workload] if host is not None else []


def _check_workload(request: web.Request, workload: str, hosted: list[HostedInstance]) -> None:
    """404 unless the workload is in the document or has instances here (being removed)."""
    if not hosted and request.app[STORE_KEY].get("Workload", workload) is None:
        raise ApiError(404, "NotFound", f'workload "{workload}" not found')


def _line(node: str, replica: str, line: LogLine) -> Obj:
    entry: Obj = {
        "time": _timestamp(line.time),
        "replica": replica,
        "node": node,
        "stream": line.stream,
    }
    if line.level:
        entry["level"] = line.level
    entry["text"] = line.text
    return entry


class _Wakeup:
    """An ``asyncio.Event`` that any thread may set (log lines come from the workers, store
    changes from whichever thread writes); wakes coalesce, so a burst costs one call into the
    loop, not one per line."""

    def __init__(self, then: Callable[[], None] | None = None) -> None:
        self.event = asyncio.Event()
        self._then = then
        self._loop = asyncio.get_running_loop()
        self._scheduled = False

    def __call__(self, *_: object) -> None:
        if self._scheduled:
            return
        self._scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            self._loop.call_soon_threadsafe(self._set)

    def _set(self) -> None:
        self._scheduled = False
        self.event.set()
        if self._then is not None:
            self._then()


@dataclass
class _Followed:
    hosted: HostedInstance
    after: int
    unsubscribe: Callable[[], None]


def _expected_here(store: ResourceStore, host: InstanceHost, node: str, workload: str) -> bool:
    """Whether a Replica of ``workload`` that this node holds should run but has no instance
    here yet (just claimed, its artifact on the way, or the node restarted)."""
    return any(
        isinstance(r, Replica)
        and r.spec.workload == workload
        and r.spec.node == node
        and r.metadata.deletion_timestamp is None
        and r.status.phase not in FINISHED
        and host.get(r.metadata.name) is None
        for r in store.list("Replica")
    )


async def local_logs(
    host: InstanceHost | None,
    store: ResourceStore,
    node: str,
    workload: str,
    *,
    follow: bool,
    tail: int | None,
) -> AsyncIterator[list[Obj]]:
    """The log lines of ``workload``'s replicas on this node, in batches.

    First the kept lines (the last ``tail`` of each replica), oldest first, then a BOOKMARK.
    With ``follow``, new lines as they come, from replicas that start here later too, and a
    BOOKMARK after every quiet ``WATCH_BOOKMARK_SECONDS``; it ends once no instance of the
    workload runs here and no Replica this node holds is waiting for one.
    """
    hosted = _hosted_of(host, workload)
    backlog: list[tuple[str, int, Obj]] = []
    positions: dict[str, int] = {}
    for h in hosted:
        kept = h.instance.logs.lines()
        positions[h.replica] = kept[-1].seq if kept else 0
        shown = kept if tail is None else kept[max(0, len(kept) - tail) :] if tail else []
        backlog.extend((_timestamp(k.time), k.seq, _line(node, h.replica, k)) for k in shown)
    backlog.sort(key=lambda item: (item[0], item[2]["replica"], item[1]))
    yield [entry for _, _, entry in backlog] + [BOOKMARK]
    if not follow or host is None:
        return

    wake = _Wakeup()
    followed: dict[str, _Followed] = {}
    unsubscribe = [host.subscribe(wake), store.subscribe(wake)]

    def follow_one(h: HostedInstance, after: int) -> None:
        followed[h.replica] = _Followed(h, after, h.instance.logs.subscribe(wake))

    try:
        for h in hosted:
            follow_one(h, positions[h.replica])
        while True:
            # Cleared before reading: a line that arrives after the read sets it again.
            wake.event.clear()
            for h in _hosted_of(host, workload):
                known = followed.get(h.replica)
                if known is None or known.hosted is not h:
                    if known is not None:
                        known.unsubscribe()
                    follow_one(h, 0)  # started since: every line of it is new
            batch: list[Obj] = []
            running = False
            for state in followed.values():
                new = state.hosted.instance.logs.lines(state.after)
                if new and new[0].seq > state.after + 1:
                    missed = new[0].seq - state.after - 1
                    batch.append(
                        _warning(
                            f"{missed} lines of replica {state.hosted.replica} were dropped "
                            "from the node's buffer before they could be sent",
                            node,
                        )
                    )
                if new:
                    state.after = new[-1].seq
                    batch.extend(_line(node, state.hosted.replica, n) for n in new)
                current = host.get(state.hosted.replica)
                if current is state.hosted and state.hosted.phase not in FINISHED:
                    running = True
            if batch:
                yield batch
            if not running and not _expected_here(store, host, node, workload):
                return
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
                async with asyncio.timeout(WATCH_BOOKMARK_SECONDS):
                    await wake.event.wait()
            except TimeoutError:
                yield [BOOKMARK]
    finally:
        for stop in unsubscribe:
            stop()
        for state in followed.values():
            state.unsubscribe()


def _replica_usage(node: str, h: HostedInstance) -> Obj:
    usage = h.instance.usage.snapshot()
    return {
        "replica": h.replica,
        "node": node,
        "phase": str(h.phase),
        "instances": usage.instances,
        "requests": usage.requests,
        "errors": usage.errors,
        "cpuSeconds": round(usage.cpu_seconds, 6),
        "memoryBytes": usage.memory_bytes,
        "memoryPeakBytes": usage.memory_peak_bytes,
    }


def _workload_metrics(workload: str, replicas: list[Obj], warnings: list[str]) -> Obj:
    return {
        "apiVersion": API_VERSION,
        "kind": "WorkloadMetrics",
        "metadata": {"name": workload},
        "timestamp": _timestamp(time.time()),
        "replicas": sorted(replicas, key=lambda r: (r["node"], r["replica"])),
        "warnings": warnings,
    }


class NodeSampler:
    """This node's telemetry for ``pctl top nodes``: CPU share over a window of at least
    :data:`MIN_CPU_WINDOW`, measured from the previous sample (psutil keeps no window of its
    own that another caller would not disturb)."""

    def __init__(
        self, sample: Callable[[NodeTelemetry | None], NodeTelemetry] = node_telemetry
    ) -> None:
        self._sample = sample
        self._base = sample(None)
        self._cpu_percent: float | None = None
        self._window = 0.0

    def read(self) -> tuple[NodeTelemetry, float | None, float]:
        """A fresh sample, the CPU share (None before any window closed) and its window."""
        now = self._sample(self._base)
        if now.time - self._base.time >= MIN_CPU_WINDOW or self._cpu_percent is None:
            if now.cpu_percent is not None:
                self._cpu_percent = now.cpu_percent
                self._window = now.time - self._base.time
            self._base = now
        return now, self._cpu_percent, self._window


def _node_metrics(request: web.Request) -> Obj:
    sample, cpu_percent, window = request.app[SAMPLER_KEY].read()
    host = _host(request)
    running = [h for h in host.replicas() if h.phase not in FINISHED] if host else []
    artifacts = request.app[ARTIFACTS_KEY]
    return {
        "apiVersion": API_VERSION,
        "kind": "NodeMetrics",
        "metadata": {"name": request.app[NODE_NAME_KEY]},
        "timestamp": _timestamp(sample.time),
        "windowSeconds": round(window, 3),
        "usage": {
            "cpuPercent": None if cpu_percent is None else round(cpu_percent, 1),
            "cpuCount": sample.cpu_count,
            "loadAverage1m": round(sample.load_average_1m, 2),
            "memoryUsedBytes": sample.memory_total_bytes - sample.memory_available_bytes,
            "memoryTotalBytes": sample.memory_total_bytes,
            "memoryPercent": round(sample.memory_used_percent, 1),
            "processRSSBytes": sample.process_rss_bytes,
            "instances": len(running),
            "artifacts": len(artifacts.recent()) if artifacts is not None else 0,
        },
    }


# --- the swarm: holders' answers, through the node proxy -------------------------------------


def _holders(request: web.Request, workload: str) -> list[str]:
    """The nodes that hold Replicas of ``workload`` in the document, by name; 404 if there is
    no such Workload."""
    store = request.app[STORE_KEY]
    if store.get("Workload", workload) is None:
        raise ApiError(404, "NotFound", f'workload "{workload}" not found')
    nodes = {
        r.spec.node
        for r in store.list("Replica")
        if isinstance(r, Replica) and r.spec.workload == workload and r.spec.node
    }
    return sorted(nodes)


def _unready(request: web.Request, holder: str) -> str | None:
    """Why ``holder`` is not worth asking (its Node is missing or not Ready), or None."""
    node = request.app[STORE_KEY].get("Node", holder)
    if not isinstance(node, Node):
        return f"node {holder} holds replicas but has no Node object"
    if not _is_ready(node):
        return f"node {holder} is not Ready"
    return None


def _local_query(workload: str, **params: str) -> tuple[str, str]:
    path = f"{PREFIX}/workloads/{workload}"
    return path, urlencode({"local": "true", **params})


async def _ask(
    proxy: NodeProxy, holder: str, path: str, query: str
) -> tuple[int, AsyncIterator[bytes]]:
    head = ProxyRequest("GET", path, query, (("Accept", "application/x-ndjson"),))
    answer, chunks, _via = await proxy.request(holder, head)
    return answer.status, chunks


async def _read_limited(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    data = bytearray()
    async for chunk in chunks:
        data += chunk
        if len(data) > limit:
            raise ApiError(502, "BadGateway", f"the answer is over {limit} bytes")
    return bytes(data)


class _BadLine(Exception):
    """A holder sent a line that is not what the local log route sends."""


def _str_field(value: Obj, key: str, limit: int, *, optional: bool = False) -> str | None:
    item = value.get(key)
    if item is None and optional:
        return None
    if not isinstance(item, str) or len(item) > limit:
        raise _BadLine(f"field {key} is missing or malformed")
    return item


def _checked_line(raw: bytes, holder: str) -> Obj:
    """One line from a holder, rebuilt from the fields we know, the node forced to the holder."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _BadLine("a line is not JSON") from None
    if not isinstance(value, dict):
        raise _BadLine("a line is not a JSON object")
    kind = value.get("type")
    if kind == "BOOKMARK":
        return BOOKMARK
    if kind == "WARNING":
        return _warning(_str_field(value, "message", 4096) or "", holder)
    if kind is not None:
        raise _BadLine("a line has an unknown type")
    line: Obj = {
        "time": _str_field(value, "time", 64),
        "replica": _str_field(value, "replica", 253),
        "node": holder,
        "stream": _str_field(value, "stream", 16),
    }
    level = _str_field(value, "level", 16, optional=True)
    if level is not None:
        line["level"] = level
    line["text"] = _str_field(value, "text", MAX_REMOTE_LINE)
    return line


async def remote_logs(
    proxy: NodeProxy, holder: str, workload: str, *, follow: bool, tail: int | None
) -> AsyncIterator[list[Obj]]:
    """What ``holder`` answers for ``workload``'s local logs, in batches of checked lines."""
    params = {"follow": "true"} if follow else {}
    if tail is not None:
        params["tail"] = str(tail)
    path, query = _local_query(workload, **params)
    status, chunks = await _ask(proxy, holder, f"{path}/logs", query)
    try:
        if status != 200:
            body = await _read_limited(chunks, MAX_REMOTE_ERROR)
            message = _status_message(body, f"it answered {status}")
            yield [_warning(_about(holder, message), holder)]
            return
        pending = b""
        async for chunk in chunks:
            *complete, pending = (pending + chunk).split(b"\n")
            if len(pending) > MAX_REMOTE_LINE * 2:
                raise _BadLine("a line is too long")
            batch = [_checked_line(raw, holder) for raw in complete if raw.strip()]
            if batch:
                yield batch
        if pending.strip():
            yield [_checked_line(pending, holder)]
    except _BadLine as exc:
        yield [_warning(f"node {holder} sent a malformed log stream: {exc}", holder)]
    finally:
        await _close(chunks)


async def _close(iterator: AsyncIterator[Any]) -> None:
    closer = getattr(iterator, "aclose", None)
    if closer is not None:
        with contextlib.suppress(Exception):
            await closer()


@dataclass
class _Source:
    node: str
    batches: AsyncIterator[list[Obj]]
    in_backlog: bool = True
    done: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)


_DONE: Final[Obj] = {"type": "DONE"}


async def _pump(index: int, source: _Source, queue: asyncio.Queue[tuple[int, list[Obj]]]) -> None:
    """Move ``source``'s batches to ``queue``, then a DONE; a failure or a silence becomes a
    warning. Cancelled, it closes the source and sends nothing more."""
    iterator = source.batches
    try:
        while True:
            try:
                async with asyncio.timeout(SOURCE_SILENCE_SECONDS):
                    batch = await anext(iterator)
            except StopAsyncIteration:
                break
            except TimeoutError:
                batch = [
                    _warning(
                        f"node {source.node} sent nothing for {SOURCE_SILENCE_SECONDS:g}s; "
                        "its lines end here",
                        source.node,
                    )
                ]
            except ApiError as exc:
                batch = [_warning(_about(source.node, str(exc)), source.node)]
            except (ConnectionError, OSError) as exc:
                batch = [_warning(f"node {source.node}: the stream broke: {exc}", source.node)]
            else:
                await queue.put((index, batch))
                continue
            await queue.put((index, batch))
            break
    finally:
        await _close(iterator)
    await queue.put((index, [_DONE]))


class _LogMerge:
    """The swarm view of a workload's logs: one source per holder, merged into one stream.

    Sources are pumped into one bounded queue by tasks of their own. The kept lines of every
    holder come first, sorted by time, then a BOOKMARK, then lines as they arrive. Following,
    nodes that come to hold a replica later are followed too, from the store's change feed.
    """

    def __init__(
        self, request: web.Request, workload: str, *, follow: bool, tail: int | None
    ) -> None:
        self.request = request
        self.workload = workload
        self.follow = follow
        self.tail = tail
        self.me = request.app[NODE_NAME_KEY]
        self.store = request.app[STORE_KEY]
        self.sources: list[_Source] = []
        self.holders: set[str] = set()  # every node a source was started or refused for
        self.queue: asyncio.Queue[tuple[int, list[Obj]]] = asyncio.Queue(MERGE_QUEUE_BATCHES)
        self.notes: list[Obj] = []  # warnings not from a source, to write next
        self.backlog: list[Obj] = []
        self.live: list[Obj] = []
        self.past_backlog = False

    def add_holders(self, holders: Iterable[str]) -> None:
        """Start a source for each node not seen yet (or note why it is not asked)."""
        proxy = self.request.app[PROXY_KEY]
        for holder in sorted(set(holders) - self.holders):
            self.holders.add(holder)
            if holder == self.me:
                host = _host(self.request)
                batches = local_logs(
                    host, self.store, self.me, self.workload, follow=self.follow, tail=self.tail
                )
            elif proxy is None:
                self.notes.append(_warning(f"node {holder}: this node has no node proxy", holder))
                continue
            elif (why := _unready(self.request, holder)) is not None:
                self.notes.append(_warning(f"{why}: its replicas' lines are not shown", holder))
                continue
            else:
                batches = remote_logs(
                    proxy, holder, self.workload, follow=self.follow, tail=self.tail
                )
            # A node that comes to hold a replica after the kept lines went out sends new lines.
            source = _Source(holder, batches, in_backlog=not self.past_backlog)
            self.sources.append(source)
            source.task = asyncio.create_task(_pump(len(self.sources) - 1, source, self.queue))

    def refresh(self) -> None:
        """Follow the nodes that hold replicas now (the store changed)."""
        with contextlib.suppress(ApiError):  # the workload is gone: :meth:`finished` says so
            self.add_holders(_holders(self.request, self.workload))

    def poke(self) -> None:
        """Wake the writer (on the loop): the store changed."""
        with contextlib.suppress(asyncio.QueueFull):  # a full queue wakes it anyway
            self.queue.put_nowait((-1, []))

    def finished(self) -> bool:
        if not self.follow:
            return all(s.done for s in self.sources)
        if self.store.get("Workload", self.workload) is None:
            return True
        # Following, a workload with no replica placed yet is waited for.
        return bool(self.sources) and all(s.done for s in self.sources)

    def take(self, index: int, batch: list[Obj]) -> None:
        """Sort one batch into the backlog, the live lines or the notes."""
        if index < 0:
            self.refresh()
            return
        source = self.sources[index]
        for line in batch:
            if source.done:
                break  # given up on: what it sent before that is all there is
            kind = line.get("type")
            if kind == "DONE":
                source.done = True
                source.in_backlog = False
            elif kind == "BOOKMARK":
                source.in_backlog = False
            elif kind == "WARNING":
                self.notes.append(line)
            elif source.in_backlog:
                self.backlog.append(line)
            else:
                self.live.append(line)

    def pending(self) -> bytes:
        """The notes and live lines taken so far, to write now."""
        out = _ndjson([*self.notes, *self.live])
        self.notes.clear()
        self.live.clear()
        return out

    async def run(self, response: web.StreamResponse) -> None:
        """Write the merged stream to ``response``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BACKLOG_SECONDS
        while any(s.in_backlog for s in self.sources) and (left := deadline - loop.time()) > 0:
            try:
                async with asyncio.timeout(left):
                    self.take(*await self.queue.get())
            except TimeoutError:
                break
            if self.notes:
                await response.write(_ndjson(self.notes))
                self.notes.clear()
        for source in self.sources:
            if source.in_backlog and not self.follow:
                # Without follow there is nothing to wait for but this holder: do not hang.
                source.done = True
                if source.task is not None:
                    source.task.cancel()
                message = f"node {source.node} did not answer within {BACKLOG_SECONDS:g}s"
                self.notes.append(_warning(message, source.node))
            source.in_backlog = False  # a late holder's kept lines come among the new ones
        self.past_backlog = True
        self.backlog.sort(key=lambda line: (line["time"], line["node"], line["replica"]))
        await response.write(_ndjson(self.backlog) + _ndjson([BOOKMARK]) + self.pending())
        self.backlog.clear()
        while not self.finished():
            try:
                async with asyncio.timeout(WATCH_BOOKMARK_SECONDS):
                    self.take(*await self.queue.get())
            except TimeoutError:
                await response.write(_ndjson([BOOKMARK]))
                continue
            if data := self.pending():
                await response.write(data)

    async def close(self) -> None:
        for source in self.sources:
            if source.task is not None:
                source.task.cancel()
        await asyncio.gather(*(s.task for s in self.sources if s.task), return_exceptions=True)


async def _merged_logs(
    request: web.Request, workload: str, *, follow: bool, tail: int | None
) -> web.StreamResponse:
    holders = _holders(request, workload)
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    if not holders and not follow:
        message = f'workload "{workload}" has no replica on a node yet'
        await response.write(_ndjson([_warning(message), BOOKMARK]))
        await response.write_eof()
        return response
    merge = _LogMerge(request, workload, follow=follow, tail=tail)
    unsubscribe = None
    if follow:
        # Subscribed before the holders are read, so that no placement slips in between.
        unsubscribe = merge.store.subscribe(_Wakeup(then=merge.poke))
    try:
        merge.add_holders(holders)
        await merge.run(response)
    finally:
        if unsubscribe is not None:
            unsubscribe()
        await merge.close()
    await response.write_eof()
    return response


async def _remote_usage(proxy: NodeProxy, holder: str, workload: str) -> list[Obj]:
    path, query = _local_query(workload)
    async with asyncio.timeout(USAGE_SECONDS):
        status, chunks = await _ask(proxy, holder, f"{path}/usage", query)
        try:
            body = await _read_limited(chunks, MAX_REMOTE_USAGE)
        finally:
            await _close(chunks)
    if status != 200:
        raise ApiError(status, "BadGateway", _status_message(body, f"it answered {status}"))
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ApiError(502, "BadGateway", "it answered with invalid JSON") from None
    replicas = value.get("replicas") if isinstance(value, dict) else None
    if not isinstance(replicas, list):
        raise ApiError(502, "BadGateway", "it answered without a list of replicas")
    return [_checked_usage(row, holder) for row in replicas]


def _checked_usage(row: object, holder: str) -> Obj:
    """One replica's usage from a holder, rebuilt from the fields we know."""
    if not isinstance(row, dict):
        raise ApiError(502, "BadGateway", "it answered with a replica that is not an object")
    replica, phase = row.get("replica"), row.get("phase")
    if not isinstance(replica, str) or not _NAME_RE.match(replica):
        raise ApiError(502, "BadGateway", "it answered with a malformed replica name")
    if phase not in {str(p) for p in ReplicaPhase}:
        raise ApiError(502, "BadGateway", "it answered with an unknown phase")
    out: Obj = {"replica": replica, "node": holder, "phase": phase}
    for key in ("instances", "requests", "errors", "memoryBytes", "memoryPeakBytes"):
        value = row.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 63:
            raise ApiError(502, "BadGateway", f"it answered with a malformed {key}")
        out[key] = value
    cpu = row.get("cpuSeconds")
    if not isinstance(cpu, int | float) or isinstance(cpu, bool) or not 0 <= cpu < 1e12:
        raise ApiError(502, "BadGateway", "it answered with a malformed cpuSeconds")
    out["cpuSeconds"] = cpu
    return out


# --- routes ----------------------------------------------------------------------------------


async def _workload_logs(request: web.Request) -> web.StreamResponse:
    """``workloads/NAME/logs[?local=true][&follow=true][&tail=N]`` (``docs/api.md``)."""
    workload = request.match_info["name"]
    local, follow, tail = _flag(request, "local"), _flag(request, "follow"), _tail(request)
    if not local:
        return await _merged_logs(request, workload, follow=follow, tail=tail)
    host = _host(request)
    _check_workload(request, workload, _hosted_of(host, workload))
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    batches = local_logs(
        host, request.app[STORE_KEY], request.app[NODE_NAME_KEY], workload, follow=follow, tail=tail
    )
    try:
        async for batch in batches:
            await response.write(_ndjson(batch))
    finally:
        await _close(batches)
    await response.write_eof()
    return response


async def _workload_usage(request: web.Request) -> web.Response:
    """``workloads/NAME/usage[?local=true]``: a WorkloadMetrics object (``docs/api.md``)."""
    workload = request.match_info["name"]
    me = request.app[NODE_NAME_KEY]
    if _flag(request, "local"):
        hosted = _hosted_of(_host(request), workload)
        _check_workload(request, workload, hosted)
        rows = [_replica_usage(me, h) for h in hosted]
        return _json_response(_workload_metrics(workload, rows, []))
    proxy = request.app[PROXY_KEY]
    replicas: list[Obj] = []
    warnings: list[str] = []

    async def ask(holder: str) -> None:
        if holder == me:
            replicas.extend(_replica_usage(me, h) for h in _hosted_of(_host(request), workload))
            return
        why = _unready(request, holder) or (None if proxy else "this node has no node proxy")
        if why is not None:
            warnings.append(f"{why}: its replicas are not counted")
            return
        assert proxy is not None
        try:
            replicas.extend(await _remote_usage(proxy, holder, workload))
        except ApiError as exc:
            warnings.append(_about(holder, str(exc)))
        except TimeoutError:
            warnings.append(f"node {holder} did not answer within {USAGE_SECONDS:g}s")
        except (ConnectionError, OSError) as exc:
            warnings.append(f"node {holder}: {exc}")

    await asyncio.gather(*(ask(holder) for holder in _holders(request, workload)))
    return _json_response(_workload_metrics(workload, replicas, sorted(warnings)))


async def _node_usage(request: web.Request) -> web.StreamResponse:
    """``nodes/NAME/usage``: a NodeMetrics object from node NAME (``docs/api.md``)."""
    name = request.match_info["name"]
    if name == request.app[NODE_NAME_KEY]:
        return _json_response(_node_metrics(request))
    if request.app[STORE_KEY].get("Node", name) is None:
        raise ApiError(404, "NotFound", f'node "{name}" not found')
    if PROXIED_HEADER in request.headers:
        raise ApiError(400, "BadRequest", "a request proxied once is not proxied again")
    proxy = request.app[PROXY_KEY]
    if proxy is None:
        raise ApiError(503, "ServiceUnavailable", "this node does not proxy to other nodes")
    return await proxy.forward(request, name, f"{PREFIX}/nodes/{name}/usage")


def add_routes(
    app: web.Application,
    *,
    instances: InstancesOf | None = None,
    sampler: NodeSampler | None = None,
) -> None:
    """Mount the routes on ``app``, which holds the server's keys (``create_app``)."""
    app[INSTANCES_KEY] = instances or (lambda: None)
    app[SAMPLER_KEY] = sampler or NodeSampler()
    app.router.add_get(f"{PREFIX}/workloads/{{name}}/logs", _workload_logs)
    app.router.add_get(f"{PREFIX}/workloads/{{name}}/usage", _workload_usage)
    app.router.add_get(f"{PREFIX}/nodes/{{name}}/usage", _node_usage)
