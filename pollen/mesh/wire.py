"""The membership protocol's messages and their codec.

This module is the vocabulary of :mod:`pollen.mesh.membership`: the frozen dataclasses the
state machine consumes and produces (``Ping``, ``Ack``, ``PingReq``, ``Nack``, ``Gossip``,
``Sync`` and the piggybacked updates ``Alive``, ``Suspect``, ``Dead``), and
:func:`encode` / :func:`decode`, which turn them into bytes and back.

Format
------
A message is one JSON array written with orjson, positional and tagged with small integers::

    [version, tag, field, ...]

    Ping     [1, 1, seq, [update, ...]]
    Ack      [1, 2, seq, coordinate | null, [update, ...]]
    PingReq  [1, 3, seq, target, [update, ...]]
    Nack     [1, 4, seq, [update, ...]]
    Gossip   [1, 5, [update, ...]]
    Sync     [1, 6, reply (true/false), [[name, incarnation, state, meta], ...]]

    update      [1, name, incarnation, meta]            Alive
                [2, name, incarnation, by]              Suspect
                [3, name, incarnation, by]              Dead
    meta        [[address, ...], coordinate | null, load, [digest, ...], [[key, value], ...]]
    coordinate  [[x, ...], height, error, adjustment]
    state       0 alive, 1 suspect, 2 dead, 3 left

Why JSON and not a binary struct: orjson parses a typical 200-byte probe in about a
microsecond, which is far below the cost of the Python validation that any format needs; the
format is readable in a packet capture and in test failures; and the positional arrays keep
it compact (a ping with nothing piggybacked is under 20 bytes, an 8-dimensional coordinate
about 220). Floats round-trip exactly (orjson writes the shortest representation).

Validation
----------
Every peer is hostile until proven otherwise (SPEC section 8). :func:`decode` refuses input
longer than :data:`MAX_MESSAGE_SIZE` before parsing it, then checks every value: types
(``true`` is not an integer), integer ranges, finite floats, string lengths and alphabets,
list lengths and the version. Any problem raises :class:`WireError` with one sentence, and
nothing else ever escapes. Plausibility that depends on configuration (the dimensionality of
a coordinate, say) is left to the consumer: a surprising but well-formed value must not make
the transport drop a whole connection.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import orjson

from pollen.mesh.vivaldi import Coordinate

PROTOCOL_VERSION: Final = 1
# Hard cap of one encoded message; Sync is paged to stay under it.
MAX_MESSAGE_SIZE: Final = 64 * 1024
MAX_SEQ: Final = 2**32 - 1
MAX_INCARNATION: Final = 2**53 - 1
MAX_NAME_LENGTH: Final = 253
MAX_ADDRESSES: Final = 8
MAX_ADDRESS_LENGTH: Final = 255
MAX_ARTIFACTS: Final = 64
MAX_LABELS: Final = 16
MAX_LABEL_KEY_LENGTH: Final = 253
MAX_DIMENSIONS: Final = 32
# Bound of any coordinate component on the wire (seconds); plausibility is Vivaldi's job.
MAX_COORDINATE_VALUE: Final = 1.0e6
MAX_UPDATES: Final = 512
MAX_SYNC_ENTRIES: Final = 4096

_NAME_RE: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_ADDRESS_RE: Final = re.compile(r"^[!-~]+$")
_DIGEST_RE: Final = re.compile(r"^sha256:[0-9a-f]{64}$")
_LABEL_KEY_RE: Final = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?$")
_LABEL_VALUE_RE: Final = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


class WireError(ValueError):
    """Bytes that are not a valid membership message, or a message that cannot be encoded."""


class MemberState(StrEnum):
    """Where a member stands in the SWIM state machine."""

    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


_STATE_CODES: Final = {
    MemberState.ALIVE: 0,
    MemberState.SUSPECT: 1,
    MemberState.DEAD: 2,
    MemberState.LEFT: 3,
}
_STATES_BY_CODE: Final = {code: state for state, code in _STATE_CODES.items()}


@dataclass(frozen=True, slots=True)
class MemberMeta:
    """The fast-changing facts a member publishes about itself, which never go in the document.

    ``addresses`` to dial it at, its Vivaldi ``coordinate``, its ``load`` (0..1), the digests
    of the ``artifacts`` it holds and a few ``labels`` as sorted ``(key, value)`` pairs.
    Bounded by :data:`MAX_ADDRESSES`, :data:`MAX_ARTIFACTS` and :data:`MAX_LABELS`;
    :func:`check_meta` tells whether a value is valid.
    """

    addresses: tuple[str, ...] = ()
    coordinate: Coordinate | None = None
    load: float = 0.0
    artifacts: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Alive:
    """``name`` is alive at ``incarnation`` and publishes ``meta``."""

    name: str
    incarnation: int
    meta: MemberMeta


@dataclass(frozen=True, slots=True)
class Suspect:
    """Member ``by`` suspects ``name`` at ``incarnation`` (it missed a probe)."""

    name: str
    incarnation: int
    by: str


@dataclass(frozen=True, slots=True)
class Dead:
    """Member ``by`` declares ``name`` dead at ``incarnation``; ``by == name`` means it left."""

    name: str
    incarnation: int
    by: str


Update = Alive | Suspect | Dead


@dataclass(frozen=True, slots=True)
class Ping:
    """A probe; the receiver answers with an :class:`Ack` carrying the same ``seq``."""

    seq: int
    piggyback: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True)
class Ack:
    """Answer to a :class:`Ping`, or an indirect probe's ack relayed by an intermediary.

    ``coordinate`` is the acking node's Vivaldi coordinate (``None`` when relayed).
    """

    seq: int
    coordinate: Coordinate | None = None
    piggyback: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True)
class PingReq:
    """Ask the receiver to probe ``target`` for us and relay the ack (or a :class:`Nack`)."""

    seq: int
    target: str
    piggyback: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True)
class Nack:
    """An intermediary could not reach the target of our :class:`PingReq` in time."""

    seq: int
    piggyback: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True)
class Gossip:
    """Updates pushed to a few random members every gossip interval."""

    updates: tuple[Update, ...]


@dataclass(frozen=True, slots=True)
class SyncEntry:
    """One member's full state in a push-pull exchange."""

    name: str
    incarnation: int
    state: MemberState
    meta: MemberMeta


@dataclass(frozen=True, slots=True)
class Sync:
    """A page of the sender's whole member table; ``reply`` asks for the receiver's in return."""

    entries: tuple[SyncEntry, ...]
    reply: bool = False


SwimMessage = Ping | Ack | PingReq | Nack | Gossip | Sync

# --- encoding ---------------------------------------------------------------------------


def _enc_coord(c: Coordinate | None) -> list[Any] | None:
    if c is None:
        return None
    return [list(c.vec), c.height, c.error, c.adjustment]


def _enc_meta(m: MemberMeta) -> list[Any]:
    return [
        list(m.addresses),
        _enc_coord(m.coordinate),
        m.load,
        list(m.artifacts),
        [[k, v] for k, v in m.labels],
    ]


def _enc_update(u: Update) -> list[Any]:
    if isinstance(u, Alive):
        return [1, u.name, u.incarnation, _enc_meta(u.meta)]
    if isinstance(u, Suspect):
        return [2, u.name, u.incarnation, u.by]
    return [3, u.name, u.incarnation, u.by]


def _enc_entry(e: SyncEntry) -> list[Any]:
    return [e.name, e.incarnation, _STATE_CODES[e.state], _enc_meta(e.meta)]


def _enc_updates(updates: tuple[Update, ...]) -> list[Any]:
    return [_enc_update(u) for u in updates]


def _to_json(message: SwimMessage) -> list[Any]:
    v = PROTOCOL_VERSION
    if isinstance(message, Ping):
        return [v, 1, message.seq, _enc_updates(message.piggyback)]
    if isinstance(message, Ack):
        return [v, 2, message.seq, _enc_coord(message.coordinate), _enc_updates(message.piggyback)]
    if isinstance(message, PingReq):
        return [v, 3, message.seq, message.target, _enc_updates(message.piggyback)]
    if isinstance(message, Nack):
        return [v, 4, message.seq, _enc_updates(message.piggyback)]
    if isinstance(message, Gossip):
        return [v, 5, _enc_updates(message.updates)]
    if isinstance(message, Sync):
        return [v, 6, message.reply, [_enc_entry(e) for e in message.entries]]
    raise WireError(f"cannot encode a {type(message).__name__}: not a membership message")


def encode(message: SwimMessage) -> bytes:
    """The bytes of ``message``; raises :class:`WireError` if it exceeds the size cap.

    The encoder trusts its input (it comes from our own state machine): a message that would
    not pass :func:`decode` is not caught here, except for its size.
    """
    try:
        data = orjson.dumps(_to_json(message))
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise WireError(f"cannot encode a {type(message).__name__}: {exc}") from None
    if len(data) > MAX_MESSAGE_SIZE:
        raise WireError(
            f"a {type(message).__name__} of {len(data)} bytes exceeds the "
            f"{MAX_MESSAGE_SIZE}-byte limit"
        )
    return data


@functools.lru_cache(maxsize=16384)
def encoded_size(update: Update) -> int:
    """Bytes ``update`` takes inside a message (the separating comma included).

    Cached: every member sizes the same updates as they spread.
    """
    return len(orjson.dumps(_enc_update(update))) + 1


@functools.lru_cache(maxsize=16384)
def encoded_entry_size(entry: SyncEntry) -> int:
    """Bytes ``entry`` takes inside a :class:`Sync` (the separating comma included)."""
    return len(orjson.dumps(_enc_entry(entry))) + 1


# --- decoding ---------------------------------------------------------------------------


def _int(value: Any, hi: int, what: str) -> int:
    if type(value) is not int or not 0 <= value <= hi:
        raise WireError(f"{what} must be an integer between 0 and {hi}")
    return value


def _float(value: Any, lo: float, hi: float, what: str) -> float:
    if type(value) is float:
        result = value
    elif type(value) is int:
        result = float(value)
    else:
        raise WireError(f"{what} must be a number")
    if not (math.isfinite(result) and lo <= result <= hi):
        raise WireError(f"{what} must be a finite number between {lo} and {hi}")
    return result


def _list(value: Any, max_len: int, what: str) -> list[Any]:
    if type(value) is not list:
        raise WireError(f"{what} must be a list")
    if len(value) > max_len:
        raise WireError(f"{what} has {len(value)} items, more than the limit of {max_len}")
    return value


def _fields(value: Any, count: int, what: str) -> list[Any]:
    if type(value) is not list or len(value) != count:
        raise WireError(f"{what} must be a list of exactly {count} fields")
    return value


def _name(value: Any, what: str) -> str:
    if type(value) is not str or not 0 < len(value) <= MAX_NAME_LENGTH:
        raise WireError(f"{what} must be a string of 1 to {MAX_NAME_LENGTH} characters")
    if not _NAME_RE.fullmatch(value):
        raise WireError(f"{what} {value[:64]!r} is not a valid node name")
    return value


def _str(value: Any, max_len: int, pattern: re.Pattern[str], what: str) -> str:
    if type(value) is not str or len(value) > max_len or not pattern.fullmatch(value):
        raise WireError(f"{what} must be a well-formed string of at most {max_len} characters")
    return value


def _dec_coord(value: Any) -> Coordinate | None:
    if value is None:
        return None
    vec_raw, height, error, adjustment = _fields(value, 4, "a coordinate")
    vec = _list(vec_raw, MAX_DIMENSIONS, "a coordinate vector")
    if not vec:
        raise WireError("a coordinate vector must not be empty")
    bound = MAX_COORDINATE_VALUE
    return Coordinate(
        vec=tuple(_float(x, -bound, bound, "a coordinate component") for x in vec),
        height=_float(height, 0.0, bound, "a coordinate height"),
        error=_float(error, 0.0, bound, "a coordinate error"),
        adjustment=_float(adjustment, -bound, bound, "a coordinate adjustment"),
    )


def _dec_meta(value: Any) -> MemberMeta:
    addresses_raw, coord, load, artifacts_raw, labels_raw = _fields(value, 5, "member meta")
    addresses = tuple(
        _str(a, MAX_ADDRESS_LENGTH, _ADDRESS_RE, "an address")
        for a in _list(addresses_raw, MAX_ADDRESSES, "the addresses")
    )
    artifacts = tuple(
        _str(d, 71, _DIGEST_RE, "an artifact digest")
        for d in _list(artifacts_raw, MAX_ARTIFACTS, "the artifacts")
    )
    labels: list[tuple[str, str]] = []
    for pair in _list(labels_raw, MAX_LABELS, "the labels"):
        key, val = _fields(pair, 2, "a label")
        labels.append(
            (
                _str(key, MAX_LABEL_KEY_LENGTH, _LABEL_KEY_RE, "a label key"),
                _str(val, 63, _LABEL_VALUE_RE, "a label value"),
            )
        )
    if len({k for k, _ in labels}) != len(labels):
        raise WireError("label keys must be unique")
    return MemberMeta(
        addresses=addresses,
        coordinate=_dec_coord(coord),
        load=_float(load, 0.0, 1.0, "the load"),
        artifacts=artifacts,
        labels=tuple(labels),
    )


def _dec_update(value: Any) -> Update:
    if type(value) is not list or len(value) != 4:
        raise WireError("an update must be a list of exactly 4 fields")
    tag, name, incarnation, last = value
    name = _name(name, "a member name")
    incarnation = _int(incarnation, MAX_INCARNATION, "an incarnation")
    if type(tag) is int and tag == 1:
        return Alive(name, incarnation, _dec_meta(last))
    if type(tag) is int and tag == 2:
        return Suspect(name, incarnation, _name(last, "the suspecting member"))
    if type(tag) is int and tag == 3:
        return Dead(name, incarnation, _name(last, "the declaring member"))
    raise WireError("an update's tag must be 1 (alive), 2 (suspect) or 3 (dead)")


def _dec_updates(value: Any) -> tuple[Update, ...]:
    return tuple(_dec_update(u) for u in _list(value, MAX_UPDATES, "the piggybacked updates"))


def _dec_entry(value: Any) -> SyncEntry:
    name, incarnation, state, meta = _fields(value, 4, "a sync entry")
    code = _int(state, 3, "a member state")
    return SyncEntry(
        name=_name(name, "a member name"),
        incarnation=_int(incarnation, MAX_INCARNATION, "an incarnation"),
        state=_STATES_BY_CODE[code],
        meta=_dec_meta(meta),
    )


def _from_json(value: Any) -> SwimMessage:
    if type(value) is not list or len(value) < 3:
        raise WireError("a membership message must be a list of at least 3 fields")
    version, tag = value[0], value[1]
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise WireError(f"unsupported membership protocol version {version!r}")
    if type(tag) is not int:
        raise WireError("the message tag must be an integer")
    if tag == 1:
        _, _, seq, pb = _fields(value, 4, "a ping")
        return Ping(_int(seq, MAX_SEQ, "seq"), _dec_updates(pb))
    if tag == 2:
        _, _, seq, coord, pb = _fields(value, 5, "an ack")
        return Ack(_int(seq, MAX_SEQ, "seq"), _dec_coord(coord), _dec_updates(pb))
    if tag == 3:
        _, _, seq, target, pb = _fields(value, 5, "a ping request")
        return PingReq(
            _int(seq, MAX_SEQ, "seq"), _name(target, "the probe target"), _dec_updates(pb)
        )
    if tag == 4:
        _, _, seq, pb = _fields(value, 4, "a nack")
        return Nack(_int(seq, MAX_SEQ, "seq"), _dec_updates(pb))
    if tag == 5:
        _, _, updates = _fields(value, 3, "a gossip message")
        return Gossip(_dec_updates(updates))
    if tag == 6:
        _, _, reply, entries = _fields(value, 4, "a sync message")
        if type(reply) is not bool:
            raise WireError("the reply flag of a sync message must be true or false")
        return Sync(
            tuple(_dec_entry(e) for e in _list(entries, MAX_SYNC_ENTRIES, "the sync entries")),
            reply,
        )
    raise WireError(f"unknown membership message tag {tag}")


def decode(data: bytes | bytearray | memoryview) -> SwimMessage:
    """Parse and validate one message; raises :class:`WireError`, and only that, if invalid."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError("a membership message must be bytes")
    if len(data) > MAX_MESSAGE_SIZE:
        raise WireError(
            f"a membership message of {len(data)} bytes exceeds the {MAX_MESSAGE_SIZE}-byte limit"
        )
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise WireError("a membership message must be valid JSON") from None
    try:
        return _from_json(value)
    except WireError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError):
        # Unreachable by construction; a safety net so that a bug never crashes a peer.
        raise WireError("a membership message is malformed") from None


def check_meta(meta: MemberMeta) -> None:
    """Raise :class:`WireError` unless ``meta`` would pass :func:`decode` on a peer."""
    if not isinstance(meta, MemberMeta):
        raise WireError("meta must be a MemberMeta")
    try:
        decoded = _dec_meta(orjson.loads(orjson.dumps(_enc_meta(meta))))
    except (TypeError, orjson.JSONEncodeError):
        raise WireError("meta holds a value of the wrong type") from None
    if decoded != meta:
        raise WireError("meta does not survive encoding (a value has the wrong type)")


def check_name(name: str) -> None:
    """Raise :class:`WireError` unless ``name`` is a valid member name on the wire."""
    _name(name, "a member name")


__all__ = [
    "MAX_MESSAGE_SIZE",
    "PROTOCOL_VERSION",
    "Ack",
    "Alive",
    "Dead",
    "Gossip",
    "MemberMeta",
    "MemberState",
    "Nack",
    "Ping",
    "PingReq",
    "Suspect",
    "SwimMessage",
    "Sync",
    "SyncEntry",
    "Update",
    "WireError",
    "check_meta",
    "check_name",
    "decode",
    "encode",
    "encoded_entry_size",
    "encoded_size",
]
