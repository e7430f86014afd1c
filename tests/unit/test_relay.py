"""Relay vocabulary and the route table: strict decoding of hostile frames, route choice."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pollen.mesh.relay import (
    MAX_HEADER_SIZE,
    RelayAnswer,
    RelayedHeader,
    RelayError,
    RelayRequest,
    RouteConfig,
    RouteTable,
)

names = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)
kinds = st.from_regex(r"[a-z0-9][a-z0-9._/-]{0,30}", fullmatch=True)


@given(names, kinds)
def test_headers_round_trip(name: str, kind: str) -> None:
    assert RelayRequest.decode(RelayRequest(name, kind).encode()) == RelayRequest(name, kind)
    assert RelayedHeader.decode(RelayedHeader(name, kind).encode()) == RelayedHeader(name, kind)


@given(st.one_of(st.none(), st.text(min_size=1, max_size=600)))
def test_answers_round_trip(error: str | None) -> None:
    answer = RelayAnswer.decode(RelayAnswer(error).encode())
    assert answer.ok is (error is None)
    if error is not None:
        assert answer.error == error[:512]


@given(st.binary(max_size=2 * MAX_HEADER_SIZE))
def test_arbitrary_bytes_decode_or_raise_relay_error(frame: bytes) -> None:
    for decoder in (RelayRequest.decode, RelayedHeader.decode, RelayAnswer.decode):
        try:
            decoder(frame)
        except RelayError as exc:
            assert str(exc)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)


@given(st.dictionaries(st.sampled_from(["to", "from", "kind", "ok", "error", "x"]), json_values))
def test_json_objects_of_any_shape_decode_or_raise_relay_error(value: dict[str, object]) -> None:
    frame = orjson.dumps(value)
    for decoder in (RelayRequest.decode, RelayedHeader.decode, RelayAnswer.decode):
        try:
            decoded = decoder(frame)
        except RelayError:
            continue
        # Whatever was accepted is exactly what a well-behaved peer would have sent.
        assert decoder(decoded.encode()) == decoded


@pytest.mark.parametrize(
    "frame",
    [
        b'{"to": "../etc", "kind": "x"}',
        b'{"to": "A", "kind": "x"}',
        b'{"to": "a", "kind": "X Y"}',
        b'{"to": "a", "kind": "x", "extra": 1}',
        b'{"to": 1, "kind": "x"}',
        b"[]",
        b'{"to": "' + b"a" * MAX_HEADER_SIZE + b'", "kind": "x"}',
    ],
)
def test_bad_requests_are_refused(frame: bytes) -> None:
    with pytest.raises(RelayError):
        RelayRequest.decode(frame)


def test_an_answer_is_ok_or_an_error_never_both() -> None:
    with pytest.raises(RelayError):
        RelayAnswer.decode(b'{"ok": true, "error": "x"}')
    with pytest.raises(RelayError):
        RelayAnswer.decode(b'{"ok": false}')


def test_a_failed_direct_dial_is_remembered_until_retry() -> None:
    table = RouteTable(RouteConfig(retry_direct_after=30.0))
    assert table.try_direct("b", 0.0)
    table.direct_failed("b", 10.0)
    assert not table.try_direct("b", 20.0)
    assert table.try_direct("b", 40.0)
    table.direct_failed("b", 50.0)
    table.direct_up("b")
    assert table.try_direct("b", 51.0)


def test_relays_are_ordered_by_path_length_and_the_last_good_one_first() -> None:
    table = RouteTable(RouteConfig(max_relays_tried=3))
    rtt = {("a", "r1"): 0.01, ("r1", "b"): 0.09, ("a", "r2"): 0.03, ("r2", "b"): 0.03}

    def distance(x: str, y: str) -> float | None:
        return rtt.get((x, y))

    connected = ["r1", "r2", "r3", "b", "a"]
    assert table.relays("b", connected, distance, self_name="a") == ["r2", "r1", "r3"]
    table.relayed_via("b", "r3")
    assert table.relays("b", connected, distance, self_name="a") == ["r3", "r2", "r1"]
    table.relay_failed("b", "r3")
    assert table.relays("b", connected, distance, self_name="a") == ["r2", "r1", "r3"]
    table.relayed_via("b", "r1")
    table.forget("r1")
    assert table.relays("b", ["r2", "r3"], distance, self_name="a") == ["r2", "r3"]


def test_a_direct_path_is_broken_after_probes_in_a_row_answered_only_indirectly() -> None:
    table = RouteTable(RouteConfig(indirect_only_limit=2, retry_direct_after=30.0))
    assert not table.indirect_only("b", 1.0)
    table.direct_answer("b")  # a direct answer in between: a lost datagram, not a cut
    assert not table.indirect_only("b", 2.0)
    assert table.try_direct("b", 2.0)
    assert table.indirect_only("b", 3.0)
    assert not table.try_direct("b", 4.0)
    assert table.try_direct("b", 34.0)
