"""``pctl push``, and the pushing ``pctl apply`` does for Workloads that name a local file.

Pushing a module is two requests to the node pctl talks to: upload the bytes under their
digest (``PUT .../blobs/sha256:<hex>``, skipped when the node already holds them), then apply
an Artifact ``{digest, size}`` named after the file. The node announces what it holds in
membership gossip, and any other node that needs the module fetches it from there (ADR 0012).
With a publisher key, the Artifact carries its signer and a signature over the digest and its
manifest (ADR 0016), made here: the key never leaves the publisher's machine.

Imported only by the commands that push: it brings in pydantic through the resource models.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pollen.api.client import ApiClient
from pollen.resources.loader import STDIN_NAME, LoadedResource
from pollen.resources.models import (
    API_VERSION,
    Artifact,
    ArtifactReference,
    Workload,
    artifact_reference,
)
from pollen.resources.signing import (
    ArtifactManifest,
    SignatureError,
    load_private_key,
    sign,
    signer_id,
)
from pollen.resources.validation import InvalidResource, validate_object
from pollen.runtime.artifacts import MAX_ARTIFACT_BYTES, sha256_digest

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "WASM_MAGIC",
    "Module",
    "PushError",
    "artifact_object",
    "name_for",
    "push",
    "read_module",
    "read_sign_key",
    "resolve_paths",
    "sign_module",
    "upload",
]

#: The first four bytes of every WebAssembly module.
WASM_MAGIC = b"\0asm"


class PushError(Exception):
    """A file that cannot be pushed, or a push that failed; one sentence."""


@dataclass(frozen=True)
class Module:
    """A WebAssembly module read from a file: its bytes, their digest, the Artifact name,
    what its publisher declares of it, and the publisher's signature once signed."""

    path: Path
    data: bytes
    digest: str
    name: str
    version: str | None = None
    executor: str | None = None
    memory_mb: int | None = None
    signer: str | None = None
    signature: str | None = None

    @property
    def size(self) -> int:
        return len(self.data)


def name_for(path: Path) -> str:
    """An object name from a file name: the stem, lowercased, other characters as ``-``.

    ``Hello_World.v2.wasm`` becomes ``hello-world.v2``. Raises :class:`PushError` when
    nothing usable is left.
    """
    name = re.sub(r"[^a-z0-9.-]+", "-", path.stem.lower())
    name = re.sub(r"\.{2,}", ".", name)
    name = re.sub(r"-*\.-*", ".", name)
    name = name.strip(".-")[:253].strip(".-")
    if not name:
        raise PushError(f"{path}: cannot make an Artifact name from the file name; give --name")
    return name


def read_module(
    path: Path,
    name: str | None = None,
    *,
    version: str | None = None,
    executor: str | None = None,
    memory_mb: int | None = None,
) -> Module:
    """Read ``path`` as a module to push; refuse what no WASM executor could run.

    Refused, each with one sentence: a file that cannot be read, an empty one, one over
    :data:`~pollen.runtime.artifacts.MAX_ARTIFACT_BYTES`, one that does not start with the
    WebAssembly magic ``\\0asm``, and an Artifact name or declared field that is not valid.
    """
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size > MAX_ARTIFACT_BYTES:
                raise PushError(
                    f"{path}: {size} bytes is over the artifact limit of {MAX_ARTIFACT_BYTES}"
                )
            data = file.read(MAX_ARTIFACT_BYTES + 1)
    except IsADirectoryError:
        raise PushError(f"{path}: is a directory, not a WebAssembly module") from None
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise PushError(f"{path}: {reason}") from None
    if not data:
        raise PushError(f"{path}: the file is empty; push takes a WebAssembly module")
    if len(data) > MAX_ARTIFACT_BYTES:
        raise PushError(f"{path}: over the artifact limit of {MAX_ARTIFACT_BYTES} bytes")
    if not data.startswith(WASM_MAGIC):
        raise PushError(
            f"{path}: not a WebAssembly module (it does not start with the bytes \\0asm)"
        )
    module = Module(
        path,
        data,
        sha256_digest(data),
        name if name is not None else name_for(path),
        version=version,
        executor=executor,
        memory_mb=memory_mb,
    )
    try:
        validate_object(artifact_object(module))
    except InvalidResource as exc:
        if exc.field == "metadata.name":
            raise PushError(f"Artifact name {module.name!r}: {exc.message}") from None
        raise PushError(f"Artifact {module.name!r}: {exc}") from None
    return module


def artifact_object(module: Module) -> dict[str, Any]:
    """The Artifact resource recording ``module``."""
    spec: dict[str, Any] = {"digest": module.digest, "size": module.size}
    optional = {
        "version": module.version,
        "executor": module.executor,
        "signer": module.signer,
        "signature": module.signature,
    }
    spec.update({key: value for key, value in optional.items() if value is not None})
    if module.memory_mb is not None:
        spec["needs"] = {"memoryMB": module.memory_mb}
    return {
        "apiVersion": API_VERSION,
        "kind": "Artifact",
        "metadata": {"name": module.name},
        "spec": spec,
    }


def read_sign_key(path: Path) -> Ed25519PrivateKey:
    """A publisher key (PEM, as ``pollen key create`` writes it) from ``path``."""
    try:
        with open(path, "rb") as file:
            data = file.read(64 * 1024)
    except OSError as exc:
        raise PushError(f"{path}: {(exc.strerror or str(exc)).lower()}") from None
    try:
        return load_private_key(data)
    except SignatureError as exc:
        raise PushError(f"{path}: {exc}") from None


def sign_module(module: Module, key: Ed25519PrivateKey) -> Module:
    """``module`` signed by ``key``: the signature covers the digest and the manifest the
    Artifact states, exactly as every node reads it back (``ArtifactManifest.of``)."""
    artifact = validate_object(artifact_object(module))
    assert isinstance(artifact, Artifact)
    signature = sign(key, ArtifactManifest.of(artifact))
    return dataclasses.replace(module, signer=signer_id(key), signature=signature)


def upload(client: ApiClient, module: Module) -> None:
    """Put the module's bytes in the node's store, unless it holds them already."""
    if client.blob_size(module.digest) != module.size:
        client.put_blob(module.digest, module.data)


def push(client: ApiClient, module: Module) -> list[dict[str, Any]]:
    """Upload ``module`` and apply its Artifact; returns the apply results."""
    upload(client, module)
    return client.apply([artifact_object(module)])


def resolve_paths(
    loaded: Sequence[LoadedResource], client: ApiClient | None
) -> tuple[list[LoadedResource], list[dict[str, Any]]]:
    """Workloads whose ``spec.artifact`` is a local path, pointed at the file's digest.

    Relative paths are relative to the manifest's directory (the working directory for
    standard input). With a ``client``, each file is uploaded; without (a dry run, a diff),
    only its digest is computed. Returns the resources, rewritten where needed, and the
    Artifacts to apply with them (one per file, unless the manifests define that name).
    """
    defined = {item.resource.name for item in loaded if item.resource.kind == "Artifact"}
    modules: dict[Path, Module] = {}
    artifacts: dict[str, dict[str, Any]] = {}
    resolved: list[LoadedResource] = []
    for item in loaded:
        resource = item.resource
        if not isinstance(resource, Workload) or (
            artifact_reference(resource.spec.artifact) != ArtifactReference.PATH
        ):
            resolved.append(item)
            continue
        where = item.location
        base = Path.cwd() if where.file == STDIN_NAME else Path(where.file).parent
        path = base / Path(os.path.expanduser(resource.spec.artifact))
        module = modules.get(path.resolve())
        if module is None:
            try:
                module = read_module(path)
            except PushError as exc:
                line = f", line {where.line}" if where.line is not None else ""
                raise PushError(
                    f"{where.file}: document {where.document}{line}: spec.artifact: {exc}"
                ) from None
            if client is not None:
                upload(client, module)
            modules[path.resolve()] = module
            if module.name not in defined and module.name not in artifacts:
                artifacts[module.name] = artifact_object(module)
        spec = resource.spec.model_copy(update={"artifact": module.digest})
        resolved.append(
            dataclasses.replace(item, resource=resource.model_copy(update={"spec": spec}))
        )
    return resolved, list(artifacts.values())
