"""A node's data directory: the cluster's root key, this node's identity and its API token.

``pollen init`` creates it; ``pollen node`` reads it. Secrets are written 0600 and atomically, so
a crash during ``init`` never leaves a half-written key behind.

Layout of ``DATA_DIR``::

    cluster.json    {"name", "rootPublicKey"}   the cluster this node belongs to
    node.json       {"name", "publicKey"}       this node
    root.key        PEM Ed25519 private key     only on the node that created the cluster
    node.key        PEM Ed25519 private key     this node's identity
    ca.crt          PEM X.509                   the cluster's CA, self-signed by the root key
    node.crt        PEM X.509                   this node's certificate, signed by the root key
    api-token       bearer token of the node's HTTP API
    state/          the state document (see pollen.state)

``pollen init`` writes all of it; a node that joins with a token (see ``pollen.mesh.tokens``)
gets the same layout without ``root.key``. Certificates are described in ``pollen.mesh.pki``.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pollen.mesh import pki

CLUSTER_FILE = "cluster.json"
NODE_FILE = "node.json"
ROOT_KEY_FILE = "root.key"
NODE_KEY_FILE = "node.key"
API_TOKEN_FILE = "api-token"
CA_CERT_FILE = "ca.crt"
NODE_CERT_FILE = "node.crt"
STATE_DIR = "state"
# A node holding the root key renews its own certificate when less than this is left.
RENEW_BEFORE = timedelta(days=30)

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
    root_public_key: str = ""  # base64 of the cluster's raw Ed25519 root public key

    @property
    def state_dir(self) -> Path:
        return self.data_dir / STATE_DIR

    @property
    def can_admit(self) -> bool:
        """Whether this node holds the root key, and so can mint tokens and admit nodes."""
        return (self.data_dir / ROOT_KEY_FILE).exists()


@dataclass(frozen=True)
class NodeCredentials:
    """The key material the mesh transport needs: this node's key and certificates.

    ``root_key`` is set only on nodes that can admit others.
    """

    cluster_name: str
    node_name: str
    node_key: Ed25519PrivateKey
    certificate: x509.Certificate
    ca_certificate: x509.Certificate
    root_key: Ed25519PrivateKey | None = None


def default_node_name() -> str:
    """The host name, lowercased and reduced to a valid object name."""
    name = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-")[:63]
    return name if _NAME_RE.fullmatch(name) else "node"


def check_name(name: str, what: str) -> str:
    if not _NAME_RE.fullmatch(name):
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


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _refuse_initialised(data_dir: Path) -> None:
    if (data_dir / NODE_FILE).exists():
        raise IdentityError(f"{data_dir} already holds a node; use another --data-dir")


def init_data_dir(
    data_dir: Path, *, cluster_name: str, node_name: str, now: datetime | None = None
) -> NodeIdentity:
    """Create a new cluster in ``data_dir``: root key, CA, node key and certificate, API token.

    Refuses a directory that already holds a node, so that ``init`` never overwrites keys.
    """
    check_name(cluster_name, "cluster name")
    check_name(node_name, "node name")
    _refuse_initialised(data_dir)
    now = now or _utcnow()
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / STATE_DIR).mkdir(exist_ok=True)
    root_key = Ed25519PrivateKey.generate()
    node_key = Ed25519PrivateKey.generate()
    ca_cert = pki.create_ca_certificate(root_key, cluster_name, now)
    node_cert = pki.issue_node_certificate(root_key, ca_cert, node_name, node_key.public_key(), now)
    token = secrets.token_urlsafe(32)
    _write_secret(data_dir / ROOT_KEY_FILE, _pem(root_key))
    _write_secret(data_dir / NODE_KEY_FILE, _pem(node_key))
    _write_secret(data_dir / CA_CERT_FILE, pki.certificate_pem(ca_cert))
    _write_secret(data_dir / NODE_CERT_FILE, pki.certificate_pem(node_cert))
    _write_secret(data_dir / API_TOKEN_FILE, token.encode() + b"\n")
    cluster = {"name": cluster_name, "rootPublicKey": _public_b64(root_key)}
    _write_secret(data_dir / CLUSTER_FILE, orjson.dumps(cluster, option=orjson.OPT_INDENT_2))
    # node.json last: its presence marks a complete data directory.
    node = {"name": node_name, "publicKey": _public_b64(node_key)}
    _write_secret(data_dir / NODE_FILE, orjson.dumps(node, option=orjson.OPT_INDENT_2))
    return load_identity(data_dir)


def init_joined_data_dir(
    data_dir: Path,
    *,
    node_key: Ed25519PrivateKey,
    certificate: x509.Certificate,
    ca_certificate: x509.Certificate,
    now: datetime | None = None,
) -> NodeIdentity:
    """Write the data directory of a node that enrolled into an existing cluster.

    The certificate must be a current node certificate of ``ca_certificate``'s cluster for
    ``node_key``; the node's and cluster's names come from the certificates. There is no root
    key. Refuses a directory that already holds a node. Everything is checked before the first
    byte is written.
    """
    now = now or _utcnow()
    try:
        cluster_name = pki.verify_ca_certificate(ca_certificate, now)
        node_name = pki.verify_node_certificate(certificate, ca_certificate, now)
    except pki.CertificateError as exc:
        raise IdentityError(f"the enrolment returned an unusable certificate: {exc}") from exc
    if _public_b64_of(certificate) != _public_b64(node_key):
        raise IdentityError("the enrolment returned a certificate for another key")
    _refuse_initialised(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / STATE_DIR).mkdir(exist_ok=True)
    token = secrets.token_urlsafe(32)
    _write_secret(data_dir / NODE_KEY_FILE, _pem(node_key))
    _write_secret(data_dir / CA_CERT_FILE, pki.certificate_pem(ca_certificate))
    _write_secret(data_dir / NODE_CERT_FILE, pki.certificate_pem(certificate))
    _write_secret(data_dir / API_TOKEN_FILE, token.encode() + b"\n")
    cluster = {"name": cluster_name, "rootPublicKey": _public_b64_of(ca_certificate)}
    _write_secret(data_dir / CLUSTER_FILE, orjson.dumps(cluster, option=orjson.OPT_INDENT_2))
    node = {"name": node_name, "publicKey": _public_b64(node_key)}
    _write_secret(data_dir / NODE_FILE, orjson.dumps(node, option=orjson.OPT_INDENT_2))
    return load_identity(data_dir)


def _public_b64_of(certificate: x509.Certificate) -> str:
    key = certificate.public_key()
    if not isinstance(key, Ed25519PublicKey):
        return ""
    return pki.public_key_b64(key)


def _read_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise IdentityError(f"{path} is missing") from exc
    except ValueError as exc:
        raise IdentityError(f"{path} is not a PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path} is not an Ed25519 key")
    return key


def _read_certificate(path: Path) -> x509.Certificate:
    try:
        return pki.load_certificate(path.read_bytes())
    except FileNotFoundError as exc:
        raise IdentityError(f"{path} is missing") from exc
    except pki.CertificateError as exc:
        raise IdentityError(f"{path}: {exc}") from exc


def load_root_key(data_dir: Path) -> Ed25519PrivateKey:
    """The cluster's root key, present only on nodes that can admit others."""
    if not (data_dir / ROOT_KEY_FILE).exists():
        raise IdentityError(
            f"{data_dir} holds no root key: only a node that holds the cluster's root key "
            "can create join tokens"
        )
    return _read_private_key(data_dir / ROOT_KEY_FILE)


def load_credentials(data_dir: Path, now: datetime | None = None) -> NodeCredentials:
    """This node's keys and certificates, checked against each other.

    A node holding the root key (re)issues what is missing, expired or close to expiry: its CA
    certificate and node certificate (data directories made before certificates existed get
    them this way). Any other node must enrol again once its certificate expires.
    """
    now = now or _utcnow()
    identity = load_identity(data_dir)
    node_key = _read_private_key(data_dir / NODE_KEY_FILE)
    root_key = (
        _read_private_key(data_dir / ROOT_KEY_FILE) if (data_dir / ROOT_KEY_FILE).exists() else None
    )
    if root_key is not None and identity.root_public_key not in ("", _public_b64(root_key)):
        raise IdentityError(f"{data_dir / ROOT_KEY_FILE} does not match {CLUSTER_FILE}")
    ca_path, cert_path = data_dir / CA_CERT_FILE, data_dir / NODE_CERT_FILE
    if root_key is not None and not ca_path.exists():
        ca = pki.create_ca_certificate(root_key, identity.cluster_name, now)
        _write_secret(ca_path, pki.certificate_pem(ca))
    ca = _read_certificate(ca_path)
    try:
        cluster = pki.verify_ca_certificate(ca, now)
    except pki.CertificateError as exc:
        raise IdentityError(f"{ca_path}: {exc}") from exc
    if cluster != identity.cluster_name or (
        identity.root_public_key and _public_b64_of(ca) != identity.root_public_key
    ):
        raise IdentityError(f"{ca_path} does not belong to cluster {identity.cluster_name!r}")
    if root_key is not None and _needs_certificate(cert_path, ca, node_key, identity, now):
        cert = pki.issue_node_certificate(
            root_key, ca, identity.node_name, node_key.public_key(), now
        )
        _write_secret(cert_path, pki.certificate_pem(cert))
    cert = _read_certificate(cert_path)
    try:
        name = pki.verify_node_certificate(cert, ca, now)
    except pki.CertificateError as exc:
        raise IdentityError(
            f"{cert_path}: {exc}; enrol this node again with a new join token"
        ) from exc
    if name != identity.node_name or _public_b64_of(cert) != _public_b64(node_key):
        raise IdentityError(f"{cert_path} was not issued to this node's name and key")
    return NodeCredentials(
        cluster_name=identity.cluster_name,
        node_name=identity.node_name,
        node_key=node_key,
        certificate=cert,
        ca_certificate=ca,
        root_key=root_key,
    )


def _needs_certificate(
    path: Path,
    ca: x509.Certificate,
    node_key: Ed25519PrivateKey,
    identity: NodeIdentity,
    now: datetime,
) -> bool:
    if not path.exists():
        return True
    try:
        cert = pki.load_certificate(path.read_bytes())
        name = pki.verify_node_certificate(cert, ca, now + RENEW_BEFORE)
    except pki.CertificateError:
        return True
    return name != identity.node_name or _public_b64_of(cert) != _public_b64(node_key)


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
    root_public_key = cluster.get("rootPublicKey")
    return NodeIdentity(
        data_dir=data_dir,
        cluster_name=cluster_name,
        node_name=name,
        api_token=token,
        public_key=public_key if isinstance(public_key, str) else "",
        root_public_key=root_public_key if isinstance(root_public_key, str) else "",
    )
