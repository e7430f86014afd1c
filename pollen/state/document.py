"""JSON-level access to the resources kept in one Automerge document.

Layout::

    ROOT
      "resources": map
        "<Kind>": map                 Workload, Replica, Artifact, Node
          "<name>": map               the resource's JSON: apiVersion, kind, metadata, spec, status

Writes are differential: only the scalars that changed are put, removed keys are deleted and lists
are replaced only when their content differs. Automerge keeps every operation forever, so writing a
whole object again for a one-field change would make the document grow with the object's size
instead of with the change.

Every document starts from the same hard-coded genesis change, which creates ``resources`` and the
four kind maps. If each node created those maps itself, two nodes' maps would be concurrent puts of
the same key: Automerge would keep one and hide everything written into the other.
"""

from __future__ import annotations

import base64
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final

from automerge import core as am

__all__ = [
    "GENESIS_CHANGE",
    "KINDS",
    "Batch",
    "DocumentError",
    "StateDocument",
]

log = logging.getLogger(__name__)

#: The kinds whose maps the genesis change creates.
KINDS: Final = ("Artifact", "Node", "Replica", "Workload")

RESOURCES: Final = "resources"

#: The first change of every state document, made once with the actor id ``pollen.genesis``
#: and timestamp 0 (see ``tests/unit/test_state_document.py``, which rebuilds it). Hard-coded
#: rather than rebuilt at run time so that every node, whatever its library version, starts
#: from a change with the same hash.
GENESIS_CHANGE: Final = bytes.fromhex(
    "856f4a83e34cbb50015f0010706f6c6c656e2e67656e65736973000001010000000701040204152a3401420256"
    "02700200010400000104017b097265736f7572636573084172746966616374044e6f6465075265706c69636108"
    "576f726b6c6f616405050005000500"
)

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_UINT64_MAX: Final = 2**64 - 1

# The JSON shape read from and written to the document.
JSONObject = dict[str, Any]


class DocumentError(Exception):
    """A value cannot be stored in, or bytes cannot be loaded as, a state document."""


def _scalar(value: object) -> tuple[am.ScalarType, Any]:
    """The Automerge scalar for a JSON scalar.

    ``bool`` is tested before ``int`` because it is a subclass of ``int``: stored as an Int, a
    ``True`` would read back as ``1`` and no longer validate as the same model.
    """
    if value is None:
        return am.ScalarType.Null, None
    if isinstance(value, bool):
        return am.ScalarType.Boolean, value
    if isinstance(value, int):
        if _INT64_MIN <= value <= _INT64_MAX:
            return am.ScalarType.Int, value
        if 0 <= value <= _UINT64_MAX:
            return am.ScalarType.Uint, value
        raise DocumentError(f"integer {value} does not fit in 64 bits")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DocumentError(f"number {value} is not finite and has no JSON form")
        return am.ScalarType.F64, value
    if isinstance(value, str):
        return am.ScalarType.Str, value
    raise DocumentError(f"a value of type {type(value).__name__} is not JSON")


def _from_scalar(scalar_type: am.ScalarType, value: Any) -> Any:
    """The JSON value of an Automerge scalar, including types only a foreign writer would use."""
    if scalar_type in (am.ScalarType.Str, am.ScalarType.F64, am.ScalarType.Boolean):
        return value
    if scalar_type in (am.ScalarType.Int, am.ScalarType.Uint, am.ScalarType.Counter):
        return int(value)
    if scalar_type == am.ScalarType.Timestamp:
        return value.isoformat()
    if scalar_type == am.ScalarType.Bytes:
        return base64.b64encode(value).decode("ascii")
    return None


def _same_scalar(current: tuple[am.ScalarType, Any], new: tuple[am.ScalarType, Any]) -> bool:
    # The type is compared too: 1, 1.0 and True are equal in Python but not in JSON.
    return current[0] == new[0] and current[1] == new[1]


class _Reader:
    """Reads JSON out of a document, optionally as of some heads."""

    def __init__(self, doc: am.Document, heads: list[bytes] | None) -> None:
        self._doc = doc
        self._heads = heads

    def child(self, obj: bytes, prop: str | int, obj_type: am.ObjType) -> bytes | None:
        found = self._doc.get(obj, prop, self._heads)
        if found is None or found[0] != obj_type:
            return None
        return found[1]

    def value(self, value: Any, obj_id: bytes) -> Any:
        if value == am.ObjType.Map:
            return self.map(obj_id)
        if value == am.ObjType.List:
            return self.list(obj_id)
        if value == am.ObjType.Text:
            return self._doc.text(obj_id, self._heads)
        scalar_type, scalar = value
        return _from_scalar(scalar_type, scalar)

    def map(self, obj: bytes) -> JSONObject:
        out: JSONObject = {}
        for key in self._doc.keys(obj, self._heads):
            found = self._doc.get(obj, key, self._heads)
            if found is not None:
                out[key] = self.value(*found)
        return out

    def list(self, obj: bytes) -> list[Any]:
        out: list[Any] = []
        for index in range(self._doc.length(obj, self._heads)):
            found = self._doc.get(obj, index, self._heads)
            if found is not None:
                out.append(self.value(*found))
        return out


class Batch:
    """Writes made inside :meth:`StateDocument.batch`: they become one Automerge change."""

    def __init__(self, doc: am.Document, tx: am.Transaction) -> None:
        self._doc = doc
        self._tx = tx
        #: Every (kind, name) written or removed so far: exactly what this batch's change can
        #: touch, which spares a caller the cost of diffing a large local change.
        self.touched: set[tuple[str, str]] = set()

    def write(self, kind: str, name: str, obj: Mapping[str, Any]) -> None:
        """Make the resource ``kind``/``name`` equal to ``obj``, writing only the differences."""
        # Validate first so that a bad value deep inside raises before anything is written.
        _check_json(obj)
        self.touched.add((kind, name))
        kind_map = self._kind_map(kind, create=True)
        assert kind_map is not None
        found = self._tx.get(kind_map, name)
        if found is None or found[0] != am.ObjType.Map:
            target = self._tx.put_object(kind_map, name, am.ObjType.Map)
            self._fill_map(target, obj)
        else:
            self._sync_map(found[1], obj)

    def remove(self, kind: str, name: str) -> bool:
        """Delete the resource ``kind``/``name``; False if it was not there."""
        kind_map = self._kind_map(kind, create=False)
        if kind_map is None or self._tx.get(kind_map, name) is None:
            return False
        self.touched.add((kind, name))
        self._tx.delete(kind_map, name)
        return True

    def _kind_map(self, kind: str, *, create: bool) -> bytes | None:
        # The genesis change made the maps of the known kinds; a document that lacks one (not
        # made by us, or a kind added later) gets it here.
        tx = self._tx
        found = tx.get(am.ROOT, RESOURCES)
        if found is None or found[0] != am.ObjType.Map:
            if not create:
                return None
            resources = tx.put_object(am.ROOT, RESOURCES, am.ObjType.Map)
        else:
            resources = found[1]
        found = tx.get(resources, kind)
        if found is None or found[0] != am.ObjType.Map:
            if not create:
                return None
            return tx.put_object(resources, kind, am.ObjType.Map)
        return found[1]

    def _sync_map(self, obj: bytes, new: Mapping[str, Any]) -> None:
        tx = self._tx
        for key in tx.keys(obj):
            if key not in new:
                tx.delete(obj, key)
        for key, value in new.items():
            found = tx.get(obj, key)
            if isinstance(value, Mapping):
                if found is not None and found[0] == am.ObjType.Map:
                    self._sync_map(found[1], value)
                else:
                    self._fill_map(tx.put_object(obj, key, am.ObjType.Map), value)
            elif isinstance(value, list | tuple):
                # A list is replaced as a whole when it differs: element-wise edits of two
                # concurrent writers would interleave into a list that neither of them wrote.
                if (
                    found is None
                    or found[0] != am.ObjType.List
                    or not _same_list(_Reader(self._doc, None).list(found[1]), value)
                ):
                    self._fill_list(tx.put_object(obj, key, am.ObjType.List), value)
            else:
                scalar = _scalar(value)
                if (
                    found is None
                    or isinstance(found[0], am.ObjType)
                    or not _same_scalar(found[0], scalar)
                ):
                    tx.put(obj, key, *scalar)

    def _fill_map(self, obj: bytes, new: Mapping[str, Any]) -> None:
        for key, value in new.items():
            self._put_new(obj, key, value)

    def _fill_list(self, obj: bytes, new: Sequence[Any]) -> None:
        tx = self._tx
        for index, value in enumerate(new):
            if isinstance(value, Mapping):
                self._fill_map(tx.insert_object(obj, index, am.ObjType.Map), value)
            elif isinstance(value, list | tuple):
                self._fill_list(tx.insert_object(obj, index, am.ObjType.List), value)
            else:
                tx.insert(obj, index, *_scalar(value))

    def _put_new(self, obj: bytes, key: str, value: Any) -> None:
        tx = self._tx
        if isinstance(value, Mapping):
            self._fill_map(tx.put_object(obj, key, am.ObjType.Map), value)
        elif isinstance(value, list | tuple):
            self._fill_list(tx.put_object(obj, key, am.ObjType.List), value)
        else:
            tx.put(obj, key, *_scalar(value))


def _check_json(value: Any) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise DocumentError(f"map key {key!r} is not a string")
            _check_json(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_json(item)
    else:
        _scalar(value)


def _same_list(current: list[Any], new: Sequence[Any]) -> bool:
    if len(current) != len(new):
        return False
    return all(_same_json(a, b) for a, b in zip(current, new, strict=True))


def _same_json(current: Any, new: Any) -> bool:
    if isinstance(new, Mapping):
        return (
            isinstance(current, dict)
            and current.keys() == new.keys()
            and all(_same_json(current[k], new[k]) for k in new)
        )
    if isinstance(new, list | tuple):
        return isinstance(current, list) and _same_list(current, new)
    return type(current) is type(new) and current == new


# --- Parsing patches ------------------------------------------------------------------------
#
# The binding exposes a Patch only through its Rust Debug representation, for example:
#
#   Patch { obj: Id(3, ActorID("fd.."), 0), path: [(Root, Map("resources")),
#           (Id(1, ActorID("fd.."), 0), Map("Workload"))], action: PutMap { key: "hello", ... } }
#
# The path leads from the root to the patched object. Only its first three keys matter here:
# "resources", the kind and the name. Anything unexpected makes the caller assume that every
# resource changed, which costs a re-read but never misses a change.

_OBJ_ID = r'(?:Root|Id\(\d+, ActorID\("[0-9a-f]*"\), \d+\))'
_RUST_STR = r'"((?:[^"\\]|\\.)*)"'
_PATCH_START = re.compile(rf"Patch \{{ obj: {_OBJ_ID}, path: \[")
_PATH_ENTRY = re.compile(rf"\({_OBJ_ID}, (?:Map\({_RUST_STR}\)|Seq\(\d+\))\)")
_ACTION = re.compile(rf"\], action: \w+ \{{ (?:key: {_RUST_STR}|prop: Map\({_RUST_STR}\))?")
# Most patches are inside one resource; this matches their first three path entries in one go.
_PATCH_IN_RESOURCE = re.compile(
    rf'Patch \{{ obj: {_OBJ_ID}, path: \[\(Root, Map\("{RESOURCES}"\)\), '
    rf"\({_OBJ_ID}, Map\({_RUST_STR}\)\), \({_OBJ_ID}, Map\({_RUST_STR}\)\)[,\]]"
)
_ESCAPE = re.compile(r"\\(u\{([0-9a-fA-F]{1,6})\}|.)")
_SIMPLE_ESCAPES: Final = {
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "0": "\0",
    "\\": "\\",
    '"': '"',
    "'": "'",
}


class _Unparsable(Exception):
    pass


def _unescape(text: str) -> str:
    """Undo Rust's ``Debug`` escaping of a string."""

    def replace(match: re.Match[str]) -> str:
        if match.group(2) is not None:
            return chr(int(match.group(2), 16))
        char = match.group(1)
        if char not in _SIMPLE_ESCAPES:
            raise _Unparsable(f"unknown escape \\{char}")
        return _SIMPLE_ESCAPES[char]

    return _ESCAPE.sub(replace, text) if "\\" in text else text


def _parse_patch(text: str) -> tuple[list[str | None], str | None]:
    """The map keys along a patch's path (None for a list index), and its action's key."""
    match = _PATCH_START.match(text)
    if match is None:
        raise _Unparsable("unexpected patch shape")
    pos = match.end()
    path: list[str | None] = []
    if not text.startswith("]", pos):
        while True:
            match = _PATH_ENTRY.match(text, pos)
            if match is None:
                raise _Unparsable("unexpected path entry")
            path.append(None if match.group(1) is None else _unescape(match.group(1)))
            pos = match.end()
            if text.startswith(", ", pos):
                pos += 2
                continue
            break
    match = _ACTION.match(text, pos)
    if match is None:
        raise _Unparsable("unexpected action")
    raw_key = match.group(1) if match.group(1) is not None else match.group(2)
    return path, None if raw_key is None else _unescape(raw_key)


class StateDocument:
    """The resources of a swarm in one Automerge document, read and written as JSON."""

    def __init__(self, doc: am.Document) -> None:
        """Wrap ``doc``; prefer :meth:`new` and :meth:`load`."""
        self._doc = doc

    @classmethod
    def new(cls, actor_id: bytes | None = None) -> StateDocument:
        """An empty document: just the genesis change."""
        return cls.load(GENESIS_CHANGE, actor_id)

    @classmethod
    def load(cls, data: bytes, actor_id: bytes | None = None) -> StateDocument:
        """A document from :meth:`save` output, optionally followed by change bytes.

        ``actor_id`` defaults to a fresh random one: an actor id must never be used by two
        processes, or they could write different changes with the same sequence number.
        """
        try:
            doc = am.Document.load(data)
        except Exception as exc:  # the binding raises plain exceptions for bad bytes
            raise DocumentError(f"cannot load the state document: {exc}") from exc
        doc.set_actor(actor_id if actor_id is not None else am.random_actor_id())
        return cls(doc)

    @property
    def automerge(self) -> am.Document:
        """The underlying document, for the sync protocol."""
        return self._doc

    @property
    def actor_id(self) -> bytes:
        """The actor id that this document's new changes carry."""
        return self._doc.get_actor()

    # --- reading ----------------------------------------------------------------------------

    def _kind_map(self, reader: _Reader, kind: str) -> bytes | None:
        resources = reader.child(am.ROOT, RESOURCES, am.ObjType.Map)
        return None if resources is None else reader.child(resources, kind, am.ObjType.Map)

    def read(self, kind: str, name: str, heads: list[bytes] | None = None) -> JSONObject | None:
        """The JSON of ``kind``/``name`` (as of ``heads`` if given), or None if absent."""
        reader = _Reader(self._doc, heads)
        kind_map = self._kind_map(reader, kind)
        if kind_map is None:
            return None
        obj = reader.child(kind_map, name, am.ObjType.Map)
        return None if obj is None else reader.map(obj)

    def names(self, kind: str, heads: list[bytes] | None = None) -> list[str]:
        """The names of the resources of ``kind``, sorted."""
        reader = _Reader(self._doc, heads)
        kind_map = self._kind_map(reader, kind)
        return [] if kind_map is None else sorted(self._doc.keys(kind_map, heads))

    def kinds(self, heads: list[bytes] | None = None) -> list[str]:
        """The kinds present in the document, sorted (at least the genesis ones)."""
        reader = _Reader(self._doc, heads)
        resources = reader.child(am.ROOT, RESOURCES, am.ObjType.Map)
        return [] if resources is None else sorted(self._doc.keys(resources, heads))

    def keys(self, heads: list[bytes] | None = None) -> set[tuple[str, str]]:
        """Every (kind, name) in the document."""
        return {(kind, name) for kind in self.kinds(heads) for name in self.names(kind, heads)}

    # --- writing ----------------------------------------------------------------------------

    @contextmanager
    def batch(self) -> Iterator[Batch]:
        """A context in which writes become a single change; an exception discards them all."""
        with self._doc.transaction() as tx:
            yield Batch(self._doc, tx)

    def write(self, kind: str, name: str, obj: Mapping[str, Any]) -> None:
        """Make ``kind``/``name`` equal to ``obj`` in a change of its own."""
        with self.batch() as batch:
            batch.write(kind, name, obj)

    def remove(self, kind: str, name: str) -> bool:
        """Delete ``kind``/``name`` in a change of its own; False if it was not there."""
        with self.batch() as batch:
            return batch.remove(kind, name)

    def merge(self, other: StateDocument) -> None:
        """Take in every change of ``other`` that this document lacks."""
        self._doc.merge(other._doc)

    # --- history ----------------------------------------------------------------------------

    def heads(self) -> list[bytes]:
        """The hashes of the latest changes; a position in history to diff against."""
        return self._doc.get_heads()

    def changes_since(self, heads: Sequence[bytes]) -> bytes:
        """The concatenated bytes of every change made after ``heads``, oldest first."""
        return b"".join(change.bytes for change in self._doc.get_changes(list(heads)))

    def save(self) -> bytes:
        """The whole document, compressed, with its history."""
        return self._doc.save()

    def touched(
        self, before: Sequence[bytes], after: Sequence[bytes] | None = None
    ) -> set[tuple[str, str]]:
        """The (kind, name) of every resource that may differ between two points in history.

        Works for any movement of the heads (local writes, merged or synced remote changes).
        It may report a resource whose content ended up equal, never miss one that changed.
        """
        before_heads = list(before)
        after_heads = self.heads() if after is None else list(after)
        if sorted(before_heads) == sorted(after_heads):
            return set()
        touched: set[tuple[str, str]] = set()
        whole_kinds: set[str] = set()
        try:
            for patch in self._doc.diff(before_heads, after_heads):
                self._touched_by(repr(patch), touched, whole_kinds)
        except _Unparsable as exc:
            log.warning("cannot parse a document patch (%s); assuming every resource changed", exc)
            return self.keys(before_heads) | self.keys(after_heads)
        for kind in whole_kinds:
            for heads in (before_heads, after_heads):
                touched.update((kind, name) for name in self.names(kind, heads))
        return touched

    @staticmethod
    def _touched_by(text: str, touched: set[tuple[str, str]], whole_kinds: set[str]) -> None:
        match = _PATCH_IN_RESOURCE.match(text)
        if match is not None:
            touched.add((_unescape(match.group(1)), _unescape(match.group(2))))
            return
        path, key = _parse_patch(text)
        if not path:
            # A patch of the root: only the "resources" key matters, and then all of it.
            if key is None:
                raise _Unparsable("root patch without a key")
            if key == RESOURCES:
                raise _Unparsable("the resources map itself was replaced")
            return
        if path[0] != RESOURCES:
            return
        if len(path) == 1:
            # A kind map itself was put or deleted.
            if key is None:
                raise _Unparsable("patch of the resources map without a key")
            whole_kinds.add(key)
        elif len(path) == 2:
            kind = path[1]
            if kind is None:
                raise _Unparsable("list index where a kind was expected")
            if key is None:
                whole_kinds.add(kind)
            else:
                touched.add((kind, key))
        else:
            kind, name = path[1], path[2]
            if kind is None or name is None:
                raise _Unparsable("list index where a kind or name was expected")
            touched.add((kind, name))
