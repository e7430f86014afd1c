"""Artifact signatures and the trust policy's verdict (pollen.resources.signing)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from pollen.resources import Artifact, TrustPolicySpec, from_dict
from pollen.resources.models import SIGNER_RE
from pollen.resources.signing import (
    ArtifactManifest,
    SignatureError,
    evaluate,
    load_private_key,
    parse_signer,
    private_key_pem,
    sign,
    signed_payload,
    signer_id,
    verify,
    verify_artifact,
)

# Keys are made once: hypothesis varies what is signed, not the curve arithmetic.
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
DIGEST = "sha256:" + "ab" * 32

names = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)
digests = st.text("0123456789abcdef", min_size=64, max_size=64).map(lambda h: "sha256:" + h)
texts = st.text(max_size=40).filter(lambda t: not any(0xD800 <= ord(c) <= 0xDFFF for c in t))
manifests = st.builds(
    ArtifactManifest,
    name=names,
    digest=digests,
    size=st.integers(0, 1 << 28),
    media_type=texts,
    version=st.none() | texts,
    executor=st.none() | st.sampled_from(["http", "command"]),
    memory_mb=st.none() | st.integers(1, 1 << 20),
)


def changed(value: Any) -> st.SearchStrategy[Any]:
    """Any value of the field's kind but ``value``."""
    if isinstance(value, int):
        return st.integers(0, 1 << 30).filter(lambda v: v != value)
    if isinstance(value, str) and value.startswith("sha256:"):
        return digests.filter(lambda v: v != value)
    return (st.none() | texts).filter(lambda v: v != value)


@settings(max_examples=60)
@given(manifests)
def test_a_signature_verifies_for_what_was_signed(manifest: ArtifactManifest) -> None:
    verify(manifest, sign(KEY, manifest), signer_id(KEY))


@settings(max_examples=100)
@given(
    manifests, st.sampled_from([f.name for f in dataclasses.fields(ArtifactManifest)]), st.data()
)
def test_any_change_to_digest_or_manifest_breaks_the_signature(
    manifest: ArtifactManifest, field: str, data: st.DataObject
) -> None:
    signature = sign(KEY, manifest)
    value = data.draw(changed(getattr(manifest, field)))
    if field == "name":
        value = data.draw(names.filter(lambda v: v != manifest.name))
    tampered = dataclasses.replace(manifest, **{field: value})
    with pytest.raises(SignatureError):
        verify(tampered, signature, signer_id(KEY))


@given(manifests)
@settings(max_examples=30)
def test_another_key_does_not_verify(manifest: ArtifactManifest) -> None:
    with pytest.raises(SignatureError, match="does not verify"):
        verify(manifest, sign(KEY, manifest), signer_id(OTHER_KEY))


def test_the_signed_payload_is_canonical_json_behind_a_domain() -> None:
    # Fixed bytes: another implementation must produce exactly these to verify a signature.
    manifest = ArtifactManifest(name="hello", digest=DIGEST, size=22, version="1.0 é")
    assert signed_payload(manifest) == (
        b"pollen-artifact-v1\n"
        b'{"digest":"sha256:' + b"ab" * 32 + b'","executor":null,'
        b'"mediaType":"application/wasm","memoryMB":null,"name":"hello","size":22,'
        b'"version":"1.0 \xc3\xa9"}'
    )


def test_a_field_left_out_differs_from_a_field_given() -> None:
    base = ArtifactManifest(name="a", digest=DIGEST, size=1)
    assert signed_payload(base) != signed_payload(dataclasses.replace(base, version=""))


@given(st.text(max_size=100))
def test_malformed_signers_are_clear_errors(text: str) -> None:
    if SIGNER_RE.fullmatch(text):
        parse_signer(text)
        return
    with pytest.raises(SignatureError, match="is not ed25519"):
        parse_signer(text)


@given(st.text(max_size=200))
def test_malformed_signatures_are_clear_errors(signature: str) -> None:
    manifest = ArtifactManifest(name="a", digest=DIGEST, size=1)
    with pytest.raises(SignatureError):
        verify(manifest, signature, signer_id(KEY))


def test_a_signer_id_names_the_public_key() -> None:
    key_id = signer_id(KEY)
    assert SIGNER_RE.fullmatch(key_id)
    assert signer_id(parse_signer(key_id)) == key_id
    assert signer_id(KEY.public_key()) == key_id
    # The same 32 bytes spelled with non-zero padding bits are not a second name for the key.
    assert key_id[-2] in "AEIMQUYcgkosw048"
    with pytest.raises(SignatureError):
        parse_signer(key_id[:-2] + chr(ord(key_id[-2]) + 1) + "=")


@given(st.binary(max_size=300))
def test_key_files_that_are_not_keys_are_clear_errors(data: bytes) -> None:
    with pytest.raises(SignatureError):
        load_private_key(data)


def test_key_files() -> None:
    assert signer_id(load_private_key(private_key_pem(KEY))) == signer_id(KEY)
    encrypted = KEY.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(SignatureError, match="encrypted"):
        load_private_key(encrypted)
    other_curve = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(SignatureError, match="not an Ed25519 key"):
        load_private_key(other_curve)


# --- Artifacts and the trust policy -------------------------------------------------------------


def artifact(name: str = "hello", digest: str = DIGEST, **spec: Any) -> Artifact:
    resource = from_dict(
        {
            "apiVersion": "pollen.dev/v1alpha1",
            "kind": "Artifact",
            "metadata": {"name": name},
            "spec": {"digest": digest, "size": 22, **spec},
        }
    )
    assert isinstance(resource, Artifact)
    return resource


def signed(key: Ed25519PrivateKey, name: str = "hello", **spec: Any) -> Artifact:
    unsigned = artifact(name, **spec)
    signature = sign(key, ArtifactManifest.of(unsigned))
    return artifact(name, **spec, signer=signer_id(key), signature=signature)


def test_artifacts_verify_with_every_manifest_field() -> None:
    full = signed(KEY, version="2", executor="command", needs={"memoryMB": 32})
    assert verify_artifact(full) is True
    assert verify_artifact(artifact()) is False
    assert verify_artifact(artifact(signer="release-team")) is False  # a claim, not a signature
    renamed = artifact("other", **full.spec.model_dump(by_alias=True, exclude_none=True))
    with pytest.raises(SignatureError, match="does not verify"):
        verify_artifact(renamed)
    with pytest.raises(SignatureError, match="needs its signer"):
        verify_artifact(artifact(signature=full.spec.signature))


REQUIRE = TrustPolicySpec(allow_unsigned=False, trusted_signers=[signer_id(KEY)])


@pytest.mark.parametrize(
    ("artifacts", "policy", "allowed", "reason"),
    [
        ([], None, True, "Unsigned"),
        ([artifact()], None, True, "Unsigned"),
        ([signed(OTHER_KEY)], None, True, "Signed"),
        ([signed(KEY)], REQUIRE, True, "Trusted"),
        ([], REQUIRE, False, "UnsignedArtifact"),
        ([artifact(signer=signer_id(KEY))], REQUIRE, False, "UnsignedArtifact"),
        ([signed(OTHER_KEY)], REQUIRE, False, "Untrusted"),
        ([signed(OTHER_KEY), signed(KEY, "hello-2")], REQUIRE, True, "Trusted"),
        (
            [signed(KEY, "elsewhere", digest="sha256:" + "cd" * 32)],
            REQUIRE,
            False,
            "UnsignedArtifact",
        ),
        ([artifact(signer=signer_id(KEY), signature="AAAA")], None, False, "BadSignature"),
    ],
)
def test_the_policy_verdict(
    artifacts: list[Artifact], policy: TrustPolicySpec | None, allowed: bool, reason: str
) -> None:
    verdict = evaluate(DIGEST, artifacts, policy)
    assert (verdict.allowed, verdict.reason) == (allowed, reason)
    assert verdict.message and "\n" not in verdict.message


def test_a_forged_signature_never_runs_even_when_unsigned_is_allowed() -> None:
    genuine = signed(KEY)
    forged = artifact(size=23, signer=genuine.spec.signer, signature=genuine.spec.signature)
    verdict = evaluate(DIGEST, [forged], TrustPolicySpec(allow_unsigned=True))
    assert (verdict.allowed, verdict.reason) == (False, "BadSignature")
    assert 'artifact "hello"' in verdict.message
