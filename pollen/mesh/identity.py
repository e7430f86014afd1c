"""A node's data directory: the cluster's root key, this node's identity and its API token.

``pollen init`` creates it; ``pollen node`` reads it. Secrets are written 0600 and atomically, so
a crash during ``init`` never leaves a half-written key behind.

Layout of ``DATA_DIR``::

    cluster.json    {"name", "rootPublicKey"}   the cluster this node belongs to
    node.json       {"name", "publicKey"}       this node
    root.key        PEM Ed25519 private key     only on the node that created the cluster
    node.key        PEM Ed25519 private key     this node's identity
    api-token       bearer token of the node's HTTP API
    state/          the state document (see pollen.state)
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

CLUSTER_FILE = "cluster.json"
NODE_FILE = "node.json"
ROOT_KEY_FILE = "root.key"
NODE_KEY_FILE = "node.key"
API_TOKEN_FILE = "api-token"
STATE_DIR = "state"

_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class IdentityError(Exception):
    """The data directory is missing, incomplete or already initialised."""


@dataclass(frozen=True)
class NodeIdentity:
    """What a node knows about itself from its data directory."""

    data_dir: Path
    cluster_name: str
    node_name: str
    api_token: str
    public_key: str  # base64 of the raw Ed25519 public key

    @property
    def state_dir(self) -> Path:
        return self.data_dir / STATE_DIR


def default_node_name() -> str:
    """The host name, lowercased and reduced to a valid object name."""
    name = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-")[:63]
    return name if _NAME_RE.match(name) else "node"


def check_name(name: str, what: str) -> str:
    if not _NAME_RE.match(name):
        raise IdentityError(
            f"{what} {name!r} is not valid: use a-z, 0-9 and '-', at most 63 characters, "
            "starting and ending with a letter or digit"
        )
    return name


def _write_secret(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by the owner only, never leaving a partial file."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _public_b64(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def init_data_dir(data_dir: Path, *, cluster_name: str, node_name: str) -> NodeIdentity:
    """Create a new cluster in ``data_dir``: root key, node key, API token.

    Refuses a directory that already holds a node, so that ``init`` never overwrites keys.
    """
    check_name(cluster_name, "cluster name")
    check_name(node_name, "node name")
    if (data_dir / NODE_FILE).exists():
        raise IdentityError(f"{data_dir} already holds a node; use another --data-dir")
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / STATE_DIR).mkdir(exist_ok=True)
    root_key = Ed25519PrivateKey.generate()
    node_key = Ed25519PrivateKey.generate()
    token = secrets.token_urlsafe(32)
    _write_secret(data_dir / ROOT_KEY_FILE, _pem(root_key))
    _write_secret(data_dir / NODE_KEY_FILE, _pem(node_key))
    _write_secret(data_dir / API_TOKEN_FILE, token.encode() + b"\n")
    cluster = {"name": cluster_name, "rootPublicKey": _public_b64(root_key)}
    _write_secret(data_dir / CLUSTER_FILE, orjson.dumps(cluster, option=orjson.OPT_INDENT_2))
    # node.json last: its presence marks a complete data directory.
    node = {"name": node_name, "publicKey": _public_b64(node_key)}
    _write_secret(data_dir / NODE_FILE, orjson.dumps(node, option=orjson.OPT_INDENT_2))
    return load_identity(data_dir)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError as exc:
        raise IdentityError(
            f"{path.parent} is not an initialised data directory ({path.name} is missing); "
            "run pollen init first"
        ) from exc
    except orjson.JSONDecodeError as exc:
        raise IdentityError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise IdentityError(f"{path} must hold a JSON object")
    return data


def load_identity(data_dir: Path) -> NodeIdentity:
    """Read a data directory written by :func:`init_data_dir`."""
    node = _read_json(data_dir / NODE_FILE)
    cluster = _read_json(data_dir / CLUSTER_FILE)
    try:
        token = (data_dir / API_TOKEN_FILE).read_text().strip()
    except FileNotFoundError as exc:
        raise IdentityError(f"{data_dir / API_TOKEN_FILE} is missing") from exc
    name, cluster_name, public_key = node.get("name"), cluster.get("name"), node.get("publicKey")
    if not isinstance(name, str) or not isinstance(cluster_name, str):
        raise IdentityError(f"{data_dir} has a node.json or cluster.json without a name")
    if not token:
        raise IdentityError(f"{data_dir / API_TOKEN_FILE} is empty")
    return NodeIdentity(
        data_dir=data_dir,
        cluster_name=cluster_name,
        node_name=name,
        api_token=token,
        public_key=public_key if isinstance(public_key, str) else "",
    )
