"""The cluster PKI: CA and node certificates, their verification, and the data directory."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from pollen.mesh import identity, pki

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def make_cluster(name: str = "c1") -> tuple[Ed25519PrivateKey, x509.Certificate]:
    root = Ed25519PrivateKey.generate()
    return root, pki.create_ca_certificate(root, name, NOW)


def node_cert(
    root: Ed25519PrivateKey, ca: x509.Certificate, name: str = "n1", now: datetime = NOW
) -> x509.Certificate:
    return pki.issue_node_certificate(
        root, ca, name, Ed25519PrivateKey.generate().public_key(), now
    )


def test_ca_certificate_is_a_self_signed_ca_naming_the_cluster() -> None:
    root, ca = make_cluster("prod")
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    assert ca.issuer == ca.subject
    assert pki.verify_ca_certificate(ca, NOW, root.public_key()) == "prod"
    assert ca.not_valid_after_utc - NOW > timedelta(days=365 * 19)


def test_ca_certificate_of_another_root_key_is_refused() -> None:
    _, ca = make_cluster()
    other, _ = make_cluster()
    with pytest.raises(pki.CertificateError, match="root key"):
        pki.verify_ca_certificate(ca, NOW, other.public_key())


def test_node_certificate_layout() -> None:
    root, ca = make_cluster("c1")
    key = Ed25519PrivateKey.generate()
    cert = pki.issue_node_certificate(root, ca, "web-1", key.public_key(), NOW)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "web-1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["pollen://c1/node/web-1"]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert timedelta(days=364) < cert.not_valid_after_utc - NOW <= timedelta(days=366)
    # Backdated a little so that a peer with a slow clock accepts it at once.
    assert cert.not_valid_before_utc < NOW
    assert pki.verify_node_certificate(cert, ca, NOW) == "web-1"
    # DER and PEM bytes are accepted too.
    assert pki.verify_node_certificate(pki.certificate_der(cert), ca, NOW) == "web-1"
    assert pki.verify_node_certificate(pki.certificate_pem(cert), ca, NOW) == "web-1"


def test_serials_are_random() -> None:
    root, ca = make_cluster()
    serials = {node_cert(root, ca).serial_number for _ in range(20)}
    assert len(serials) == 20
    assert all(s.bit_length() > 100 for s in serials)


def test_another_clusters_certificate_is_refused_even_with_the_same_names() -> None:
    _root, ca = make_cluster("c1")
    impostor_root, impostor_ca = make_cluster("c1")  # same cluster name, different root key
    cert = node_cert(impostor_root, impostor_ca, "n1")
    assert impostor_ca.subject == ca.subject
    with pytest.raises(pki.CertificateError, match="not issued by cluster 'c1'"):
        pki.verify_node_certificate(cert, ca, NOW)


def test_self_signed_node_certificate_is_refused() -> None:
    _, ca = make_cluster("c1")
    key = Ed25519PrivateKey.generate()
    # Someone signs a certificate with its own key, copying our CA's name as issuer.
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "n1")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("pollen://c1/node/n1")]),
            critical=False,
        )
        .sign(key, algorithm=None)
    )
    with pytest.raises(pki.CertificateError, match="not issued by cluster"):
        pki.verify_node_certificate(cert, ca, NOW)


def test_validity_window_is_enforced() -> None:
    root, ca = make_cluster()
    cert = node_cert(root, ca)
    with pytest.raises(pki.CertificateError, match="expired"):
        pki.verify_node_certificate(cert, ca, NOW + timedelta(days=366))
    with pytest.raises(pki.CertificateError, match="not valid before"):
        pki.verify_node_certificate(cert, ca, NOW - timedelta(days=1))


def test_the_ca_itself_is_not_a_node_certificate() -> None:
    _, ca = make_cluster()
    with pytest.raises(pki.CertificateError, match="it is a CA"):
        pki.verify_node_certificate(ca, ca, NOW)


def _handmade(
    root: Ed25519PrivateKey, ca: x509.Certificate, common_name: str, uri: str
) -> x509.Certificate:
    """A certificate signed by the real root key, but with fields pki would never write."""
    key = Ed25519PrivateKey.generate()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
        .sign(root, algorithm=None)
    )


def test_cluster_in_the_san_must_be_the_cas() -> None:
    # A root key reused for two clusters must still keep them apart.
    root, ca = make_cluster("c1")
    cert = _handmade(root, ca, "n1", "pollen://c2/node/n1")
    with pytest.raises(pki.CertificateError, match="belongs to cluster 'c2'"):
        pki.verify_node_certificate(cert, ca, NOW)


def test_common_name_must_match_the_san() -> None:
    root, ca = make_cluster("c1")
    cert = _handmade(root, ca, "admin", "pollen://c1/node/n1")
    with pytest.raises(pki.CertificateError, match="common name"):
        pki.verify_node_certificate(cert, ca, NOW)


def test_san_must_name_a_node() -> None:
    root, ca = make_cluster("c1")
    cert = _handmade(root, ca, "n1", "https://example.com/n1")
    with pytest.raises(pki.CertificateError, match="exactly one pollen node"):
        pki.verify_node_certificate(cert, ca, NOW)


def test_revocation_hook_gets_name_and_serial() -> None:
    root, ca = make_cluster()
    cert = node_cert(root, ca, "n1")
    asked: list[tuple[str, int]] = []

    def is_revoked(name: str, serial: int) -> bool:
        asked.append((name, serial))
        return serial == cert.serial_number

    with pytest.raises(pki.CertificateError, match="'n1' has been revoked"):
        pki.verify_node_certificate(cert, ca, NOW, is_revoked)
    assert asked == [("n1", cert.serial_number)]
    # A later certificate for the same name is not caught by a serial-keyed revocation.
    again = node_cert(root, ca, "n1")
    assert pki.verify_node_certificate(again, ca, NOW, is_revoked) == "n1"


def test_verification_with_the_root_key_only() -> None:
    root, ca = make_cluster("c1")
    cert = node_cert(root, ca, "n1")
    assert pki.verify_node_certificate_with_key(cert, root.public_key(), "c1", NOW) == "n1"
    other, _ = make_cluster("c1")
    with pytest.raises(pki.CertificateError, match="not issued"):
        pki.verify_node_certificate_with_key(cert, other.public_key(), "c1", NOW)
    with pytest.raises(pki.CertificateError, match="belongs to cluster"):
        pki.verify_node_certificate_with_key(cert, root.public_key(), "c2", NOW)


def test_naive_times_are_refused() -> None:
    root, ca = make_cluster()
    with pytest.raises(ValueError, match="timezone"):
        pki.verify_node_certificate(node_cert(root, ca), ca, datetime(2026, 11, 23))


@given(st.binary(max_size=4096))
def test_garbage_is_only_ever_a_certificate_error(data: bytes) -> None:
    _, ca = CLUSTER
    with pytest.raises(pki.CertificateError):
        pki.verify_node_certificate(data, ca, NOW)


@given(st.binary(min_size=1, max_size=64), st.integers(min_value=0))
def test_damaged_certificates_are_refused(patch: bytes, where: int) -> None:
    _root, ca = CLUSTER
    der = bytearray(pki.certificate_der(GOOD_CERT))
    where %= len(der)
    damaged = bytes(der[:where] + patch + der[where + len(patch) :])
    if damaged == bytes(der):
        return
    with pytest.raises(pki.CertificateError):
        pki.verify_node_certificate(damaged, ca, NOW)


CLUSTER = make_cluster("fuzz")
GOOD_CERT = node_cert(*CLUSTER, name="n1")


# --- the data directory ----------------------------------------------------------------------


def test_init_writes_a_ca_and_a_node_certificate(tmp_path: Path) -> None:
    ident = identity.init_data_dir(tmp_path / "d", cluster_name="c1", node_name="n1", now=NOW)
    assert ident.can_admit
    for name in ("ca.crt", "node.crt", "root.key", "node.key"):
        assert (tmp_path / "d" / name).stat().st_mode & 0o777 == 0o600
    creds = identity.load_credentials(tmp_path / "d", now=NOW)
    assert creds.node_name == "n1" and creds.cluster_name == "c1"
    assert creds.root_key is not None
    assert pki.verify_ca_certificate(creds.ca_certificate, NOW, creds.root_key.public_key()) == "c1"
    assert pki.verify_node_certificate(creds.certificate, creds.ca_certificate, NOW) == "n1"
    assert pki.public_key_b64(creds.certificate.public_key()) == ident.public_key  # type: ignore[arg-type]
    assert ident.root_public_key == pki.public_key_b64(creds.root_key.public_key())


def test_a_data_dir_from_before_certificates_gets_them(tmp_path: Path) -> None:
    d = tmp_path / "d"
    identity.init_data_dir(d, cluster_name="c1", node_name="n1", now=NOW)
    (d / "ca.crt").unlink()
    (d / "node.crt").unlink()
    creds = identity.load_credentials(d, now=NOW)
    assert pki.verify_node_certificate(creds.certificate, creds.ca_certificate, NOW) == "n1"
    assert (d / "node.crt").exists()


def test_a_root_key_holder_renews_its_certificate_before_expiry(tmp_path: Path) -> None:
    d = tmp_path / "d"
    identity.init_data_dir(d, cluster_name="c1", node_name="n1", now=NOW)
    first = identity.load_credentials(d, now=NOW).certificate
    later = NOW + timedelta(days=350)
    renewed = identity.load_credentials(d, now=later).certificate
    assert renewed.serial_number != first.serial_number
    assert renewed.not_valid_after_utc > later + timedelta(days=300)


def test_a_joined_node_must_enrol_again_once_expired(tmp_path: Path) -> None:
    root, ca = make_cluster("c1")
    key = Ed25519PrivateKey.generate()
    cert = pki.issue_node_certificate(root, ca, "n2", key.public_key(), NOW)
    d = tmp_path / "joined"
    ident = identity.init_joined_data_dir(
        d, node_key=key, certificate=cert, ca_certificate=ca, now=NOW
    )
    assert not ident.can_admit and not (d / "root.key").exists()
    assert ident.node_name == "n2" and ident.cluster_name == "c1"
    assert identity.load_credentials(d, now=NOW).root_key is None
    with pytest.raises(identity.IdentityError, match="enrol this node again"):
        identity.load_credentials(d, now=NOW + timedelta(days=400))


def test_joined_data_dir_checks_before_writing(tmp_path: Path) -> None:
    root, ca = make_cluster("c1")
    key = Ed25519PrivateKey.generate()
    other_key = Ed25519PrivateKey.generate()
    cert = pki.issue_node_certificate(root, ca, "n2", other_key.public_key(), NOW)
    d = tmp_path / "joined"
    with pytest.raises(identity.IdentityError, match="another key"):
        identity.init_joined_data_dir(d, node_key=key, certificate=cert, ca_certificate=ca, now=NOW)
    assert not d.exists()
    _, foreign_ca = make_cluster("c1")
    good = pki.issue_node_certificate(root, ca, "n2", key.public_key(), NOW)
    with pytest.raises(identity.IdentityError, match="unusable certificate"):
        identity.init_joined_data_dir(
            d, node_key=key, certificate=good, ca_certificate=foreign_ca, now=NOW
        )
    assert not d.exists()


def test_a_certificate_not_matching_the_node_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "d"
    identity.init_data_dir(d, cluster_name="c1", node_name="n1", now=NOW)
    creds = identity.load_credentials(d, now=NOW)
    assert creds.root_key is not None
    # node.crt swapped for another node's certificate: the root key holder reissues its own...
    stranger = node_cert(creds.root_key, creds.ca_certificate, "n9")
    (d / "node.crt").write_bytes(pki.certificate_pem(stranger))
    assert identity.load_credentials(d, now=NOW).node_name == "n1"
    # ...while a node without the root key refuses to start with it.
    (d / "node.crt").write_bytes(pki.certificate_pem(stranger))
    (d / "root.key").unlink()
    with pytest.raises(identity.IdentityError, match="not issued to this node"):
        identity.load_credentials(d, now=NOW)


def test_load_root_key_explains_who_can_mint_tokens(tmp_path: Path) -> None:
    root, ca = make_cluster("c1")
    key = Ed25519PrivateKey.generate()
    cert = pki.issue_node_certificate(root, ca, "n2", key.public_key(), NOW)
    d = tmp_path / "joined"
    identity.init_joined_data_dir(d, node_key=key, certificate=cert, ca_certificate=ca, now=NOW)
    with pytest.raises(identity.IdentityError, match="only a node that holds"):
        identity.load_root_key(d)
