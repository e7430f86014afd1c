"""The edge gateway: every node answers HTTP for every workload of the swarm (SPEC section 6).

``ANY http://GATEWAY/<workload>/<rest>`` reaches the workload's ``http`` executor with
``PATH_INFO=/<rest>`` and ``SCRIPT_NAME=/<workload>`` (``/<workload>`` alone is served as
``/<workload>/``). The routing rule (ADR 0014):

1. this node's own Ready instance, when it has one (newest generation first);
2. otherwise the nodes whose Replica of the workload is Ready in the document, alive in this
   node's membership view, nearest first by Vivaldi estimate (unknown distances last, ties by
   name): the request is forwarded over the mesh (:mod:`pollen.api.forward`), directly or
   through a relay, and the next node is tried when one cannot be reached, refuses (it has no
   Ready instance after all), or breaks off before answering. A request that is not idempotent
   is not sent to a second node once the first may have run it.

A forwarded request is served only from the target's own instances: it is never forwarded
again, so requests cannot loop. Answers the gateway writes itself, one sentence each: 404 for
a path that names no HTTP workload, 503 with ``Retry-After`` when the workload has no Ready
replica on a live node, 502 when every node holding one failed. What a workload answers, its
errors included, goes back as it is.

``pollen.call`` takes the same way: :class:`MeshCallRouter` serves a call from this node's
instances when it can and otherwise hands it to :meth:`Gateway.call`.

The HTTP side is :class:`~pollen.runtime.httpserver.HttpServer` (keep-alive, pipelining, body
and head caps, 400 for what the parser refuses): the gateway is its handler.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Final

from pollen.api.forward import (
    GATEWAY_STREAM,
    ForwardedAnswer,
    ForwardedRequest,
    ForwardError,
    ForwardFailed,
    exchange,
    serve_stream,
)
from pollen.api.proxy import FrameChannel
from pollen.mesh.membership import MemberState
from pollen.mesh.service import MeshService
from pollen.mesh.transport import TransportError
from pollen.resources.models import Executor, Replica, ReplicaPhase, Workload
from pollen.runtime import abi
from pollen.runtime.errors import (
    CallDepthExceeded,
    SandboxError,
    Timeout,
    Unavailable,
    UnknownWorkload,
)
from pollen.runtime.executors import HttpExecutor, failure_response
from pollen.runtime.host import HostedInstance, InstanceHost
from pollen.runtime.httpserver import HttpServer, ServerLimits
from pollen.runtime.pool import WorkerPool, copy_result
from pollen.runtime.wagi import HttpRequest, HttpResponse
from pollen.state import ResourceStore

__all__ = ["Gateway", "MeshCallRouter", "nearest_first"]

log = logging.getLogger(__name__)

#: Seconds a forwarded request may wait for its answer beyond the workload's own timeout
#: (``resources.timeoutMs``): the target's queue, the mesh, a relay.
ANSWER_MARGIN: Final = 10.0
#: Seconds between checks of forwarded requests in flight: is the target still a member, is
#: the answer late? A QUIC connection to a killed node looks open until its idle timeout (30 s);
#: membership declares the node dead in a few seconds, and then its requests are cut.
SWEEP_SECONDS: Final = 0.25
#: Seconds a ``pollen.call`` routed over the mesh may take, at most.
CALL_TIMEOUT: Final = 30.0
#: Methods that may run twice without harm (RFC 9110 section 9.2.2): only these are sent to
#: another node after one may have run them.
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
RETRY_AFTER: Final = (("Retry-After", "1"),)
#: Threads serving calls forwarded from other nodes, at most; more are refused as overloaded.
MAX_FORWARDED_CALLS: Final = 32


def nearest_first(nodes: Iterable[str], rtt: Callable[[str], float | None]) -> list[str]:
    """``nodes`` by estimated round trip, unknown ones last, ties by name."""

    def key(name: str) -> tuple[bool, float, str]:
        estimate = rtt(name)
        return (estimate is None, estimate or 0.0, name)

    return sorted(set(nodes), key=key)


def _not_run(response: HttpResponse, hosted: HostedInstance) -> bool:
    """Whether ``response`` says the instance refused the request without running it because
    it stopped taking requests (it is draining): then another replica may serve it."""
    return (
        response.status == 503
        and response.error is not None
        and hosted.phase is not ReplicaPhase.READY
    )


@dataclass
class _Watch:
    """A forwarded request waiting for its answer from ``peer``."""

    peer: str
    deadline: float
    #: Why the sweeper cut the stream, if it did.
    cut: str | None = None


@dataclass(frozen=True)
class _Outcome:
    """A forwarded request's end: the answer, or the status and sentence of a failure."""

    response: HttpResponse | None
    status: int = 502
    message: str = ""


class Gateway:
    """One node's gateway: the HTTP edge, the forwarding origin and the forwarding target.

    ``handle`` is the HTTP handler; :meth:`serve_forwarded` the handler of
    :data:`~pollen.api.forward.GATEWAY_STREAM` mesh streams; :meth:`call` forwards a workload
    call. ``start``/``close`` run the HTTP server and the sweeper of forwarded requests.
    """

    def __init__(
        self,
        node_name: str,
        *,
        store: ResourceStore,
        instances: InstanceHost,
        mesh: MeshService,
        limits: ServerLimits | None = None,
    ) -> None:
        self.node_name = node_name
        self._store = store
        self._instances = instances
        self._mesh = mesh
        self._server = HttpServer(self.handle, limits=limits)
        self._watched: dict[FrameChannel, _Watch] = {}
        # A call forwarded from another node runs on a thread of its own, as a local call runs
        # on its caller's thread: on the callee's pool, a cycle of calls across nodes (A on one
        # node calls B on another, which calls A, ...) would wait for workers its own callers
        # hold, until its timeout.
        self._calls = WorkerPool(MAX_FORWARDED_CALLS, queue_size=0, name="gateway-calls")
        self._sweeper: asyncio.Task[None] | None = None
        self.url = ""

    # lifecycle --------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve HTTP on ``host:port``; returns the URL (``http://HOST:PORT``)."""
        bound = await self._server.start(host, port)
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{bound}"
        self._sweeper = asyncio.create_task(self._sweep(), name="gateway-sweeper")
        return self.url

    async def close(self, grace: float = 5.0) -> None:
        """Stop taking requests; answers in flight get ``grace`` seconds."""
        await self._server.close(grace)
        await asyncio.to_thread(self._calls.close, True, grace)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    # the edge ---------------------------------------------------------------------------------

    def handle(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        """Answer one request from outside: here, elsewhere, or a failure (see the module)."""
        parsed = abi.parse_call_name(request.path[1:]) if request.path.startswith("/") else None
        if parsed is None:
            return HttpResponse.failure(
                404, "the path names no workload: ask for /WORKLOAD/PATH on this gateway"
            )
        name, rest, _ = parsed
        workload = self._store.get("Workload", name)
        if not isinstance(workload, Workload):
            return HttpResponse.failure(404, f'no workload named "{name}" exists in this cluster')
        if workload.spec.executor is not Executor.HTTP:
            return HttpResponse.failure(
                404, f'workload "{name}" runs as a command job and serves no HTTP'
            )
        routed = dataclasses.replace(request, path=rest, script_name=f"/{name}")
        picked = self._pick(name)
        if picked is None:
            return self._elsewhere(workload, routed)
        return self._here_or_elsewhere(*picked, workload, routed)

    def _pick(self, workload: str) -> tuple[HostedInstance, HttpExecutor] | None:
        """This node's Ready instance of ``workload`` to serve with, newest generation first."""
        for hosted in self._instances.ready(workload):
            executor = hosted.instance.executor
            if isinstance(executor, HttpExecutor):
                return hosted, executor
        return None

    def _here_or_elsewhere(
        self,
        hosted: HostedInstance,
        executor: HttpExecutor,
        workload: Workload,
        request: HttpRequest,
    ) -> asyncio.Future[HttpResponse]:
        """Serve here; if the instance began draining before the request ran, elsewhere.

        The common case costs one future and a callback: no task per request.
        """
        loop = asyncio.get_running_loop()
        inner = executor.dispatch(request)
        outer: asyncio.Future[HttpResponse] = loop.create_future()

        def settle(done: asyncio.Future[HttpResponse]) -> None:
            if outer.done():
                return
            if done.cancelled():
                outer.cancel()
            elif (error := done.exception()) is not None:
                outer.set_exception(error)
            elif _not_run(response := done.result(), hosted):
                retry = asyncio.ensure_future(self._elsewhere(workload, request))
                retry.add_done_callback(lambda task: copy_result(task, outer))
            else:
                outer.set_result(response)

        inner.add_done_callback(settle)
        return outer

    async def _elsewhere(self, workload: Workload, request: HttpRequest) -> HttpResponse:
        outcome = await self._forward(workload, request, depth=0)
        if outcome.response is not None:
            return outcome.response
        extra = RETRY_AFTER if outcome.status == 503 else ()
        return HttpResponse.failure(outcome.status, outcome.message, extra)

    # pollen.call --------------------------------------------------------------------------

    async def call(self, target: str, request: HttpRequest, *, depth: int) -> HttpResponse:
        """Serve a workload call on the nearest other node with a Ready replica of ``target``.

        Raises ``UnknownWorkload`` when no HTTP workload has that name, ``Unavailable`` when
        no node could serve it; a workload's own failure comes back as its answer (with
        ``error`` set), as from a local call.
        """
        workload = self._store.get("Workload", target)
        if not isinstance(workload, Workload) or workload.spec.executor is not Executor.HTTP:
            raise UnknownWorkload(f'no http workload named "{target}" exists', workload=target)
        outcome = await self._forward(workload, request, depth=depth)
        if outcome.response is None:
            raise Unavailable(outcome.message, workload=target)
        return outcome.response

    # forwarding: the origin ---------------------------------------------------------------

    def holders(self, workload: str) -> list[str]:
        """Other nodes with a Ready replica of ``workload`` that are alive here, nearest first."""
        alive = set(self._mesh.alive())
        nodes = []
        for replica in self._store.list("Replica"):
            if not isinstance(replica, Replica) or replica.spec.workload != workload:
                continue
            node = replica.spec.node
            if (
                node is not None
                and node != self.node_name
                and node in alive
                and replica.status.phase is ReplicaPhase.READY
                # Ready as reported by the node that holds the claim now, not by one before.
                and replica.status.node == node
                and replica.metadata.deletion_timestamp is None
            ):
                nodes.append(node)
        return nearest_first(nodes, self._mesh.estimated_rtt)

    async def _forward(self, workload: Workload, request: HttpRequest, *, depth: int) -> _Outcome:
        name = workload.name
        holders = self.holders(name)
        if not holders:
            return _Outcome(None, 503, f'workload "{name}" has no Ready replica on a live node yet')
        timeout = workload.spec.resources.timeout_ms / 1000 + ANSWER_MARGIN
        forwarded = ForwardedRequest(name, request, depth)
        loop = asyncio.get_running_loop()
        failures: list[str] = []
        refusals: list[str] = []
        for peer in holders:
            try:
                opened = await self._mesh.open_stream(peer, GATEWAY_STREAM)
            except (TransportError, TimeoutError) as exc:
                failures.append(f"{peer}: {str(exc) or 'timed out'}")
                continue
            watch = self._watched[opened.stream] = _Watch(peer, loop.time() + timeout)
            try:
                answer = await exchange(opened.stream, forwarded)
            except ForwardError as exc:
                return _Outcome(None, 400, f"the request cannot be forwarded: {exc}")
            except ForwardFailed as exc:
                reason = watch.cut or str(exc)
                log.info("forwarding a request for %s to %s failed: %s", name, peer, reason)
                failures.append(f"{peer}: {reason}")
                if exc.sent and request.method not in IDEMPOTENT_METHODS:
                    return _Outcome(
                        None,
                        502,
                        f"node {peer} broke off while serving the request ({reason}); a "
                        f"{request.method} request is not sent to another node",
                    )
                continue
            finally:
                self._watched.pop(opened.stream, None)
            if answer.response is None:
                refusals.append(f"{peer}: {answer.refused}")
                continue
            hops = (peer, opened.via, self.node_name) if opened.via else (peer, self.node_name)
            via = ", ".join(f"1.1 {hop}" for hop in hops)
            response = answer.response
            return _Outcome(
                dataclasses.replace(response, headers=(*response.headers, ("Via", via)))
            )
        if failures:
            return _Outcome(
                None,
                502,
                f'no node holding a Ready replica of "{name}" answered ({"; ".join(failures)})',
            )
        return _Outcome(
            None, 503, f'no node could serve "{name}" right now ({"; ".join(refusals)})'
        )

    async def _sweep(self) -> None:
        """Cut forwarded requests whose target died or whose answer is late (see
        :data:`SWEEP_SECONDS`); the origin then tries the next node or answers 502."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            if not self._watched:
                continue
            now = loop.time()
            members = self._mesh.members()
            for stream, watch in list(self._watched.items()):
                member = members.get(watch.peer)
                if member is None or member.state in (MemberState.DEAD, MemberState.LEFT):
                    watch.cut = f"node {watch.peer} left or was declared dead"
                elif now > watch.deadline:
                    watch.cut = "no answer in time"
                else:
                    continue
                stream.reset()

    # forwarding: the target -----------------------------------------------------------------

    async def serve_forwarded(self, origin: str, stream: FrameChannel) -> None:
        """Serve one forwarded request from ``origin`` (a mesh stream handler)."""
        await serve_stream(origin, stream, self._serve_here)

    def _serve_here(
        self, workload: str, request: HttpRequest, depth: int
    ) -> Awaitable[ForwardedAnswer] | None:
        # Only this node's own instances: a forwarded request is never forwarded again.
        picked = self._pick(workload)
        if picked is None:
            return None
        return self._answer_here(*picked, request, depth)

    async def _answer_here(
        self, hosted: HostedInstance, executor: HttpExecutor, request: HttpRequest, depth: int
    ) -> ForwardedAnswer:
        response = await self._run_here(executor, request, depth)
        if _not_run(response, hosted):
            return ForwardedAnswer(refused=f"its instance of {hosted.workload} is draining")
        return ForwardedAnswer(response)

    def _run_here(
        self, executor: HttpExecutor, request: HttpRequest, depth: int
    ) -> Awaitable[HttpResponse]:
        """``request`` on ``executor``; a runtime failure becomes its HTTP answer."""
        if depth == 0:
            return executor.dispatch(request)

        def invoke() -> HttpResponse:
            # The depth travels with the call, so that a cycle of calls across nodes stops
            # at the same depth as one on a single node.
            try:
                return executor.invoke(request, depth=depth)
            except SandboxError as exc:
                return failure_response(exc)

        try:
            return self._calls.submit_async(invoke)
        except SandboxError as exc:  # every call thread is busy, or the gateway is closing
            done: asyncio.Future[HttpResponse] = asyncio.get_running_loop().create_future()
            done.set_result(failure_response(exc))
            return done


class MeshCallRouter:
    """Where a node's ``pollen.call`` goes: this node's own workloads first, then the nearest
    Ready replica elsewhere, through the gateway (a :class:`~pollen.runtime.abi.CallRouter`).

    Calls arrive on worker threads, inside the calling instance's host call; a call that
    leaves the node is handed to the event loop ``loop`` and waited for, at most ``timeout``
    seconds. The router is made before the runtime (which takes it) and connected to the
    runtime's local registry and to the gateway once both exist (:meth:`connect`); until then
    no workload is reachable.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, timeout: float = CALL_TIMEOUT) -> None:
        self._loop = loop
        self._timeout = timeout
        self._local: abi.CallRouter | None = None
        self._gateway: Gateway | None = None

    def connect(self, local: abi.CallRouter, gateway: Gateway) -> None:
        """Route to ``local`` first (this node's workloads), then through ``gateway``."""
        self._local = local
        self._gateway = gateway

    def route_call(self, target: str, request: HttpRequest, *, depth: int) -> HttpResponse:
        """Serve ``request`` with workload ``target``, here if it runs here, else elsewhere."""
        if depth > abi.MAX_CALL_DEPTH:
            raise CallDepthExceeded(f"more than {abi.MAX_CALL_DEPTH} nested calls", workload=target)
        if self._local is not None:
            try:
                return self._local.route_call(target, request, depth=depth)
            except UnknownWorkload:
                pass  # not here: ask the swarm
            except Unavailable as exc:
                # This node's instance stopped taking requests (it drains) before the call
                # ran: another replica may take it. A workload's own failure is not retried.
                log.debug("local instance of %s unavailable (%s); routing elsewhere", target, exc)
        gateway = self._gateway
        if gateway is None:
            raise UnknownWorkload(f'no workload named "{target}" is reachable', workload=target)
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None  # a worker thread, as it should be
        if running is self._loop:
            # Waiting here would block the very loop that must do the forwarding.
            raise Unavailable("a call cannot be routed from the event loop", workload=target)
        try:
            future = asyncio.run_coroutine_threadsafe(
                gateway.call(target, request, depth=depth), self._loop
            )
        except RuntimeError:  # the loop is closed: the node is stopping
            raise Unavailable("this node is shutting down", workload=target) from None
        try:
            return future.result(self._timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise Timeout(
                f'the call to "{target}" got no answer within {self._timeout:g}s', workload=target
            ) from None
        except concurrent.futures.CancelledError:
            raise Unavailable(
                "the call was cancelled: the node is stopping", workload=target
            ) from None
