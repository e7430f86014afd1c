"""Join tokens and the enrolment messages: what is accepted, and how everything else fails."""

from __future__ import annotations

import base64
import contextlib
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from pollen.mesh import pki, tokens

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
ROOT = Ed25519PrivateKey.generate()
CA = pki.create_ca_certificate(ROOT, "c1", NOW)
ADDRESSES = [("127.0.0.1", 7946), ("node-1.example", 7946), ("::1", 7000)]


def make_token(
    root: Ed25519PrivateKey = ROOT, cluster: str = "c1", ttl: timedelta = timedelta(hours=1)
) -> str:
    return tokens.create_token(root, cluster=cluster, addresses=ADDRESSES, ttl=ttl, now=NOW)


def test_a_token_round_trips() -> None:
    token = make_token()
    assert token.startswith("pollen1.") and len(token) < 400
    claims = tokens.verify_token(token, NOW, ROOT.public_key(), expected_cluster="c1")
    assert claims.cluster == "c1"
    assert claims.addresses == tuple(ADDRESSES)
    assert claims.expires_at == NOW + timedelta(hours=1)
    assert claims.root_public_key == pki.public_key_b64(ROOT.public_key())
    assert len(claims.token_id) == 32
    # A joiner has only the token: it checks it against the key the token carries.
    assert tokens.verify_token(f"  {token}\n", NOW) == claims


def test_every_token_has_its_own_id() -> None:
    ids = {tokens.verify_token(make_token(), NOW).token_id for _ in range(10)}
    assert len(ids) == 10


def test_expired_token() -> None:
    token = make_token(ttl=timedelta(minutes=5))
    with pytest.raises(tokens.TokenError, match="expired at"):
        tokens.verify_token(token, NOW + timedelta(minutes=5))


def test_token_signed_by_another_key_is_forged() -> None:
    # A payload carrying our root key, signed by someone else's key.
    genuine = make_token()
    forger = make_token(root=Ed25519PrivateKey.generate())
    forged = genuine.rsplit(".", 1)[0] + "." + forger.rsplit(".", 1)[1]
    with pytest.raises(tokens.TokenError, match="signature is invalid"):
        tokens.verify_token(forged, NOW)


def test_tampered_payload_is_forged() -> None:
    prefix, payload, signature = make_token().split(".")
    data = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data["a"] = ["evil.example:7946"]
    data["exp"] += 86400 * 365
    tampered = base64.urlsafe_b64encode(orjson.dumps(data)).rstrip(b"=").decode()
    with pytest.raises(tokens.TokenError, match="signature is invalid"):
        tokens.verify_token(f"{prefix}.{tampered}.{signature}", NOW)


def test_token_of_another_cluster() -> None:
    other_root = Ed25519PrivateKey.generate()
    token = make_token(root=other_root, cluster="c1")  # same name, another root key
    tokens.verify_token(token, NOW)  # self-consistent: a joiner cannot tell
    with pytest.raises(tokens.TokenError, match="another cluster's root key"):
        tokens.verify_token(token, NOW, ROOT.public_key())
    with pytest.raises(tokens.TokenError, match="for cluster 'c2'"):
        tokens.verify_token(make_token(cluster="c2"), NOW, ROOT.public_key(), expected_cluster="c1")


def test_used_token() -> None:
    token = make_token()
    token_id = tokens.verify_token(token, NOW).token_id
    with pytest.raises(tokens.TokenError, match="already been used"):
        tokens.verify_token(token, NOW, used=lambda i: i == token_id)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "does not start"),
        ("pollen2.abc.def", "does not start"),
        ("pollen1.abc", "payload and a signature"),
        ("pollen1.a.b.c", "payload and a signature"),
        ("pollen1.!!!.abc", "not base64url"),
        ("pollen1.e30.abc", "unexpected payload fields"),
        ("pollen1.bm90IGpzb24.abc", "not JSON"),
        ("pollen1." + "a" * 5000, "too long"),
    ],
)
def test_malformed_tokens(text: str, why: str) -> None:
    with pytest.raises(tokens.TokenError, match=why):
        tokens.verify_token(text, NOW)


def test_not_text() -> None:
    with pytest.raises(tokens.TokenError, match="not text"):
        tokens.verify_token(b"pollen1.x.y", NOW)  # type: ignore[arg-type]


def test_create_token_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="time to live"):
        tokens.create_token(ROOT, cluster="c1", addresses=ADDRESSES, ttl=timedelta(0), now=NOW)
    with pytest.raises(ValueError, match="addresses"):
        tokens.create_token(ROOT, cluster="c1", addresses=[], ttl=timedelta(hours=1), now=NOW)
    with pytest.raises(ValueError, match="host:port"):
        tokens.create_token(
            ROOT, cluster="c1", addresses=[("bad host", 1)], ttl=timedelta(hours=1), now=NOW
        )
    with pytest.raises(ValueError, match="cluster name"):
        tokens.create_token(ROOT, cluster="C 1", addresses=ADDRESSES, ttl=timedelta(1), now=NOW)


@given(st.text(max_size=600))
def test_fuzzed_text_is_only_ever_a_token_error(text: str) -> None:
    with pytest.raises(tokens.TokenError):
        tokens.verify_token(text, NOW)


@given(
    st.text(
        alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.", max_size=600
    )
)
def test_fuzzed_token_alphabet_is_only_ever_a_token_error(text: str) -> None:
    with pytest.raises(tokens.TokenError):
        tokens.verify_token("pollen1." + text, NOW)


GOOD = make_token()


@given(st.integers(min_value=0, max_value=len(GOOD) - 1), st.characters(codec="ascii"))
def test_a_changed_character_never_verifies(where: int, char: str) -> None:
    changed = GOOD[:where] + char + GOOD[where + 1 :]
    try:
        claims = tokens.verify_token(changed, NOW)
    except tokens.TokenError:
        return
    # Only changes that decode to the same bytes (base64 padding bits, edge whitespace) pass.
    assert claims == tokens.verify_token(GOOD, NOW)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=6)
    ),
    max_leaves=12,
)


def _signed(payload: object) -> str:
    data = orjson.dumps(payload)
    sig = ROOT.sign(b"pollen join token v1\x00" + data)
    enc = base64.urlsafe_b64encode
    return f"pollen1.{enc(data).rstrip(b'=').decode()}.{enc(sig).rstrip(b'=').decode()}"


@settings(max_examples=200)
@given(
    st.fixed_dictionaries(
        {
            "v": JSON | st.just(1),
            "id": JSON | st.just("0" * 32),
            "c": JSON | st.just("c1"),
            "k": JSON | st.just(pki.public_key_b64(ROOT.public_key())),
            "a": JSON | st.just(["h:1"]),
            "exp": JSON | st.just(2_000_000_000),
        }
    )
    | JSON
)
def test_correctly_signed_odd_payloads_are_token_errors(payload: object) -> None:
    # Even with a valid signature, a payload of the wrong shape never gets through as claims.
    try:
        claims = tokens.verify_token(_signed(payload), NOW)
    except tokens.TokenError:
        return
    assert claims.cluster == "c1" and claims.addresses == (("h", 1),)


def test_addresses_parse() -> None:
    assert tokens.parse_address("[::1]:80") == ("::1", 80)
    assert tokens.format_address("::1", 80) == "[::1]:80"
    for bad in ("h", "h:0", "h:65536", ":80", "h:8o", "[zz]:1", "h h:1"):
        with pytest.raises(ValueError):
            tokens.parse_address(bad)


# --- enrolment messages and the admitting side ---------------------------------------------------


class Ledger:
    """What a node would record in its state document."""

    def __init__(self) -> None:
        self.used: set[str] = set()
        self.admitted: list[tuple[str, str, int]] = []
        self.fail = False

    def record(self, claims: tokens.TokenClaims, name: str, cert: x509.Certificate) -> None:
        if self.fail:
            raise OSError("disk full")
        self.used.add(claims.token_id)
        self.admitted.append((claims.token_id, name, cert.serial_number))


def admitter(ledger: Ledger, taken: set[str] | None = None) -> tokens.Admitter:
    return tokens.Admitter(
        ROOT,
        CA,
        used=ledger.used.__contains__,
        on_admitted=ledger.record,
        name_taken=(taken or set()).__contains__,
    )


def request(token: str, name: str = "n2", nonce: bytes = b"n" * 32) -> tokens.EnrolRequest:
    return tokens.EnrolRequest.create(Ed25519PrivateKey.generate(), token, name, nonce)


def test_admission_issues_a_certificate_and_records_the_token() -> None:
    ledger = Ledger()
    nonce = tokens.new_nonce()
    key = Ed25519PrivateKey.generate()
    token = make_token()
    req = tokens.EnrolRequest.decode(tokens.EnrolRequest.create(key, token, "n2", nonce).encode())
    grant = admitter(ledger).admit(req, nonce, NOW)
    assert pki.verify_node_certificate(grant.certificate, grant.ca_certificate, NOW) == "n2"
    assert pki.public_key_b64(grant.certificate.public_key()) == pki.public_key_b64(  # type: ignore[arg-type]
        key.public_key()
    )
    assert ledger.admitted == [
        (tokens.verify_token(token, NOW).token_id, "n2", grant.certificate.serial_number)
    ]
    decoded = tokens.decode_answer(tokens.encode_grant(grant))
    assert decoded.certificate == grant.certificate and decoded.ca_certificate == CA


def test_a_token_is_spent_once() -> None:
    ledger = Ledger()
    token = make_token()
    admitter(ledger).admit(request(token), b"n" * 32, NOW)
    with pytest.raises(tokens.TokenError, match="already been used"):
        admitter(ledger).admit(request(token, "n3"), b"n" * 32, NOW)
    assert len(ledger.admitted) == 1


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda: request(make_token(ttl=timedelta(seconds=1)), nonce=b"n" * 32), "expired"),
        (lambda: request(make_token(root=Ed25519PrivateKey.generate())), "another cluster"),
        (lambda: request(make_token(cluster="c2")), "not 'c1'"),
        (lambda: request(make_token(), name="Bad_Name"), "is not valid"),
        (lambda: request(make_token(), name="taken"), "already exists"),
        (lambda: request(make_token(), nonce=b"x" * 32), "not signed by the key"),
    ],
)
def test_refusals_record_nothing(make: object, why: str) -> None:
    ledger = Ledger()
    req = make()  # type: ignore[operator]
    with pytest.raises(tokens.EnrolmentError, match=why):
        admitter(ledger, taken={"taken"}).admit(req, b"n" * 32, NOW + timedelta(seconds=2))
    assert ledger.admitted == [] and ledger.used == set()


def test_an_admission_that_cannot_be_recorded_is_refused() -> None:
    ledger = Ledger()
    ledger.fail = True
    with pytest.raises(tokens.EnrolmentError, match="could not record"):
        admitter(ledger).admit(request(make_token()), b"n" * 32, NOW)


def test_possession_is_bound_to_the_request() -> None:
    nonce = b"n" * 32
    req = request(make_token(), "n2", nonce)
    swapped = tokens.EnrolRequest(
        token=req.token, node_name="n3", public_key=req.public_key, signature=req.signature
    )
    with pytest.raises(tokens.EnrolmentError, match="not signed"):
        swapped.verify_possession(nonce)
    other_token = tokens.EnrolRequest(
        token=make_token(), node_name="n2", public_key=req.public_key, signature=req.signature
    )
    with pytest.raises(tokens.EnrolmentError, match="not signed"):
        other_token.verify_possession(nonce)


def test_refusal_answer() -> None:
    with pytest.raises(tokens.EnrolmentError, match="refused: the join token has already"):
        tokens.decode_answer(tokens.encode_refusal("the join token has already been used"))


def test_challenge_round_trip() -> None:
    nonce = tokens.new_nonce()
    assert tokens.decode_challenge(tokens.encode_challenge(nonce)) == nonce
    with pytest.raises(tokens.EnrolmentError, match="32 bytes"):
        tokens.decode_challenge(orjson.dumps({"nonce": "AAAA"}))


@given(st.binary(max_size=2048) | JSON.map(orjson.dumps))
def test_fuzzed_enrolment_messages_are_only_enrolment_errors(data: bytes) -> None:
    for decode in (tokens.EnrolRequest.decode, tokens.decode_answer, tokens.decode_challenge):
        with contextlib.suppress(tokens.EnrolmentError):
            decode(data)


def test_oversized_enrolment_messages() -> None:
    big = orjson.dumps({"token": "x" * 9000, "name": "n", "publicKey": "", "signature": ""})
    with pytest.raises(tokens.EnrolmentError, match="larger than"):
        tokens.EnrolRequest.decode(big)
