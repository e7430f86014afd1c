"""Join tokens, and the enrolment exchange that spends one for a node certificate.

A **join token** is a bearer credential minted by a node that holds the cluster's root key
(``pollen token create``). It is compact text::

    pollen1.<base64url(payload JSON)>.<base64url(Ed25519 signature)>

The payload names the cluster, carries the root public key (so a joining node can tell a real
member from an impostor before showing anyone its token), the addresses to dial, an expiry and a
random id. The signature is made by the root key over a domain-separated copy of the payload.
A token id is spent once: the admitting node records used ids (in its state document) and
:func:`verify_token` asks ``used(token_id)``.

**Enrolment** happens on a QUIC connection with its own ALPN (see ``transport.py``); this
module holds its messages and the admitting side's decision, without any I/O:

1. the admitting node sends a :func:`challenge <encode_challenge>` (a fresh 32-byte nonce);
2. the joiner answers with an :class:`EnrolRequest`: the token, the name it wants, its new
   Ed25519 public key and a signature by that key over the nonce, the token and the name
   (proof of possession, bound to this connection's nonce so it cannot be replayed);
3. :meth:`Admitter.admit` checks all of it and issues a node certificate; the answer carries
   the certificate and the CA certificate, or one sentence saying why not.

Only nodes holding ``root.key`` can admit (ADR 0004 explains why no intermediate CAs).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from pollen.mesh import pki

TOKEN_PREFIX = "pollen1."
TOKEN_VERSION = 1
MAX_TOKEN_LENGTH = 4096
MAX_ADDRESSES = 16
MAX_TTL = timedelta(days=365)
# Domain separation: a root-key signature over a token can never pass for any other signature.
_TOKEN_SIGNING_CONTEXT = b"pollen join token v1\x00"
_ENROL_SIGNING_CONTEXT = b"pollen enrolment v1\x00"

NONCE_BYTES = 32
MAX_ENROL_MESSAGE = 8 * 1024
"""Largest enrolment message either side accepts (a request is about 600 bytes)."""

_B64URL_RE = re.compile(r"^[A-Za-z0-9_-]+\Z")
_TOKEN_ID_RE = re.compile(r"^[0-9a-f]{32}\Z")
_HOST_RE = re.compile(r"^[A-Za-z0-9._-]{1,253}\Z")
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")


class EnrolmentError(Exception):
    """Enrolment failed; the message is one sentence for the operator."""


class TokenError(EnrolmentError):
    """A join token is malformed, forged, expired, for another cluster, or already used."""


@dataclass(frozen=True)
class TokenClaims:
    """What a verified join token says."""

    token_id: str
    cluster: str
    root_public_key: str  # standard base64 of the raw key, as in cluster.json
    addresses: tuple[tuple[str, int], ...]
    expires_at: datetime

    @property
    def root_key(self) -> Ed25519PublicKey:
        """The root public key as a key object."""
        return pki.load_public_key_b64(self.root_public_key)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str, what: str) -> bytes:
    if not _B64URL_RE.match(text):
        raise TokenError(f"the join token is malformed ({what} is not base64url)")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise TokenError(f"the join token is malformed ({what} is not base64url)") from exc


def format_address(host: str, port: int) -> str:
    """``host:port``, with brackets around IPv6 literals."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` into its parts; ``ValueError`` with a reason otherwise."""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        host_ok = bool(re.fullmatch(r"[0-9A-Fa-f:.]{2,45}", host))
    else:
        host_ok = bool(_HOST_RE.match(host))
    if not sep or not host_ok or not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"{text[:80]!r} is not host:port")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"{text[:80]!r} has no valid port")
    return host, port


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def create_token(
    root_key: Ed25519PrivateKey,
    *,
    cluster: str,
    addresses: Sequence[tuple[str, int]],
    ttl: timedelta,
    now: datetime,
) -> str:
    """Mint a join token signed by ``root_key`` for ``cluster``.

    ``addresses`` are where the joiner dials, in order of preference; they should be nodes that
    hold the root key, as only those can admit. The root public key carried in the token is the
    one of ``root_key``, so it can never disagree with the signature.
    """
    if not _NAME_RE.match(cluster):
        raise ValueError(f"cluster name {cluster!r} is not valid")
    if not timedelta(0) < ttl <= MAX_TTL:
        raise ValueError(f"a token's time to live must be positive and at most {MAX_TTL.days} days")
    if not 0 < len(addresses) <= MAX_ADDRESSES:
        raise ValueError(f"a token carries between 1 and {MAX_ADDRESSES} addresses")
    texts = [format_address(host, port) for host, port in addresses]
    for text in texts:
        parse_address(text)  # refuse now what verify_token would refuse later
    payload = orjson.dumps(
        {
            "v": TOKEN_VERSION,
            "id": secrets.token_hex(16),
            "c": cluster,
            "k": pki.public_key_b64(root_key.public_key()),
            "a": texts,
            "exp": int((now + ttl).timestamp()),
        },
        option=orjson.OPT_SORT_KEYS,
    )
    signature = root_key.sign(_TOKEN_SIGNING_CONTEXT + payload)
    token = f"{TOKEN_PREFIX}{_b64url(payload)}.{_b64url(signature)}"
    if len(token) > MAX_TOKEN_LENGTH:
        raise ValueError("the token would be too long; give fewer or shorter addresses")
    return token


def _parse_claims(payload: bytes) -> TokenClaims:
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise TokenError("the join token is malformed (its payload is not JSON)") from exc
    if not isinstance(data, dict) or set(data) != {"v", "id", "c", "k", "a", "exp"}:
        raise TokenError("the join token is malformed (unexpected payload fields)")
    version, token_id, cluster = data["v"], data["id"], data["c"]
    key, addresses, expiry = data["k"], data["a"], data["exp"]
    if type(version) is not int or version != TOKEN_VERSION:
        raise TokenError("the join token has an unsupported version")
    if not isinstance(token_id, str) or not _TOKEN_ID_RE.match(token_id):
        raise TokenError("the join token is malformed (bad id)")
    if not isinstance(cluster, str) or not _NAME_RE.match(cluster):
        raise TokenError("the join token is malformed (bad cluster name)")
    if type(expiry) is not int or not 0 < expiry < 2**40:
        raise TokenError("the join token is malformed (bad expiry)")
    if (
        not isinstance(addresses, list)
        or not 0 < len(addresses) <= MAX_ADDRESSES
        or not all(isinstance(a, str) for a in addresses)
    ):
        raise TokenError("the join token is malformed (bad addresses)")
    try:
        parsed = tuple(parse_address(a) for a in addresses)
    except ValueError as exc:
        raise TokenError(f"the join token is malformed ({exc})") from exc
    if not isinstance(key, str):
        raise TokenError("the join token is malformed (bad root key)")
    try:
        pki.load_public_key_b64(key)
    except ValueError as exc:
        raise TokenError("the join token is malformed (bad root key)") from exc
    return TokenClaims(
        token_id=token_id,
        cluster=cluster,
        root_public_key=key,
        addresses=parsed,
        expires_at=datetime.fromtimestamp(expiry, UTC),
    )


def verify_token(
    token: str,
    now: datetime,
    expected_root_public_key: Ed25519PublicKey | None = None,
    *,
    expected_cluster: str | None = None,
    used: Callable[[str], bool] | None = None,
) -> TokenClaims:
    """Check a join token and return its claims, or raise :class:`TokenError`.

    Checks, in order: its shape; that the root key it carries signed it (else it is forged);
    with ``expected_root_public_key`` or ``expected_cluster``, that it is this cluster's
    (the admitting side passes both; a joiner has only the token); that it has not expired;
    with ``used``, that its id was not spent before. Surrounding whitespace is ignored.
    """
    if not isinstance(token, str):
        raise TokenError("the join token is malformed (it is not text)")
    token = token.strip()
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenError("the join token is malformed (it is too long)")
    if not token.startswith(TOKEN_PREFIX):
        raise TokenError(f"the join token is malformed (it does not start with {TOKEN_PREFIX!r})")
    parts = token[len(TOKEN_PREFIX) :].split(".")
    if len(parts) != 2:
        raise TokenError("the join token is malformed (it needs a payload and a signature)")
    payload = _unb64url(parts[0], "the payload")
    signature = _unb64url(parts[1], "the signature")
    claims = _parse_claims(payload)
    if len(signature) != 64:
        raise TokenError("the join token's signature is invalid: it is forged or damaged")
    try:
        claims.root_key.verify(signature, _TOKEN_SIGNING_CONTEXT + payload)
    except InvalidSignature as exc:
        raise TokenError("the join token's signature is invalid: it is forged or damaged") from exc
    if expected_root_public_key is not None and claims.root_public_key != pki.public_key_b64(
        expected_root_public_key
    ):
        raise TokenError("the join token was issued by another cluster's root key")
    if expected_cluster is not None and claims.cluster != expected_cluster:
        raise TokenError(
            f"the join token is for cluster {claims.cluster!r}, not {expected_cluster!r}"
        )
    if now.astimezone(UTC) >= claims.expires_at:
        raise TokenError(f"the join token expired at {claims.expires_at.isoformat()}")
    if used is not None and used(claims.token_id):
        raise TokenError("the join token has already been used")
    return claims


# --- enrolment messages -------------------------------------------------------------------


def _decode_message(data: bytes, fields: set[str], what: str) -> dict[str, Any]:
    if len(data) > MAX_ENROL_MESSAGE:
        raise EnrolmentError(f"the {what} is larger than {MAX_ENROL_MESSAGE} bytes")
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise EnrolmentError(f"the {what} is not JSON") from exc
    if not isinstance(message, dict) or set(message) != fields:
        raise EnrolmentError(f"the {what} does not have the expected fields")
    for key in fields:
        if not isinstance(message[key], str):
            raise EnrolmentError(f"the {what}'s {key!r} is not text")
    return message


def _b64field(message: dict[str, Any], key: str, size: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(message[key].encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise EnrolmentError(f"the {what}'s {key!r} is not base64") from exc
    if len(raw) != size:
        raise EnrolmentError(f"the {what}'s {key!r} must be {size} bytes")
    return raw


def new_nonce() -> bytes:
    """A fresh challenge for one enrolment connection."""
    return secrets.token_bytes(NONCE_BYTES)


def encode_challenge(nonce: bytes) -> bytes:
    """The admitting node's first message."""
    return orjson.dumps({"nonce": base64.b64encode(nonce).decode()})


def decode_challenge(data: bytes) -> bytes:
    """The nonce of a challenge, or :class:`EnrolmentError`."""
    return _b64field(
        _decode_message(data, {"nonce"}, "challenge"), "nonce", NONCE_BYTES, "challenge"
    )


def _transcript(nonce: bytes, token: str, node_name: str, public_key: bytes) -> bytes:
    name = node_name.encode("utf-8")
    return b"".join(
        [
            _ENROL_SIGNING_CONTEXT,
            nonce,
            hashlib.sha256(token.encode("utf-8")).digest(),
            len(name).to_bytes(2, "big"),
            name,
            public_key,
        ]
    )


@dataclass(frozen=True)
class EnrolRequest:
    """A joiner's request: token, wanted name, new public key and proof of possessing its key."""

    token: str
    node_name: str
    public_key: bytes  # raw Ed25519, 32 bytes
    signature: bytes  # by that key over the transcript, 64 bytes

    @classmethod
    def create(
        cls, node_key: Ed25519PrivateKey, token: str, node_name: str, nonce: bytes
    ) -> EnrolRequest:
        """Sign a request for ``node_name`` with the joiner's new key, bound to ``nonce``."""
        public_key = _raw_public(node_key.public_key())
        signature = node_key.sign(_transcript(nonce, token, node_name, public_key))
        return cls(token=token, node_name=node_name, public_key=public_key, signature=signature)

    def encode(self) -> bytes:
        """The request on the wire."""
        return orjson.dumps(
            {
                "token": self.token,
                "name": self.node_name,
                "publicKey": base64.b64encode(self.public_key).decode(),
                "signature": base64.b64encode(self.signature).decode(),
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> EnrolRequest:
        """Parse a request, or :class:`EnrolmentError`; nothing is verified yet."""
        what = "enrolment request"
        message = _decode_message(data, {"token", "name", "publicKey", "signature"}, what)
        return cls(
            token=message["token"],
            node_name=message["name"],
            public_key=_b64field(message, "publicKey", 32, what),
            signature=_b64field(message, "signature", 64, what),
        )

    def verify_possession(self, nonce: bytes) -> Ed25519PublicKey:
        """The request's public key, if it signed this request for ``nonce``."""
        try:
            key = Ed25519PublicKey.from_public_bytes(self.public_key)
            key.verify(
                self.signature, _transcript(nonce, self.token, self.node_name, self.public_key)
            )
        except (InvalidSignature, ValueError) as exc:
            raise EnrolmentError(
                "the enrolment request is not signed by the key it asks a certificate for"
            ) from exc
        return key


@dataclass(frozen=True)
class EnrolGrant:
    """What a successful enrolment hands back."""

    certificate: x509.Certificate
    ca_certificate: x509.Certificate


def encode_grant(grant: EnrolGrant) -> bytes:
    """The admitting node's answer when it admits."""
    return orjson.dumps(
        {
            "certificate": pki.certificate_pem(grant.certificate).decode(),
            "ca": pki.certificate_pem(grant.ca_certificate).decode(),
        }
    )


def encode_refusal(reason: str) -> bytes:
    """The admitting node's answer when it refuses: one sentence, kept short."""
    return orjson.dumps({"error": reason[:400]})


def decode_answer(data: bytes) -> EnrolGrant:
    """The grant in an answer, or :class:`EnrolmentError` carrying the refusal's sentence.

    The certificates are only parsed here; the joiner checks them against its token.
    """
    if len(data) > MAX_ENROL_MESSAGE:
        raise EnrolmentError(
            f"the admitting node's answer is larger than {MAX_ENROL_MESSAGE} bytes"
        )
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise EnrolmentError("the admitting node's answer is not JSON") from exc
    if isinstance(message, dict) and set(message) == {"error"}:
        error = message["error"]
        reason = error[:400] if isinstance(error, str) else "no reason given"
        raise EnrolmentError(f"the admitting node refused: {reason}")
    message = _decode_message(data, {"certificate", "ca"}, "admitting node's answer")
    try:
        return EnrolGrant(
            certificate=pki.load_certificate(message["certificate"].encode("ascii")),
            ca_certificate=pki.load_certificate(message["ca"].encode("ascii")),
        )
    except (pki.CertificateError, UnicodeEncodeError) as exc:
        raise EnrolmentError("the admitting node's answer holds no valid certificate") from exc


class Admitter:
    """The admitting side of enrolment: the only code that spends tokens and signs certificates.

    ``used(token_id)`` says whether a token was spent; ``on_admitted(claims, name, cert)`` must
    record the spending durably (and may create the Node resource) before the certificate leaves
    this node, so it is called after every check and before the grant is returned; if it raises,
    the enrolment is refused. ``name_taken(name)`` refuses names of existing nodes.

    Checking ``used`` and calling ``on_admitted`` happen in one synchronous call, so on one
    event loop the same token cannot be spent twice. Two admitting nodes could each accept the
    same token before hearing of the other: that window is why tokens are short-lived.
    """

    def __init__(
        self,
        root_key: Ed25519PrivateKey,
        ca_certificate: x509.Certificate,
        *,
        used: Callable[[str], bool],
        on_admitted: Callable[[TokenClaims, pki.NodeName, x509.Certificate], None],
        name_taken: Callable[[str], bool] | None = None,
        validity: timedelta = pki.NODE_VALIDITY,
    ) -> None:
        self.cluster = pki.ca_cluster(ca_certificate)
        if pki.public_key_b64(root_key.public_key()) != pki.public_key_b64(
            ca_certificate.public_key()  # type: ignore[arg-type]
        ):
            raise ValueError("the CA certificate does not belong to this root key")
        self._root_key = root_key
        self._ca = ca_certificate
        self._used = used
        self._on_admitted = on_admitted
        self._name_taken = name_taken
        self._validity = validity

    def admit(self, request: EnrolRequest, nonce: bytes, now: datetime) -> EnrolGrant:
        """Check ``request`` made on the connection that was challenged with ``nonce``.

        Raises :class:`TokenError` or :class:`EnrolmentError` (one sentence each); nothing is
        recorded then.
        """
        claims = verify_token(
            request.token,
            now,
            self._root_key.public_key(),
            expected_cluster=self.cluster,
            used=self._used,
        )
        if not _NAME_RE.match(request.node_name):
            raise EnrolmentError(
                f"node name {request.node_name[:80]!r} is not valid: use a-z, 0-9 and '-', "
                "at most 63 characters"
            )
        public_key = request.verify_possession(nonce)
        if self._name_taken is not None and self._name_taken(request.node_name):
            raise EnrolmentError(
                f"a node named {request.node_name!r} already exists; delete it or pick another name"
            )
        certificate = pki.issue_node_certificate(
            self._root_key, self._ca, request.node_name, public_key, now, self._validity
        )
        try:
            self._on_admitted(claims, request.node_name, certificate)
        except Exception as exc:
            raise EnrolmentError("the admitting node could not record the admission") from exc
        return EnrolGrant(certificate=certificate, ca_certificate=self._ca)
