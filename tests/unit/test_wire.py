"""The membership codec: exact round trips, and nothing but WireError on bad input."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pollen.mesh.vivaldi import Coordinate
from pollen.mesh.wire import (
    MAX_ADDRESSES,
    MAX_ARTIFACTS,
    MAX_INCARNATION,
    MAX_LABELS,
    MAX_MESSAGE_SIZE,
    MAX_SEQ,
    Ack,
    Alive,
    Dead,
    Gossip,
    MemberMeta,
    MemberState,
    Nack,
    Ping,
    PingReq,
    Suspect,
    SwimMessage,
    Sync,
    SyncEntry,
    Update,
    WireError,
    check_meta,
    check_name,
    decode,
    encode,
    encoded_entry_size,
    encoded_size,
)

# Deterministic (derandomized) and sized so that the whole file runs in a few seconds; set
# POLLEN_FUZZ_EXAMPLES=5000 for a long random run.
_LONG = int(os.environ.get("POLLEN_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=_LONG or 100,
    deadline=None,
    derandomize=not _LONG,
    suppress_health_check=[HealthCheck.too_slow],
)

# --- strategies of valid values ---------------------------------------------------------

# Strings are drawn from pools of valid values (edge cases included): generating them is what
# costs hypothesis most time, and the fuzz tests below cover invalid strings.
NAME_POOL = [
    "a",
    "0",
    "node-1",
    "n00",
    "edge-7.zone-b.example",
    "a" * 63,
    ".".join(["b" * 63] * 3) + "." + "c" * 61,  # 253 characters
    "x-y-z.1-2",
]
names = st.sampled_from(NAME_POOL)
incarnations = st.integers(0, MAX_INCARNATION)
seqs = st.integers(0, MAX_SEQ)
bounded = st.floats(-1e6, 1e6, allow_nan=False)
positive = st.floats(0.0, 1e6, allow_nan=False)
coordinates = st.builds(
    Coordinate,
    vec=st.lists(bounded, min_size=1, max_size=10).map(tuple),
    height=positive,
    error=positive,
    adjustment=bounded,
)
digests = st.binary(min_size=1, max_size=8).map(lambda b: "sha256:" + hashlib.sha256(b).hexdigest())
addresses = st.sampled_from(
    ["10.0.0.1:7946", "[fd00::1]:7946", "node-1.example:443", "!~" * 127 + "!", "quic://h:1"]
)
label_keys = st.sampled_from(["zone", "pollen.dev/role", "A_b.c-d", "k" * 253])
label_values = st.sampled_from(["", "a", "eu-west_1.b", "v" * 63])
metas = st.builds(
    MemberMeta,
    addresses=st.lists(addresses, max_size=MAX_ADDRESSES).map(tuple),
    coordinate=st.none() | coordinates,
    load=st.floats(0.0, 1.0),
    artifacts=st.lists(digests, max_size=3).map(tuple),
    labels=st.dictionaries(label_keys, label_values, max_size=3).map(
        lambda d: tuple(sorted(d.items()))
    ),
)
updates: st.SearchStrategy[Update] = st.one_of(
    st.builds(Alive, names, incarnations, metas),
    st.builds(Suspect, names, incarnations, names),
    st.builds(Dead, names, incarnations, names),
)
piggybacks = st.lists(updates, max_size=3).map(tuple)
entries = st.builds(SyncEntry, names, incarnations, st.sampled_from(list(MemberState)), metas)
messages: st.SearchStrategy[SwimMessage] = st.one_of(
    st.builds(Ping, seqs, piggybacks),
    st.builds(Ack, seqs, st.none() | coordinates, piggybacks),
    st.builds(PingReq, seqs, names, piggybacks),
    st.builds(Nack, seqs, piggybacks),
    st.builds(Gossip, piggybacks),
    st.builds(Sync, st.lists(entries, max_size=3).map(tuple), st.booleans()),
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=12,
)


def decodes_or_refuses(data: bytes) -> None:
    """The codec's contract: a valid message, or WireError with one sentence."""
    try:
        message = decode(data)
    except WireError as exc:
        text = str(exc)
        assert text and "\n" not in text
        return
    # Whatever decodes must re-encode to something that decodes to the same thing.
    assert decode(encode(message)) == message


# --- round trips --------------------------------------------------------------------------


@settings(FUZZ, max_examples=_LONG or 80)
@given(messages)
def test_every_message_round_trips_exactly(message: SwimMessage) -> None:
    data = encode(message)
    assert len(data) <= MAX_MESSAGE_SIZE
    assert decode(data) == message
    assert decode(bytearray(data)) == message
    assert decode(memoryview(data)) == message


@settings(FUZZ, max_examples=_LONG or 40)
@given(st.lists(updates, min_size=1, max_size=4), st.lists(entries, min_size=1, max_size=3))
def test_encoded_sizes_are_exact(items: list[Update], rows: list[SyncEntry]) -> None:
    empty = len(encode(Gossip(())))
    full = len(encode(Gossip(tuple(items))))
    assert full - empty == sum(encoded_size(u) for u in items) - 1
    empty = len(encode(Sync((), False)))
    full = len(encode(Sync(tuple(rows), False)))
    assert full - empty == sum(encoded_entry_size(e) for e in rows) - 1


@settings(FUZZ, max_examples=_LONG or 50)
@given(metas)
def test_valid_meta_passes_check_meta(meta: MemberMeta) -> None:
    check_meta(meta)


def test_a_probe_is_small() -> None:
    assert len(encode(Ping(4_000_000_000))) <= 20
    ack = Ack(1, Coordinate((0.012345678901234,) * 8, 0.0001234, 0.15, -0.0003))
    assert len(encode(ack)) < 300


# --- fuzzing: nothing but WireError -----------------------------------------------------


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes(data: bytes) -> None:
    decodes_or_refuses(data)


@settings(FUZZ, max_examples=_LONG or 60)
@given(messages, st.data())
def test_truncations_are_refused(message: SwimMessage, data: st.DataObject) -> None:
    encoded = encode(message)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(WireError):
        decode(encoded[:cut])


@settings(FUZZ, max_examples=_LONG or 80)
@given(messages, st.data())
def test_bit_flips(message: SwimMessage, data: st.DataObject) -> None:
    encoded = bytearray(encode(message))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(encoded) - 1))
        encoded[i] ^= 1 << data.draw(st.integers(0, 7))
    decodes_or_refuses(bytes(encoded))


@FUZZ
@given(json_values)
def test_arbitrary_json(value: Any) -> None:
    decodes_or_refuses(orjson.dumps(value))


def _paths(value: Any, prefix: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    out = [prefix]
    if isinstance(value, list):
        for i, item in enumerate(value):
            out += _paths(item, (*prefix, i))
    return out


def _replace(value: Any, path: tuple[int, ...], new: Any) -> Any:
    if not path:
        return new
    copy = list(value)
    copy[path[0]] = _replace(copy[path[0]], path[1:], new)
    return copy


@FUZZ
@given(messages, st.data())
def test_structurally_valid_but_wrong_json(message: SwimMessage, data: st.DataObject) -> None:
    """Replace one node of a valid message's JSON tree with another JSON value."""
    tree = orjson.loads(encode(message))
    path = data.draw(st.sampled_from(_paths(tree)))
    new = data.draw(json_values)
    decodes_or_refuses(orjson.dumps(_replace(tree, path, new)))


@settings(FUZZ, max_examples=_LONG or 80)
@given(messages, st.data())
def test_deleted_or_extra_fields(message: SwimMessage, data: st.DataObject) -> None:
    tree = orjson.loads(encode(message))
    lists = [p for p in _paths(tree) if isinstance(_get(tree, p), list)]
    path = data.draw(st.sampled_from(lists))
    target = list(_get(tree, path))
    delete = data.draw(st.booleans())
    if target and delete:
        del target[data.draw(st.integers(0, len(target) - 1))]
    else:
        target.insert(data.draw(st.integers(0, len(target))), data.draw(json_values))
    decodes_or_refuses(orjson.dumps(_replace(tree, path, target)))


def _get(value: Any, path: tuple[int, ...]) -> Any:
    for i in path:
        value = value[i]
    return value


# --- specific refusals ------------------------------------------------------------------

GOOD_META = [["10.0.0.1:7946"], None, 0.5, [], []]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"null",
        b"{}",
        b"[]",
        b"[1]",
        b"[2,1,0,[]]",  # unknown version
        b"[1,99,0,[]]",  # unknown tag
        b"[true,1,0,[]]",  # a boolean is not a version
        b"[1,1,true,[]]",  # nor a seq
        b"[1,1,-1,[]]",
        b"[1,1,4294967296,[]]",
        b"[1,1,18446744073709551616,[]]",  # parsed as a float by orjson
        b"[1,1,1.0,[]]",
        b"[1,1,0,[],0]",  # extra field
        b"[1,1,0]",  # missing field
        b"[1,1,0,{}]",
        b'[1,3,0,"",[]]',  # empty target
        b'[1,3,0,"UPPER",[]]',
        b'[1,3,0,"a\\u0000b",[]]',
        b'[1,3,0,"node\\n",[]]',  # a trailing newline: re's $ would let it through
        b'[1,5,[[1,"a",0,[["10.0.0.1:1\\n"],null,0,[],[]]]]]',
        b"[1,6,1,[]]",  # reply flag must be a boolean
        b"[1,2,0,[[1e400],0,0,0],[]]",  # infinity
        b"[1,2,0,[[],0,0,0],[]]",  # empty vector
        b"[1,2,0,[[0.0],-1.0,0,0],[]]",  # negative height
        b'[1,2,0,[[0.0],0,0,"0"],[]]',
        b'[1,5,[[4,"a",0,"b"]]]',  # unknown update tag
        b'[1,5,[[1,"a",0,[[],null,1.5,[],[]]]]]',  # load above 1
        b'[1,5,[[1,"a",0,[["has space"],null,0,[],[]]]]]',
        b'[1,5,[[1,"a",0,[[],null,0,["sha256:00"],[]]]]]',
        b'[1,5,[[1,"a",0,[[],null,0,[],[["k","v"],["k","w"]]]]]]',  # duplicate key
        b'[1,5,[[1,"a",0,[[],null,0,[],[["k","-bad-"]]]]]]',
        b'[1,6,false,[["a",0,4,[[],null,0,[],[]]]]]',  # unknown state
        b"[1,1,0,[]] trailing",
        b"\xff\xfe[1,1,0,[]]",
        b"[" * 5000,
    ],
)
def test_specific_bad_input_is_refused(raw: bytes) -> None:
    with pytest.raises(WireError):
        decode(raw)


def test_size_limits() -> None:
    with pytest.raises(WireError, match="limit"):
        decode(b" " * (MAX_MESSAGE_SIZE + 1))
    many = [[3, f"n{i}", 0, "x"] for i in range(600)]
    with pytest.raises(WireError, match="limit"):
        decode(orjson.dumps([1, 5, many]))
    too_many_addresses = [[f"a{i}" for i in range(MAX_ADDRESSES + 1)], None, 0, [], []]
    too_many_artifacts = [[], None, 0, ["sha256:" + "0" * 64] * (MAX_ARTIFACTS + 1), []]
    too_many_labels = [[], None, 0, [], [[f"k{i}", "v"] for i in range(MAX_LABELS + 1)]]
    for meta in (too_many_addresses, too_many_artifacts, too_many_labels):
        with pytest.raises(WireError, match="limit"):
            decode(orjson.dumps([1, 5, [[1, "a", 0, meta]]]))
    assert decode(orjson.dumps([1, 5, [[1, "a", 0, GOOD_META]]])) == Gossip(
        (Alive("a", 0, MemberMeta(addresses=("10.0.0.1:7946",), load=0.5)),)
    )


def test_non_bytes_are_refused() -> None:
    with pytest.raises(WireError):
        decode("[1,1,0,[]]")  # type: ignore[arg-type]


def test_encoding_refuses_oversized_and_foreign_messages() -> None:
    huge = Sync(tuple(SyncEntry(f"n{i}", 0, MemberState.ALIVE, MemberMeta()) for i in range(3000)))
    with pytest.raises(WireError, match="limit"):
        encode(huge)
    with pytest.raises(WireError):
        encode("ping")  # type: ignore[arg-type]


def test_check_meta_and_check_name() -> None:
    check_name("node-1.zone-a")
    for bad in ("", "Node", "-a", "a" * 254, "a b", "a\n"):
        with pytest.raises(WireError):
            check_name(bad)
    with pytest.raises(WireError):
        check_meta(MemberMeta(load=float("nan")))
    with pytest.raises(WireError):
        check_meta(MemberMeta(addresses=(1,)))  # type: ignore[arg-type]
    with pytest.raises(WireError):
        check_meta("meta")  # type: ignore[arg-type]


def test_wire_error_is_a_value_error() -> None:
    assert issubclass(WireError, ValueError)
