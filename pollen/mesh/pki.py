"""The cluster's X.509 certificates: one CA made from the root key, one certificate per node.

A cluster is a two-level PKI with Ed25519 everywhere:

* the **CA certificate** is self-signed by the cluster's root key (``root.key``). It names the
  cluster (``CN=pollen cluster <name>``, SAN URI ``pollen://<name>``) and lives for decades:
  replacing it means re-enrolling every node, so it is made once by ``pollen init``;
* a **node certificate** is signed by the root key for one node: ``CN=<node name>``, SAN URI
  ``pollen://<cluster>/node/<name>``, a random serial, about a year of validity, and
  ``BasicConstraints(ca=False)`` so that no node can sign certificates for others.

Both ends of every QUIC connection present a node certificate and check the other's with
:func:`verify_node_certificate`. The check does not trust anything the peer sends besides its
own certificate: the issuer is always the locally stored CA certificate, so a certificate from
another cluster fails on its signature even if its names were copied from ours, and the SAN's
cluster is compared as well so that a root key reused for two clusters still keeps them apart.

Everything here is pure (no I/O, time passed in) so tests can move the clock freely.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NodeName = str
"""A node's name, as carried in its certificate (a valid object name)."""

RevocationCheck = Callable[[NodeName, int], bool]
"""``is_revoked(node_name, serial)``: true when the node's certificate must no longer be accepted.

The node backs it with the state document (deleting a Node resource revokes it). Both the name
and the serial are given so that a revocation list can be keyed by serial: a node admitted again
under a deleted node's name gets a new serial and is not caught by the old revocation.
"""

CA_VALIDITY = timedelta(days=365 * 20)
NODE_VALIDITY = timedelta(days=365)
# Certificates start a little in the past: a peer whose clock lags ours by a few minutes must
# not see a freshly issued certificate as "not yet valid".
BACKDATE = timedelta(minutes=10)

URI_SCHEME = "pollen://"
_NAME = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_NAME_RE = re.compile(rf"^{_NAME}\Z")
_NODE_URI_RE = re.compile(rf"^pollen://(?P<cluster>{_NAME})/node/(?P<name>{_NAME})\Z")
_CLUSTER_URI_RE = re.compile(rf"^pollen://(?P<cluster>{_NAME})\Z")
# A DER certificate we issue is well under 1 KiB; anything much larger is not one of ours.
MAX_CERTIFICATE_BYTES = 16 * 1024


class CertificateError(Exception):
    """A certificate is malformed, not issued by the cluster, out of its validity or revoked.

    The message is one sentence meant for an operator's log.
    """


def cluster_uri(cluster: str) -> str:
    """The SAN URI that names a cluster in its CA certificate."""
    return f"{URI_SCHEME}{cluster}"


def node_uri(cluster: str, node_name: str) -> str:
    """The SAN URI that names a node of a cluster in its certificate."""
    return f"{URI_SCHEME}{cluster}/node/{node_name}"


def _check_name(name: str, what: str) -> None:
    if not _NAME_RE.match(name):
        raise ValueError(f"{what} {name!r} is not a valid name")


def _key_id(public_key: Ed25519PublicKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(public_key)


def create_ca_certificate(
    root_key: Ed25519PrivateKey,
    cluster: str,
    now: datetime,
    validity: timedelta = CA_VALIDITY,
) -> x509.Certificate:
    """The cluster's CA certificate, self-signed by ``root_key``."""
    _check_name(cluster, "cluster name")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pollen cluster {cluster}")])
    public_key = root_key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(cluster_uri(cluster))]),
            critical=False,
        )
        .add_extension(_key_id(public_key), critical=False)
        .sign(root_key, algorithm=None)
    )


def issue_node_certificate(
    root_key: Ed25519PrivateKey,
    ca_certificate: x509.Certificate,
    node_name: NodeName,
    node_public_key: Ed25519PublicKey,
    now: datetime,
    validity: timedelta = NODE_VALIDITY,
) -> x509.Certificate:
    """A certificate for ``node_name`` holding ``node_public_key``, signed by the root key.

    ``ca_certificate`` supplies the issuer name and cluster; it must belong to ``root_key``.
    """
    _check_name(node_name, "node name")
    if not isinstance(node_public_key, Ed25519PublicKey):
        raise ValueError("node keys must be Ed25519")
    cluster = ca_cluster(ca_certificate)
    if _raw(ca_certificate.public_key()) != _raw(root_key.public_key()):
        raise ValueError("the CA certificate does not belong to this root key")
    not_after = min(now + validity, ca_certificate.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_name)]))
        .issuer_name(ca_certificate.subject)
        .public_key(node_public_key)
        # 159 random bits: serials are how revocation tells two certificates of one name apart.
        .serial_number(secrets.randbits(159) | 1)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            # Every node is both a QUIC client and a QUIC server.
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(node_uri(cluster, node_name))]
            ),
            critical=False,
        )
        .add_extension(_key_id(node_public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
            critical=False,
        )
        .sign(root_key, algorithm=None)
    )


def _raw(public_key: object) -> bytes:
    if not isinstance(public_key, Ed25519PublicKey):
        return b""
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_certificate(data: bytes | x509.Certificate) -> x509.Certificate:
    """A certificate from DER or PEM bytes (or the certificate itself), or ``CertificateError``."""
    if isinstance(data, x509.Certificate):
        return data
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CertificateError("a certificate must be given as DER or PEM bytes")
    raw = bytes(data)
    if len(raw) > MAX_CERTIFICATE_BYTES:
        raise CertificateError(f"the certificate is larger than {MAX_CERTIFICATE_BYTES} bytes")
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(raw)
        return x509.load_der_x509_certificate(raw)
    except ValueError as exc:
        raise CertificateError("the certificate cannot be parsed") from exc


def certificate_pem(certificate: x509.Certificate) -> bytes:
    """The PEM encoding of a certificate."""
    return certificate.public_bytes(serialization.Encoding.PEM)


def certificate_der(certificate: x509.Certificate) -> bytes:
    """The DER encoding of a certificate."""
    return certificate.public_bytes(serialization.Encoding.DER)


def public_key_b64(public_key: Ed25519PublicKey) -> str:
    """Standard base64 of a raw 32-byte Ed25519 public key (the form ``cluster.json`` uses)."""
    return base64.b64encode(_raw(public_key)).decode()


def load_public_key_b64(text: str) -> Ed25519PublicKey:
    """The inverse of :func:`public_key_b64`; ``ValueError`` if it is not a 32-byte key."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError("the public key is not base64") from exc
    if len(raw) != 32:
        raise ValueError("an Ed25519 public key has 32 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def _uris(certificate: x509.Certificate) -> list[str]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(uri) for uri in san.value.get_values_for_type(x509.UniformResourceIdentifier)]


def _basic_constraints(certificate: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def ca_cluster(ca_certificate: x509.Certificate) -> str:
    """The cluster name a CA certificate carries in its SAN, or ``CertificateError``."""
    try:
        uris = _uris(ca_certificate)
    except ValueError as exc:
        raise CertificateError("the CA certificate has malformed extensions") from exc
    clusters = [m["cluster"] for m in map(_CLUSTER_URI_RE.match, uris) if m]
    if len(clusters) != 1:
        raise CertificateError("the CA certificate does not name exactly one pollen cluster")
    return clusters[0]


def _check_validity(certificate: x509.Certificate, now: datetime, what: str) -> None:
    if now < certificate.not_valid_before_utc:
        raise CertificateError(f"the {what} is not valid before {certificate.not_valid_before_utc}")
    if now > certificate.not_valid_after_utc:
        raise CertificateError(f"the {what} expired on {certificate.not_valid_after_utc}")


def verify_ca_certificate(
    ca_certificate: x509.Certificate,
    now: datetime,
    root_public_key: Ed25519PublicKey | None = None,
) -> str:
    """Check a CA certificate (self-signed, a CA, in its validity) and return its cluster.

    With ``root_public_key``, the CA must also hold exactly that key: this is how a joining node
    ties the CA certificate it receives to the root key its join token carries.
    """
    public_key = ca_certificate.public_key()
    if not isinstance(public_key, Ed25519PublicKey):
        raise CertificateError("the CA certificate does not hold an Ed25519 key")
    if root_public_key is not None and _raw(public_key) != _raw(root_public_key):
        raise CertificateError("the CA certificate does not hold the cluster's root key")
    try:
        ca_certificate.verify_directly_issued_by(ca_certificate)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CertificateError("the CA certificate is not self-signed by its key") from exc
    constraints = _basic_constraints(ca_certificate)
    if constraints is None or not constraints.ca:
        raise CertificateError("the CA certificate is not marked as a certificate authority")
    _check_validity(ca_certificate, _utc(now), "CA certificate")
    return ca_cluster(ca_certificate)


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    return now.astimezone(UTC)


def verify_node_certificate(
    certificate: bytes | x509.Certificate,
    ca_certificate: x509.Certificate,
    now: datetime,
    is_revoked: RevocationCheck | None = None,
) -> NodeName:
    """Check that ``certificate`` is a current node certificate of the CA's cluster; its name.

    Checks, in order: it parses; it is signed by ``ca_certificate``'s key with a matching issuer
    name; ``now`` is within its validity; it is not a CA; its key is Ed25519; its SAN names the
    CA's cluster and a node whose name equals the subject CN; ``is_revoked`` (if given) says no.
    Raises :class:`CertificateError` with one sentence otherwise.

    The CA certificate is trusted as given (it comes from the local data directory) but must
    still be a CA that names a cluster.
    """
    cert = load_certificate(certificate)
    now = _utc(now)
    cluster = ca_cluster(ca_certificate)
    constraints = _basic_constraints(ca_certificate)
    if constraints is None or not constraints.ca:
        raise CertificateError("the CA certificate is not marked as a certificate authority")
    try:
        cert.verify_directly_issued_by(ca_certificate)
    except (ValueError, TypeError, InvalidSignature) as exc:
        # ValueError: issuer name differs; TypeError: unsupported key; InvalidSignature: forged.
        raise CertificateError(f"the certificate was not issued by cluster {cluster!r}") from exc
    return _check_node_fields(cert, cluster, now, is_revoked)


def verify_node_certificate_with_key(
    certificate: bytes | x509.Certificate,
    root_public_key: Ed25519PublicKey,
    cluster: str,
    now: datetime,
) -> NodeName:
    """Like :func:`verify_node_certificate`, with only the root public key and cluster name.

    A joining node has no CA certificate yet, only what its join token says. It uses this to make
    sure the node it is about to hand its token to really belongs to the cluster.
    """
    cert = load_certificate(certificate)
    try:
        root_public_key.verify(cert.signature, cert.tbs_certificate_bytes)
    except InvalidSignature as exc:
        raise CertificateError(f"the certificate was not issued by cluster {cluster!r}") from exc
    return _check_node_fields(cert, cluster, _utc(now), None)


def _check_node_fields(
    cert: x509.Certificate,
    cluster: str,
    now: datetime,
    is_revoked: RevocationCheck | None,
) -> NodeName:
    _check_validity(cert, now, "certificate")
    try:
        constraints = _basic_constraints(cert)
        uris = _uris(cert)
        common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError as exc:
        raise CertificateError("the certificate has malformed extensions") from exc
    if constraints is None or constraints.ca:
        raise CertificateError("the certificate is not a node certificate (it is a CA)")
    if not isinstance(cert.public_key(), Ed25519PublicKey):
        raise CertificateError("the certificate does not hold an Ed25519 key")
    matches = [m for m in map(_NODE_URI_RE.match, uris) if m]
    if len(matches) != 1:
        raise CertificateError("the certificate does not name exactly one pollen node")
    if matches[0]["cluster"] != cluster:
        raise CertificateError(
            f"the certificate belongs to cluster {matches[0]['cluster']!r}, not {cluster!r}"
        )
    name = matches[0]["name"]
    if len(common_names) != 1 or common_names[0].value != name:
        raise CertificateError("the certificate's common name differs from its node name")
    if is_revoked is not None and is_revoked(name, cert.serial_number):
        raise CertificateError(f"node {name!r} has been revoked")
    return name
