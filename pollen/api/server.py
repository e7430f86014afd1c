"""The node's HTTP API, for pctl and the dashboard. The contract is ``docs/api.md``.

A thin aiohttp shell: it authenticates, decodes, validates with the resource rules, calls the
store, and encodes. Every failure becomes a ``Status`` object with one sentence; nothing a client
sends can stop the node from serving the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from pollen.api.errors import ApiError
from pollen.api.proxy import PROXIED_HEADER, NodeProxy
from pollen.mesh.fetch import ArtifactFetcher, ArtifactUnavailable
from pollen.resources import (
    API_VERSION,
    KIND_MODELS,
    Artifact,
    InvalidResource,
    Resource,
    Workload,
    to_dict,
    validate_object,
)
from pollen.resources.models import is_local_path
from pollen.resources.signing import SignatureError, verify_artifact
from pollen.runtime.artifacts import (
    CHUNK_BYTES,
    ArtifactNotFound,
    ArtifactStore,
    ArtifactTooLarge,
    CorruptArtifact,
    DigestMismatch,
    InvalidDigest,
    QuotaExceeded,
    digest_hex,
)
from pollen.state import ChangeEvent, Conflict, NotFound, ResourceStore, StoreError
from pollen.state.events import Event, EventLog

if TYPE_CHECKING:
    from pollen.runtime.host import InstanceHost
    from pollen.runtime.telemetry import NodeTelemetry

log = logging.getLogger(__name__)

PREFIX = "/apis/pollen.dev/v1alpha1"
MAX_BODY_BYTES = 64 << 20
WATCH_BOOKMARK_SECONDS = 15.0
# A watcher that falls this far behind is cut off rather than letting its queue grow without
# bound; like a Kubernetes watch that expired, the client lists again.
WATCH_QUEUE_LIMIT = 10_000

_PLURALS: dict[str, str] = {model.PLURAL: kind for kind, model in KIND_MODELS.items()}

STORE_KEY = web.AppKey("store", ResourceStore)
EVENTS_KEY = web.AppKey("events", EventLog)
TOKEN_KEY = web.AppKey("token", str)
NODE_NAME_KEY = web.AppKey("node_name", str)
RttEstimate = Callable[[str], float | None]
RTT_KEY: web.AppKey[RttEstimate] = web.AppKey("rtt")
Holders = Callable[[str], list[str]]
HOLDERS_KEY: web.AppKey[Holders] = web.AppKey("holders")
PROXY_KEY: web.AppKey[NodeProxy | None] = web.AppKey("proxy")
ARTIFACTS_KEY: web.AppKey[ArtifactStore | None] = web.AppKey("artifacts")
FETCHER_KEY: web.AppKey[ArtifactFetcher | None] = web.AppKey("fetcher")
#: Names the node a blob was fetched from when a GET had to fetch it first.
FETCHED_FROM_HEADER = "Pollen-Fetched-From"
#: With it: every node that sent chunks, and the seconds the fetch took (ADR 0017).
FETCH_SOURCES_HEADER = "Pollen-Fetch-Sources"
FETCH_SECONDS_HEADER = "Pollen-Fetch-Seconds"
#: The relay the fetch went through, when there was no direct route to the holder.
FETCHED_VIA_HEADER = "Pollen-Fetched-Via"


def _json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _failure_response(failure: ApiError) -> web.Response:
    return _json_response(failure.to_status(), status=failure.code)


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as failure:
        return _failure_response(failure)
    except web.HTTPRequestEntityTooLarge:
        return _failure_response(
            ApiError(413, "RequestEntityTooLarge", f"request body over {MAX_BODY_BYTES} bytes")
        )
    except web.HTTPException as exc:
        reason = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status, "BadRequest")
        message = f"{request.method} {request.path}: {exc.reason.lower()}"
        return _failure_response(ApiError(exc.status, reason, message))
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("internal error serving %s %s", request.method, request.path)
        return _failure_response(
            ApiError(500, "InternalError", "internal error; the node logged the details")
        )


@web.middleware
async def _auth(request: web.Request, handler: _Handler) -> web.StreamResponse:
    expected = request.app[TOKEN_KEY]
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        presented.strip().encode(), expected.encode()
    ):
        raise ApiError(401, "Unauthorized", "missing or wrong bearer token")
    return await handler(request)


def _kind_of(request: web.Request) -> str:
    plural = request.match_info["plural"]
    kind = _PLURALS.get(plural)
    if kind is None:
        known = ", ".join(sorted(_PLURALS))
        raise ApiError(404, "NotFound", f'unknown resource type "{plural}"; known: {known}')
    return kind


def _flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name)
    if value is None:
        return False
    if value.lower() in ("", "1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise ApiError(400, "BadRequest", f"query parameter {name} must be true or false")


def _label_selector(request: web.Request) -> dict[str, str] | None:
    raw = request.query.get("labelSelector")
    if not raw:
        return None
    selector: dict[str, str] = {}
    for term in raw.split(","):
        key, sep, value = term.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ApiError(400, "BadRequest", f"labelSelector term {term!r} is not key=value")
        selector[key] = value.strip().removeprefix("=")  # accept k==v as kubectl does
    return selector


def _not_found(kind: str, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{kind.lower()} "{name}" not found')


def _list_body(items: list[dict[str, Any]], kind: str = "List") -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind, "items": items}


def _present(request: web.Request, obj: Resource) -> dict[str, Any]:
    """An object as this node serves it: Nodes get the RTT this node estimates to them,
    Artifacts the nodes that hold their bytes as far as this node knows."""
    data = to_dict(obj)
    if obj.kind == "Node":
        rtt = request.app[RTT_KEY](obj.metadata.name)
        if rtt is not None:
            data.setdefault("status", {})["estimatedRTTMs"] = round(rtt * 1000, 3)
    elif isinstance(obj, Artifact):
        data.setdefault("status", {})["holders"] = request.app[HOLDERS_KEY](obj.spec.digest)
    return data


async def _healthz(request: web.Request) -> web.Response:
    return _json_response({"status": "ok", "node": request.app[NODE_NAME_KEY]})


async def _list(request: web.Request) -> web.StreamResponse:
    kind = _kind_of(request)
    selector = _label_selector(request)
    store = request.app[STORE_KEY]
    if _flag(request, "watch"):
        return await _watch(request, kind, None, selector)
    return _json_response(_list_body([_present(request, r) for r in store.list(kind, selector)]))


async def _get(request: web.Request) -> web.StreamResponse:
    kind = _kind_of(request)
    name = request.match_info["name"]
    if _flag(request, "watch"):
        return await _watch(request, kind, name, None)
    obj = request.app[STORE_KEY].get(kind, name)
    if obj is None:
        raise _not_found(kind, name)
    return _json_response(_present(request, obj))


async def _read_json(request: web.Request) -> Any:
    body = await request.read()
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "BadRequest", f"request body is not valid JSON: {exc}") from exc


def _validate_items(payload: Any) -> list[Resource]:
    if not isinstance(payload, dict) or payload.get("kind") != "List":
        raise ApiError(400, "BadRequest", 'apply takes a JSON object with "kind": "List"')
    items = payload.get("items")
    if not isinstance(items, list):
        raise ApiError(400, "BadRequest", 'apply takes a List whose "items" is an array')
    resources: list[Resource] = []
    for index, item in enumerate(items):
        try:
            resource = validate_object(item)
            if isinstance(resource, Workload) and is_local_path(resource.spec.artifact):
                # Only pctl, on the machine that has the file, can push it (ADR 0012).
                raise InvalidResource(
                    f"{resource.spec.artifact[:200]!r} is a local path; pctl apply pushes the "
                    "file and puts its digest here",
                    field="spec.artifact",
                    loc=("spec", "artifact"),
                )
            if isinstance(resource, Artifact):
                _check_signature(resource)
            resources.append(resource)
        except InvalidResource as exc:
            where = f"items[{index}]"
            if isinstance(item, dict):
                meta = item.get("metadata")
                name = meta.get("name") if isinstance(meta, dict) else None
                if isinstance(item.get("kind"), str) and isinstance(name, str):
                    where += f' ({item["kind"]} "{name[:253]}")'
            field = f"{exc.field}: " if exc.field else ""
            code, reason = (413, "RequestEntityTooLarge") if exc.too_large else (422, "Invalid")
            raise ApiError(
                code,
                reason,
                f"{where}: {field}{exc.message}",
                {"index": index, "field": exc.field},
            ) from exc
    return resources


def _check_signature(artifact: Artifact) -> None:
    """A signature, when an Artifact carries one, must verify: a forged or mismatched one is
    refused here, where the user is (ADR 0016); the node that runs it checks again."""
    try:
        verify_artifact(artifact)
    except SignatureError as exc:
        raise InvalidResource(str(exc), field="spec.signature", loc=("spec", "signature")) from None


async def _apply(request: web.Request) -> web.Response:
    dry_run = _flag(request, "dryRun")
    resources = _validate_items(await _read_json(request))
    store = request.app[STORE_KEY]
    try:
        outcomes = store.apply(resources, dry_run=dry_run)
    except Conflict as exc:
        raise ApiError(409, "Conflict", str(exc)) from exc
    except StoreError as exc:
        raise ApiError(400, "BadRequest", str(exc)) from exc
    if not dry_run:
        events = request.app[EVENTS_KEY]
        for outcome in outcomes:
            if outcome.action != "unchanged":
                events.record(
                    outcome.kind,
                    outcome.name,
                    outcome.action.capitalize(),
                    f'{outcome.kind.lower()} "{outcome.name}" {outcome.action} by apply',
                )
    items = [
        {
            "kind": outcome.kind,
            "name": outcome.name,
            "action": outcome.action,
            "object": to_dict(outcome.object),
        }
        for outcome in outcomes
    ]
    return _json_response(_list_body(items, kind="ApplyResult"))


async def _delete(request: web.Request) -> web.Response:
    kind = _kind_of(request)
    name = request.match_info["name"]
    try:
        obj = request.app[STORE_KEY].delete(kind, name)
    except NotFound as exc:
        raise _not_found(kind, name) from exc
    pending = obj.metadata.finalizers
    message = f'{kind.lower()} "{name}" ' + (
        f"marked for deletion, waiting for finalizers: {', '.join(pending)}"
        if pending
        else "deleted"
    )
    request.app[EVENTS_KEY].record(kind, name, "Deleted" if not pending else "Deleting", message)
    return _json_response(to_dict(obj))


def _event_filter(request: web.Request) -> tuple[str | None, str | None]:
    kind = request.query.get("kind")
    if kind is not None and kind not in KIND_MODELS:
        raise ApiError(400, "BadRequest", f"unknown kind {kind!r} in query")
    return kind, request.query.get("name")


async def _events(request: web.Request) -> web.StreamResponse:
    kind, name = _event_filter(request)
    events = request.app[EVENTS_KEY]
    if not _flag(request, "watch"):
        return _json_response(_list_body([e.to_dict() for e in events.list(kind, name)]))

    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def on_event(event: Event) -> None:
        if (kind is None or event.kind == kind) and (name is None or event.name == name):
            _offer(queue, {"type": "ADDED", "object": event.to_dict()})

    initial = [{"type": "ADDED", "object": e.to_dict()} for e in events.list(kind, name)]
    unsubscribe = events.subscribe(on_event)
    try:
        return await _stream(request, initial, queue)
    finally:
        unsubscribe()


def _offer(queue: asyncio.Queue[dict[str, Any] | None], item: dict[str, Any]) -> None:
    """Queue a watch line; past the limit, end the watch instead of growing memory."""
    if queue.qsize() >= WATCH_QUEUE_LIMIT:
        queue.put_nowait(None)
    else:
        queue.put_nowait(item)


async def _watch(
    request: web.Request, kind: str, name: str | None, selector: dict[str, str] | None
) -> web.StreamResponse:
    store = request.app[STORE_KEY]

    def matches(obj: Resource) -> bool:
        if name is not None and obj.metadata.name != name:
            return False
        labels = obj.metadata.labels
        return selector is None or all(labels.get(k) == v for k, v in selector.items())

    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def on_change(change: ChangeEvent) -> None:
        if change.kind == kind and matches(change.object):
            _offer(queue, {"type": str(change.type), "object": _present(request, change.object)})

    # Subscribe before listing: the store calls back synchronously on this loop, so nothing
    # can slip between the list and the first change.
    unsubscribe = store.subscribe(on_change)
    try:
        if name is not None:
            current = store.get(kind, name)
            existing = [current] if current is not None else []
        else:
            existing = [obj for obj in store.list(kind, selector)]
        initial = [{"type": "ADDED", "object": _present(request, obj)} for obj in existing]
        return await _stream(request, initial, queue)
    finally:
        unsubscribe()


async def _stream(
    request: web.Request,
    initial: list[dict[str, Any]],
    queue: asyncio.Queue[dict[str, Any] | None],
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    lines = [orjson.dumps(item) + b"\n" for item in initial]
    lines.append(b'{"type":"BOOKMARK"}\n')
    await response.write(b"".join(lines))
    while True:
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
            async with asyncio.timeout(WATCH_BOOKMARK_SECONDS):
                item = await queue.get()
        except TimeoutError:
            await response.write(b'{"type":"BOOKMARK"}\n')
            continue
        if item is None:
            break
        await response.write(orjson.dumps(item) + b"\n")
    await response.write_eof()
    return response


async def _proxy(request: web.Request) -> web.StreamResponse:
    """``nodes/NAME/proxy/PATH``: what ``PATH`` answers on node NAME's API (``docs/api.md``)."""
    if PROXIED_HEADER in request.headers:
        raise ApiError(400, "BadRequest", "a request proxied once is not proxied again")
    name = request.match_info["name"]
    # The raw path, so that what reaches the other node is exactly what the caller sent.
    prefix = f"{PREFIX}/nodes/{name}/proxy"
    raw_path = request.raw_path.partition("?")[0]
    tail = raw_path[len(prefix) :] if raw_path.startswith(prefix) else None
    if tail is None or (tail and not tail.startswith("/")):
        raise ApiError(404, "NotFound", f"{request.method} {request.path}: not found")
    if request.app[STORE_KEY].get("Node", name) is None:
        raise _not_found("Node", name)
    proxy = request.app[PROXY_KEY]
    if proxy is None:
        raise ApiError(503, "ServiceUnavailable", "this node does not proxy to other nodes")
    return await proxy.forward(request, name, tail or "/")


# --- blobs: artifacts' bytes in this node's store (ADR 0012) --------------------------------


def _artifact_store(request: web.Request) -> ArtifactStore:
    store = request.app[ARTIFACTS_KEY]
    if store is None:
        raise ApiError(503, "ServiceUnavailable", "this node has no artifact store")
    return store


def _blob_digest(request: web.Request) -> str:
    digest = request.match_info["digest"]
    try:
        digest_hex(digest)
    except InvalidDigest as exc:
        raise ApiError(400, "BadRequest", str(exc)) from None
    return digest


def _blob_body(digest: str, size: int) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "Blob", "digest": digest, "size": size}


async def _list_blobs(request: web.Request) -> web.Response:
    """``GET blobs``: the digests this node holds, with their sizes."""
    store = _artifact_store(request)
    items = []
    for digest in await asyncio.to_thread(store.digests):
        with contextlib.suppress(ArtifactNotFound):  # deleted since the listing
            items.append({"digest": digest, "size": store.size(digest)})
    return _json_response(_list_body(items, kind="BlobList"))


async def _put_blob(request: web.Request) -> web.Response:
    """``PUT blobs/DIGEST``: store the body under DIGEST, if it hashes to it."""
    store = _artifact_store(request)
    digest = _blob_digest(request)
    length = request.content_length
    if length is not None and length > store.limit:
        raise ApiError(413, "RequestEntityTooLarge", store.too_large_message(length, digest))
    existed = store.has(digest)
    try:
        # A known length makes room within the quota before the body is read.
        writer = await asyncio.to_thread(store.writer, digest, size=length)
    except QuotaExceeded as exc:
        raise ApiError(507, "InsufficientStorage", str(exc)) from None
    try:
        pending = bytearray()
        async for data in request.content.iter_chunked(CHUNK_BYTES):
            pending += data
            if len(pending) >= CHUNK_BYTES:
                await asyncio.to_thread(writer.write, bytes(pending))
                pending.clear()
        await asyncio.to_thread(writer.write, bytes(pending))
        await asyncio.to_thread(writer.commit)
    except ArtifactTooLarge as exc:
        raise ApiError(413, "RequestEntityTooLarge", str(exc)) from None
    except QuotaExceeded as exc:
        raise ApiError(507, "InsufficientStorage", str(exc)) from None
    except DigestMismatch as exc:
        raise ApiError(400, "BadRequest", f"the body does not match the digest: {exc}") from None
    finally:
        if writer.digest is None:
            await asyncio.to_thread(writer.abort)
    return _json_response(_blob_body(digest, writer.written), status=200 if existed else 201)


async def _head_blob(request: web.Request) -> web.Response:
    """``HEAD blobs/DIGEST``: whether this node holds DIGEST (no fetch, no hashing)."""
    store = _artifact_store(request)
    digest = _blob_digest(request)
    try:
        size = store.size(digest)
    except ArtifactNotFound:
        return web.Response(status=404)
    return web.Response(headers={"Content-Length": str(size), "ETag": f'"{digest}"'})


async def _get_blob(request: web.Request) -> web.StreamResponse:
    """``GET blobs/DIGEST``: the bytes, fetched from a holder in the swarm first if needed."""
    store = _artifact_store(request)
    digest = _blob_digest(request)
    headers = {"Content-Type": "application/octet-stream", "ETag": f'"{digest}"'}
    if not await asyncio.to_thread(store.verify, digest):
        fetcher = request.app[FETCHER_KEY]
        if fetcher is None:
            raise ApiError(404, "NotFound", f"this node does not hold {digest}")
        try:
            await fetcher.ensure(digest)
        except ArtifactUnavailable as exc:
            if not exc.attempts:
                raise ApiError(404, "NotFound", str(exc)) from None
            raise ApiError(502, "BadGateway", str(exc)) from None
        except ArtifactTooLarge as exc:
            raise ApiError(413, "RequestEntityTooLarge", str(exc)) from None
        except QuotaExceeded as exc:
            raise ApiError(507, "InsufficientStorage", str(exc)) from None
        source = next((r for r in reversed(fetcher.history) if r.digest == digest), None)
        if source is not None:
            headers[FETCHED_FROM_HEADER] = source.holder
            headers[FETCH_SOURCES_HEADER] = ",".join(source.sources) or source.holder
            headers[FETCH_SECONDS_HEADER] = f"{source.seconds:.6f}"
            if source.via is not None:
                headers[FETCHED_VIA_HEADER] = source.via
    try:
        reader = await asyncio.to_thread(store.open, digest)
    except ArtifactNotFound:
        raise ApiError(404, "NotFound", f"this node does not hold {digest}") from None
    try:
        response = web.StreamResponse(headers={**headers, "Content-Length": str(reader.size)})
        await response.prepare(request)
        try:
            while (chunk := await asyncio.to_thread(reader.next_chunk)) is not None:
                await response.write(chunk)
        except CorruptArtifact as exc:
            # Too late for an error status: cut the connection, so that the client sees a
            # short body rather than a complete one.
            log.warning("serving a blob: %s", exc)
            if request.transport is not None:
                request.transport.close()
            raise ConnectionResetError(str(exc)) from None
        await response.write_eof()
        return response
    finally:
        reader.close()


def create_app(
    store: ResourceStore,
    events: EventLog,
    *,
    token: str,
    node_name: str,
    rtt: RttEstimate | None = None,
    holders: Holders | None = None,
    proxy: NodeProxy | None = None,
    artifacts: ArtifactStore | None = None,
    fetcher: ArtifactFetcher | None = None,
    instances: Callable[[], InstanceHost | None] | None = None,
    telemetry: Callable[[NodeTelemetry | None], NodeTelemetry] | None = None,
) -> web.Application:
    """The aiohttp application serving ``docs/api.md`` for one node.

    ``instances`` returns the node's instance host (None until it has one) for the logs and
    usage routes; ``telemetry`` samples the machine (psutil by default) for ``nodes/NAME/usage``.
    """
    # Imported here: the observe routes build on this module's keys and helpers.
    from pollen.api.observe import NodeSampler, add_routes

    if not token:
        raise ValueError("the API needs a non-empty bearer token")
    app = web.Application(middlewares=[_errors, _auth], client_max_size=MAX_BODY_BYTES)
    app[STORE_KEY] = store
    app[EVENTS_KEY] = events
    app[TOKEN_KEY] = token
    app[NODE_NAME_KEY] = node_name
    app[RTT_KEY] = rtt or (lambda _name: None)
    app[HOLDERS_KEY] = holders or (lambda _digest: [])
    app[PROXY_KEY] = proxy
    app[ARTIFACTS_KEY] = artifacts
    app[FETCHER_KEY] = fetcher
    add_routes(
        app,
        instances=instances,
        sampler=NodeSampler(telemetry) if telemetry is not None else None,
    )
    app.router.add_get("/healthz", _healthz)
    app.router.add_get(f"{PREFIX}/events", _events)
    app.router.add_post(f"{PREFIX}/apply", _apply)
    # Before {plural}: "blobs" is not a resource kind.
    app.router.add_get(f"{PREFIX}/blobs", _list_blobs)
    app.router.add_get(f"{PREFIX}/blobs/{{digest}}", _get_blob, allow_head=False)
    app.router.add_head(f"{PREFIX}/blobs/{{digest}}", _head_blob)
    app.router.add_put(f"{PREFIX}/blobs/{{digest}}", _put_blob)
    app.router.add_get(f"{PREFIX}/{{plural}}", _list)
    app.router.add_get(f"{PREFIX}/{{plural}}/{{name}}", _get)
    app.router.add_delete(f"{PREFIX}/{{plural}}/{{name}}", _delete)
    app.router.add_route("*", f"{PREFIX}/nodes/{{name}}/proxy{{tail:.*}}", _proxy)
    return app
