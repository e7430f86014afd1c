"""Artifact signatures, publisher keys, and the trust policy's verdict on an artifact.

A publisher signs an artifact the way a package is signed: one Ed25519 signature over the
module's digest and its manifest (name, size, media type, version, executor, declared needs).
Changing any of them, or the bytes, breaks the signature. What is signed is::

    b"pollen-artifact-v1\\n" + canonical JSON of
    {"digest", "executor", "mediaType", "memoryMB", "name", "size", "version"}

The canonical JSON has every one of those keys (``null`` for a field not given, so that a field
left out and a field added cannot be confused), keys sorted, no whitespace, UTF-8, strings
escaped only where JSON requires it: for strings, integers and ``null`` this is RFC 8785's
canonical form, so another language can produce the same bytes. The prefix keeps a signature
over an artifact from ever passing for a signature over anything else (join tokens, say); a
future change of fields gets a new prefix rather than a silently different meaning.

A signer is named by its public key itself, ``ed25519:`` and the standard base64 of the raw
32 bytes (``SIGNER_RE``): an Artifact carries what verifies it, and a trust policy lists keys,
not names that would need a registry. Private keys are PKCS#8 PEM files, as the node's own keys.

Everything here is pure (no I/O besides parsing bytes it is given).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from pollen.resources.models import (
    DIGEST_RE,
    SIGNER_RE,
    Artifact,
    TrustPolicySpec,
)

__all__ = [
    "SIGNATURE_DOMAIN",
    "SIGNER_PREFIX",
    "ArtifactManifest",
    "SignatureError",
    "Verdict",
    "evaluate",
    "generate_key",
    "load_private_key",
    "parse_signer",
    "private_key_pem",
    "sign",
    "signed_payload",
    "signer_id",
    "verify",
    "verify_artifact",
]

#: What every signed payload starts with: the purpose and the version of the format.
SIGNATURE_DOMAIN: Final = b"pollen-artifact-v1\n"
SIGNER_PREFIX: Final = "ed25519:"
_SIGNATURE_BYTES: Final = 64
# A PEM Ed25519 private key is about 120 bytes; anything far larger is not one.
_MAX_KEY_FILE_BYTES: Final = 16 * 1024


class SignatureError(ValueError):
    """A key, a signer or a signature that is malformed or does not verify; one sentence."""


@dataclass(frozen=True)
class ArtifactManifest:
    """What a publisher's signature covers: the digest and the artifact's manifest fields."""

    name: str
    digest: str
    size: int
    media_type: str = "application/wasm"
    version: str | None = None
    executor: str | None = None
    memory_mb: int | None = None

    @classmethod
    def of(cls, artifact: Artifact) -> ArtifactManifest:
        """The manifest an Artifact states (its name is ``metadata.name``)."""
        spec = artifact.spec
        return cls(
            name=artifact.metadata.name,
            digest=spec.digest,
            size=spec.size,
            media_type=spec.media_type,
            version=spec.version,
            executor=None if spec.executor is None else spec.executor.value,
            memory_mb=None if spec.needs is None else spec.needs.memory_mb,
        )


def signed_payload(manifest: ArtifactManifest) -> bytes:
    """The exact bytes a signature is made over (see the module's description)."""
    if not DIGEST_RE.fullmatch(manifest.digest):
        raise SignatureError("the digest must be sha256: followed by 64 lowercase hex digits")
    body = {
        "digest": manifest.digest,
        "executor": manifest.executor,
        "mediaType": manifest.media_type,
        "memoryMB": manifest.memory_mb,
        "name": manifest.name,
        "size": manifest.size,
        "version": manifest.version,
    }
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    try:
        return SIGNATURE_DOMAIN + text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no UTF-8 spelling, so nothing to sign
        raise SignatureError("the manifest holds text that is not valid Unicode") from None


# --- keys -------------------------------------------------------------------------------------


def signer_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """``ed25519:<base64 of the raw public key>``: how Artifacts and policies name a signer."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return SIGNER_PREFIX + base64.b64encode(raw).decode("ascii")


def parse_signer(signer: str) -> Ed25519PublicKey:
    """The public key a signer id names; :class:`SignatureError` if it is not one."""
    if not SIGNER_RE.fullmatch(signer):
        raise SignatureError(
            f"signer {signer[:80]!r} is not ed25519: followed by the base64 of a 32-byte key"
        )
    raw = base64.b64decode(signer.removeprefix(SIGNER_PREFIX), validate=True)
    return Ed25519PublicKey.from_public_bytes(raw)


def generate_key() -> Ed25519PrivateKey:
    """A new publisher key."""
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    """``key`` as an unencrypted PKCS#8 PEM file, the format of the node's own keys."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(data: bytes) -> Ed25519PrivateKey:
    """A publisher key from PEM bytes; :class:`SignatureError` for anything else."""
    if len(data) > _MAX_KEY_FILE_BYTES or not data.lstrip().startswith(b"-----BEGIN"):
        raise SignatureError("not a PEM private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SignatureError("the key is encrypted; give an unencrypted PEM key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise SignatureError("not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError("not an Ed25519 key; make one with 'pollen key create'")
    return key


# --- signing and verifying --------------------------------------------------------------------


def sign(private_key: Ed25519PrivateKey, manifest: ArtifactManifest) -> str:
    """The signature of ``manifest`` by ``private_key``, in standard base64."""
    return base64.b64encode(private_key.sign(signed_payload(manifest))).decode("ascii")


def verify(manifest: ArtifactManifest, signature: str, signer: str) -> None:
    """Check that ``signer`` signed exactly ``manifest``; :class:`SignatureError` otherwise."""
    public_key = parse_signer(signer)
    try:
        raw = base64.b64decode(signature.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise SignatureError("the signature is not base64") from None
    if len(raw) != _SIGNATURE_BYTES:
        raise SignatureError(f"an Ed25519 signature has {_SIGNATURE_BYTES} bytes, not {len(raw)}")
    try:
        public_key.verify(raw, signed_payload(manifest))
    except InvalidSignature:
        raise SignatureError(
            "the signature does not verify: the digest, the manifest (name, size, media type, "
            "version, executor, needs) or the signer differs from what was signed"
        ) from None


def verify_artifact(artifact: Artifact) -> bool:
    """Whether ``artifact`` carries a signature, checked: True if it verifies, False if it has
    none (a ``signer`` alone is an unverified claim). Raises :class:`SignatureError` for a
    signature that is malformed or does not verify."""
    spec = artifact.spec
    if spec.signature is None:
        return False
    if spec.signer is None:
        raise SignatureError("a signature needs its signer")
    verify(ArtifactManifest.of(artifact), spec.signature, spec.signer)
    return True


# --- the trust policy -------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """Whether a node may run an artifact's bytes, and why, as a condition reason and message."""

    allowed: bool
    reason: str
    message: str


def evaluate(digest: str, artifacts: Iterable[Artifact], policy: TrustPolicySpec | None) -> Verdict:
    """What ``policy`` (None: no TrustPolicy, which allows unsigned artifacts) says of running
    the bytes ``digest`` names, given every Artifact recorded for that digest.

    The bytes are trusted when any of those Artifacts carries a verified signature by a key
    the policy lists. Otherwise: any signature that does not verify refuses them
    (``BadSignature``, whatever the policy); a policy that requires trust refuses them as
    ``Untrusted`` when they are signed only by keys it does not list, ``UnsignedArtifact`` when
    they are not signed at all.
    """
    policy = policy if policy is not None else TrustPolicySpec()
    trusted = set(policy.trusted_signers)
    signers: list[str] = []
    bad: list[tuple[str, str]] = []
    for artifact in artifacts:
        if artifact.spec.digest != digest:
            continue
        try:
            signed = verify_artifact(artifact)
        except SignatureError as exc:
            bad.append((artifact.name, str(exc)))
            continue
        signer = artifact.spec.signer
        if not signed or signer is None:
            continue
        if signer in trusted:
            return Verdict(True, "Trusted", f'artifact "{artifact.name}" is signed by {signer}')
        signers.append(signer)
    if bad:
        name, why = bad[0]
        return Verdict(False, "BadSignature", f'artifact "{name}": {why}')
    if policy.allow_unsigned:
        return Verdict(True, "Signed" if signers else "Unsigned", "the trust policy allows it")
    if signers:
        return Verdict(
            False,
            "Untrusted",
            f"{digest} is signed by {', '.join(sorted(set(signers)))}, "
            "which the trust policy does not list",
        )
    return Verdict(
        False,
        "UnsignedArtifact",
        f"{digest} has no signature and the trust policy requires a trusted one",
    )
