"""Multi-document YAML (and JSON) manifests from files, directories and stdin.

Every problem is reported as a :class:`ManifestError` naming the file, the document, the line
and the field, like ``hello.yaml: document 2, line 7: spec.replicas: must be >= 0``. The first
problem in file order is raised; nothing from a file that has a problem is returned.

Manifests are hostile input until validated, so besides the resource rules (shared with the HTTP
API through :func:`~pollen.resources.validation.validate_object`) the loader bounds what YAML
itself can do: documents over 1 MiB, alias bombs, self-referencing aliases and nesting deep
enough to overflow the C parser's stack are rejected before they cost memory or time.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Final, NoReturn

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from pollen.resources.errors import Loc, format_field_path, printable, quote_value
from pollen.resources.models import Resource
from pollen.resources.validation import (
    MAX_DOCUMENT_BYTES,
    InvalidResource,
    check_api_version,
    validate_object,
)

__all__ = [
    "MANIFEST_SUFFIXES",
    "MAX_DOCUMENT_BYTES",
    "MAX_NESTING_DEPTH",
    "LoadedResource",
    "ManifestError",
    "SourceLocation",
    "load_bytes",
    "load_paths",
]

MANIFEST_SUFFIXES: Final = (".yaml", ".yml", ".json")
"""File name endings read from a directory (a file named explicitly is read whatever its name)."""

MAX_NESTING_DEPTH: Final = 256
"""Deepest accepted nesting of mappings and sequences; real manifests need about ten levels."""

STDIN_NAME: Final = "<stdin>"

_TAG = "tag:yaml.org,2002:"
_STR_TAG = _TAG + "str"
_SEQ_TAG = _TAG + "seq"
_MAP_TAG = _TAG + "map"
_MERGE_TAG = _TAG + "merge"
# Tags built by SafeConstructor's scalar constructors, and what their values are called.
_SCALAR_TAGS = {
    _TAG + "null": "null",
    _TAG + "bool": "boolean",
    _TAG + "int": "integer",
    _TAG + "float": "number",
    _TAG + "timestamp": "timestamp",
}

# Characters YAML 1.1 allows in a stream (c-printable). libyaml rejects the others too, but it
# reports a byte offset found while reading ahead, possibly in an earlier document; checking
# first gives an exact line.
_NOT_PRINTABLE_RE = re.compile(
    "[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
)
# A document marker: "---" or "..." at the start of a line, then a blank or the end.
_MARKER_RE = re.compile(r"^(?:---|\.\.\.)(?=[ \t\r\n]|\Z)", re.MULTILINE)
# Each level of nesting needs one of these characters of its own: "[", "{", a "-" entry,
# a "?" key or a ":" value indicator.
_NESTING_CHARS = "[{-?:"


@dataclass(frozen=True)
class SourceLocation:
    """Where a resource came from: file (``<stdin>`` for standard input), the 1-based index of
    the document within that file, and the line (1-based) where the resource starts."""

    file: str
    document: int
    line: int | None

    def describe(self) -> str:
        """``hello.yaml, document 2, line 7``."""
        where = f"{printable(self.file)}, document {self.document}"
        return f"{where}, line {self.line}" if self.line is not None else where


@dataclass(frozen=True)
class LoadedResource:
    """A validated resource and where it was defined."""

    resource: Resource
    location: SourceLocation


class ManifestError(ValueError):
    """A manifest that cannot be loaded, with as much of its position as is known.

    ``str()`` is one line: ``hello.yaml: document 2, line 7: spec.replicas: must be >= 0``.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str,
        document: int | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.document = document
        self.line = line
        self.field = field
        super().__init__(self._format())

    def _format(self) -> str:
        parts = [printable(self.file)]
        position = []
        if self.document is not None:
            position.append(f"document {self.document}")
        if self.line is not None:
            position.append(f"line {self.line}")
        if position:
            parts.append(", ".join(position))
        if self.field:
            parts.append(printable(self.field))
        parts.append(printable(" ".join(self.message.split())))
        return ": ".join(parts)

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_manifest_error,
            (self.message, self.file, self.document, self.line, self.field),
        )


def _rebuild_manifest_error(
    message: str, file: str, document: int | None, line: int | None, field: str | None
) -> ManifestError:
    return ManifestError(message, file=file, document=document, line=line, field=field)


def load_paths(
    paths: Sequence[str | os.PathLike[str]], *, stdin: BinaryIO | None = None
) -> list[LoadedResource]:
    """Load every resource from ``paths``, in order.

    A path is a file, a directory (its ``*.yaml``, ``*.yml`` and ``*.json`` files, sorted by
    name, not recursive, hidden files skipped) or ``-`` for ``stdin`` (``sys.stdin`` by
    default). Two resources with the same kind and name anywhere in the load are an error.
    Raises :class:`ManifestError` for the first problem, files read in order.
    """
    seen: dict[tuple[str, str], SourceLocation] = {}
    loaded: list[LoadedResource] = []
    for path in paths:
        for filename, data in _read_path(os.fspath(path), stdin):
            loaded.extend(_load(data, filename, seen))
    return loaded


def load_bytes(data: bytes, filename: str) -> list[LoadedResource]:
    """Load every resource from the manifest text ``data``; ``filename`` names it in errors."""
    return _load(data, filename, {})


# --- Reading --------------------------------------------------------------------------------


def _read_path(path: str, stdin: BinaryIO | None) -> Iterator[tuple[str, bytes]]:
    if path == "-":
        stream = stdin if stdin is not None else sys.stdin.buffer
        try:
            yield STDIN_NAME, stream.read()
        except OSError as exc:
            raise ManifestError(_os_message(exc), file=STDIN_NAME) from None
        return
    if os.path.isdir(path):
        try:
            names = sorted(
                entry.name
                for entry in os.scandir(path)
                # Hidden files are tool configuration (.pre-commit-config.yaml, .yamllint.yml)
                # that a git-ops folder may well hold; they are not resources.
                if not entry.name.startswith(".")
                and entry.name.lower().endswith(MANIFEST_SUFFIXES)
                and entry.is_file()
            )
        except OSError as exc:
            raise ManifestError(_os_message(exc), file=path) from None
        for name in names:
            filename = os.path.join(path, name)
            yield filename, _read_file(filename)
        return
    yield path, _read_file(path)


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise ManifestError(_os_message(exc), file=path) from None


def _os_message(exc: OSError) -> str:
    return exc.strerror.lower() if exc.strerror else str(exc)


# --- Parsing --------------------------------------------------------------------------------


class _NodeError(Exception):
    """A problem the constructor found at ``node``; turned into a ManifestError with its path."""

    def __init__(self, node: Node, message: str) -> None:
        super().__init__(message)
        self.node = node
        self.message = message


def _implicit_resolvers() -> dict[Any, list[tuple[str, re.Pattern[str]]]]:
    # Dates stay strings (the models expect RFC 3339 text, not datetime objects), and the
    # YAML 1.1 "=" value type has no safe constructor, so "=" stays a string too.
    dropped = {_TAG + "timestamp", _TAG + "value"}
    return {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in dropped]
        for first, resolvers in yaml.CSafeLoader.yaml_implicit_resolvers.items()
    }


# YAML 1.1's null and bool patterns are closed lists of words. Looking a plain scalar up here
# first leaves the regular expressions only for numbers and "<<", which start with one of a
# few characters; any other scalar is a string without trying a pattern.
_NULL_WORDS = ("", "~", "null", "Null", "NULL")
_BOOL_WORDS = [
    *("yes", "Yes", "YES", "no", "No", "NO", "on", "On", "ON", "off", "Off", "OFF"),
    *("true", "True", "TRUE", "false", "False", "FALSE"),
]
_WORDS = {word: _TAG + "null" for word in _NULL_WORDS} | {
    word: _TAG + "bool" for word in _BOOL_WORDS
}
_PATTERNS = {
    first: patterns
    for first, resolvers in _implicit_resolvers().items()
    if (patterns := [(tag, rx) for tag, rx in resolvers if tag not in _WORDS.values()])
}


class _ManifestLoader(yaml.CSafeLoader):
    """libyaml's parser with the safe constructor, made strict about what manifests contain."""

    yaml_implicit_resolvers = _implicit_resolvers()

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._checked_mappings: set[int] = set()
        self._merges = True

    def resolve(self, kind: Any, value: Any, implicit: Any) -> str:
        # Same answer as Resolver.resolve with yaml_implicit_resolvers and no path resolvers,
        # minus its generality: libyaml calls this for every node, and it was the largest
        # Python cost of loading.
        if kind is ScalarNode:
            if implicit[0]:
                word = _WORDS.get(value)
                if word is not None:
                    return word
                for tag, regexp in _PATTERNS.get(value[:1], ()):
                    if regexp.match(value):
                        return tag
            return _STR_TAG
        return _SEQ_TAG if kind is SequenceNode else _MAP_TAG

    # Path resolvers are not used; libyaml still calls these for every node, so skip the
    # bookkeeping they do in Resolver.
    def descend_resolver(self, current_node: Any, current_index: Any) -> None:
        pass

    def ascend_resolver(self) -> None:
        pass

    def to_data(self, root: Node, *, shared: bool, merges: bool) -> Any:
        """The Python value of a composed document.

        Equivalent to ``construct_document`` for the JSON-like subset manifests use, without
        its generic bookkeeping, which made it the slowest step of loading. ``shared`` says
        the document may contain aliases: their nodes are then built once and reused, as
        PyYAML does; ``merges`` that it may contain merge keys ("<<"). The recursion is as deep
        as the document, which is bounded by MAX_NESTING_DEPTH before composing.
        """
        self._checked_mappings.clear()
        self._merges = merges
        try:
            return self._build(root, {} if shared else None)
        finally:
            # construct_object (the rare path below) keeps per-document state.
            self.constructed_objects.clear()
            self.recursive_objects.clear()

    def _build(self, node: Node, built: dict[int, Any] | None) -> Any:
        kind = type(node)
        tag = node.tag
        if kind is ScalarNode:
            if tag == _STR_TAG:
                return node.value
            if tag in _SCALAR_TAGS:
                try:
                    return self.yaml_constructors[tag](self, node)
                except (ValueError, KeyError):
                    # "0x_" matches YAML 1.1's int pattern but is no number, Python refuses
                    # ints of more than 4300 digits, and "!!bool maybe" is no boolean.
                    if len(node.value) > 100:
                        raise _NodeError(node, f"too long for a {_SCALAR_TAGS[tag]}") from None
                    raise _NodeError(
                        node, f"{quote_value(node.value)} is not a valid {_SCALAR_TAGS[tag]}"
                    ) from None
        elif built is not None and id(node) in built:
            return built[id(node)]
        if isinstance(node, MappingNode) and tag == _MAP_TAG:
            mapping: dict[Any, Any] = {}
            if built is not None:
                built[id(node)] = mapping
            if self._merges and self._check_duplicates(node):
                self.flatten_mapping(node)
            for key_node, value_node in node.value:
                key = self._build(key_node, built)
                value = self._build(value_node, built)
                try:
                    mapping[key] = value
                except TypeError:
                    raise _NodeError(key_node, "a mapping key must be a scalar") from None
            # Fewer entries than pairs: a key was given twice (only possible unmerged).
            if len(mapping) != len(node.value) and id(node) not in self._checked_mappings:
                self._raise_duplicate(node, built)
            return mapping
        if isinstance(node, SequenceNode) and tag == _SEQ_TAG:
            sequence: list[Any] = []
            if built is not None:
                built[id(node)] = sequence
            sequence.extend(self._build(child, built) for child in node.value)
            return sequence
        # Explicit tags (!!str on a list, !!set, !custom): SafeConstructor decides, which for
        # a manifest means an error.
        return self.construct_object(node, deep=True)

    def _check_duplicates(self, node: MappingNode) -> bool:
        """Raise on a key given twice; return whether the mapping has merge keys ("<<").

        Only for documents that may use merge keys: a merged key may legitimately be
        overridden, so duplicates are looked for once per node, before merges are folded in.
        """
        if id(node) in self._checked_mappings:
            return False
        self._checked_mappings.add(id(node))
        has_merge = False
        first: dict[tuple[str, str], ScalarNode] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, ScalarNode):
                if key_node.tag == _MERGE_TAG:
                    has_merge = True
                key = (key_node.tag, key_node.value)
                earlier = first.setdefault(key, key_node)
                if earlier is not key_node:
                    raise _duplicate_key(key_node, earlier)
        return has_merge

    def _raise_duplicate(self, node: MappingNode, built: dict[int, Any] | None) -> NoReturn:
        first: dict[Any, Node] = {}
        for key_node, _ in node.value:
            earlier = first.setdefault(self._build(key_node, built), key_node)
            if earlier is not key_node:
                raise _duplicate_key(key_node, earlier)
        raise AssertionError("a mapping lost an entry without a duplicate key")

    def flatten_mapping(self, node: MappingNode) -> None:
        # Also reached for the targets of merge keys, which must be checked before they are
        # folded, and from construct_object.
        self._check_duplicates(node)
        super().flatten_mapping(node)

    def construct_yaml_timestamp(self, node: ScalarNode) -> Any:
        return self.construct_scalar(node)

    def construct_unsupported(self, node: Node) -> NoReturn:
        tag = str(node.tag)
        if tag.startswith(_TAG):
            tag = "!!" + tag[len(_TAG) :]
        raise _NodeError(node, f"the YAML tag {tag} is not supported")


# Explicit timestamps stay strings; binary, sets, ordered maps and unknown tags have no JSON
# equivalent, so they are errors rather than surprises further on.
_ManifestLoader.add_constructor(_TAG + "timestamp", _ManifestLoader.construct_yaml_timestamp)
for _tag in ("binary", "set", "omap", "pairs"):
    _ManifestLoader.add_constructor(_TAG + _tag, _ManifestLoader.construct_unsupported)
_ManifestLoader.add_constructor(None, _ManifestLoader.construct_unsupported)


def _duplicate_key(key_node: Node, earlier: Node) -> _NodeError:
    return _NodeError(key_node, f"duplicate key, first set on line {earlier.start_mark.line + 1}")


def _load(
    data: bytes, filename: str, seen: dict[tuple[str, str], SourceLocation]
) -> list[LoadedResource]:
    text = _decode(data, filename)
    _check_nesting(text, filename)
    loader = _ManifestLoader(text)
    # An alias needs "*"; without one no document can expand, and the check is skipped.
    may_expand = "*" in text
    may_merge = "<<" in text
    loaded: list[LoadedResource] = []
    document = 0
    try:
        while True:
            document += 1
            try:
                if not loader.check_node():
                    break
                root = loader.get_node()
            except yaml.YAMLError as exc:
                raise _syntax_error(exc, filename, document) from None
            if root is None:  # check_node said there is one; never seen, but typed so
                break
            loaded.extend(
                _load_document(loader, root, text, filename, document, may_expand, may_merge, seen)
            )
    finally:
        loader.dispose()
    return loaded


def _decode(data: bytes, filename: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ManifestError(
            f"not valid UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start}",
            file=filename,
            line=line,
        ) from None
    bad = _NOT_PRINTABLE_RE.search(text)
    if bad is not None:
        line = text.count("\n", 0, bad.start()) + 1
        raise ManifestError(
            f"character U+{ord(bad.group()):04X} is not allowed in YAML",
            file=filename,
            line=line,
        )
    return text


def _check_nesting(text: str, filename: str) -> None:
    """Reject nesting deeper than MAX_NESTING_DEPTH before libyaml's composer sees it.

    The composer recurses in C and overflows the stack (a crash, not an exception) at some
    tens of thousands of levels. Each level needs a character of _NESTING_CHARS, and no
    document spans a marker line, so if no stretch between markers holds more of them than
    the limit, nothing can nest deeper. Only when one does are the events counted exactly.
    """
    if sum(text.count(char) for char in _NESTING_CHARS) <= MAX_NESTING_DEPTH:
        return
    start = 0
    for end in [match.start() for match in _MARKER_RE.finditer(text)] + [len(text)]:
        if sum(text.count(char, start, end) for char in _NESTING_CHARS) > MAX_NESTING_DEPTH:
            _scan_nesting(text, filename)
            return
        start = end


def _scan_nesting(text: str, filename: str) -> None:
    parser = yaml.CBaseLoader(text)
    depth = 0
    document = 0
    try:
        while parser.check_event():
            event = parser.get_event()
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_NESTING_DEPTH:
                    raise ManifestError(
                        f"nested more than {MAX_NESTING_DEPTH} levels deep",
                        file=filename,
                        document=document,
                        line=event.start_mark.line + 1 if event.start_mark else None,
                    )
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            elif isinstance(event, yaml.DocumentStartEvent):
                document += 1
    except yaml.YAMLError:
        # The real parse stops at the same place, no deeper than seen here, and reports it.
        pass
    finally:
        parser.dispose()


def _syntax_error(exc: yaml.YAMLError, filename: str, document: int) -> ManifestError:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        message = str(exc.problem or "")
        if exc.context:
            message = f"{message} {exc.context}"
        return ManifestError(
            f"invalid YAML: {message}",
            file=filename,
            document=document,
            line=exc.problem_mark.line + 1,
        )
    if isinstance(exc, yaml.reader.ReaderError):
        return ManifestError(f"invalid YAML: {exc.reason}", file=filename, document=document)
    return ManifestError(f"invalid YAML: {exc}", file=filename, document=document)


def _load_document(
    loader: _ManifestLoader,
    root: Node,
    text: str,
    filename: str,
    document: int,
    may_expand: bool,
    may_merge: bool,
    seen: dict[tuple[str, str], SourceLocation],
) -> list[LoadedResource]:
    line = root.start_mark.line + 1

    def fail(message: str, loc: Loc | None = None) -> NoReturn:
        if loc is None:
            raise ManifestError(message, file=filename, document=document, line=line)
        raise ManifestError(
            message,
            file=filename,
            document=document,
            line=_line_of(root, loc),
            field=format_field_path(loc) or None,
        )

    start, end = root.start_mark.index, root.end_mark.index
    # Marks count characters; a UTF-8 character takes at most 4 bytes, so only a document
    # above a quarter of the limit needs encoding to be measured.
    if end - start > MAX_DOCUMENT_BYTES // 4 and (
        len(text[start:end].encode("utf-8")) > MAX_DOCUMENT_BYTES
    ):
        fail("the document is larger than 1 MiB")
    if may_expand:
        try:
            expanded = _expanded_size(root, MAX_DOCUMENT_BYTES)
        except _NodeError as exc:
            fail(exc.message, _path_to(root, exc.node))
        if expanded > MAX_DOCUMENT_BYTES:
            fail("YAML aliases expand the document beyond 1 MiB")

    try:
        data = loader.to_data(root, shared=may_expand, merges=may_merge)
    except _NodeError as exc:
        fail(exc.message, _path_to(root, exc.node))
    except yaml.MarkedYAMLError as exc:
        # SafeConstructor's own complaints, e.g. "!!map" on a list.
        mark = exc.problem_mark or exc.context_mark
        raise ManifestError(
            f"invalid YAML: {exc.problem or exc.context}",
            file=filename,
            document=document,
            line=mark.line + 1 if mark is not None else line,
        ) from None

    if data is None:  # an empty document, as between two "---" lines
        return []
    try:
        items = _items(data)
    except InvalidResource as exc:
        fail(exc.message, exc.loc)
    loaded: list[LoadedResource] = []
    for prefix, item in items:
        try:
            resource = validate_object(item)
        except InvalidResource as exc:
            fail(exc.message, prefix + exc.loc)
        location = SourceLocation(filename, document, _line_of(root, prefix))
        first = seen.setdefault(resource.key, location)
        if first is not location:
            fail(
                f"{resource.kind} {quote_value(resource.name)} is defined twice, "
                f"first in {first.describe()}",
                (*prefix, "metadata", "name"),
            )
        loaded.append(LoadedResource(resource, location))
    return loaded


def _items(data: Any) -> list[tuple[Loc, Any]]:
    """The objects in one document: the document itself, or the items of a ``List``.

    ``pctl get -o json`` prints several objects as ``{"kind": "List", "items": [...]}``, so
    that output can be applied again, as with kubectl.
    """
    if not (isinstance(data, dict) and data.get("kind") == "List"):
        return [((), data)]
    check_api_version(data)
    for key in data:
        if key not in ("apiVersion", "kind", "metadata", "items"):
            loc: Loc = (key if isinstance(key, str) else str(key),)
            raise InvalidResource("unknown field", field=format_field_path(loc), loc=loc)
    items = data.get("items", [])
    if not isinstance(items, list):
        raise InvalidResource("must be a list", field="items", loc=("items",))
    return [(("items", index), item) for index, item in enumerate(items)]


# --- Positions ------------------------------------------------------------------------------


def _line_of(root: Node, loc: Loc) -> int:
    """The line of the field at ``loc``, or of its nearest ancestor that exists.

    A mapping entry's line is its key's: that is where the field is named.
    """
    node = root
    line: int = root.start_mark.line + 1
    for part in loc:
        if isinstance(node, MappingNode):
            wanted = str(part)
            # After merge keys are folded in, a later entry overrides an earlier one.
            for key_node, value_node in reversed(node.value):
                if isinstance(key_node, ScalarNode) and key_node.value == wanted:
                    line = key_node.start_mark.line + 1
                    node = value_node
                    break
            else:
                return line
        elif isinstance(node, SequenceNode) and isinstance(part, int):
            if not 0 <= part < len(node.value):
                return line
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _path_to(root: Node, target: Node) -> Loc | None:
    """The field path of ``target`` (a key or a value) under ``root``, if it is reachable."""
    stack: list[tuple[Node, Loc]] = [(root, ())]
    visited: set[int] = set()
    while stack:
        node, path = stack.pop()
        if node is target:
            return path
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, MappingNode):
            for key_node, value_node in node.value:
                if not isinstance(key_node, ScalarNode):
                    if key_node is target:
                        return path
                    continue
                key: str = key_node.value
                if key_node is target:
                    return (*path, key)
                stack.append((value_node, (*path, key)))
        elif isinstance(node, SequenceNode):
            stack.extend((child, (*path, index)) for index, child in enumerate(node.value))
    return None


def _expanded_size(root: Node, limit: int) -> int:
    """About how many bytes the document takes once its aliases are expanded.

    Aliases make one node appear in many places, so ten nested aliases of ten can stand for
    ten billion nodes (the "billion laughs"). Sizes are computed once per distinct node, so
    this costs the size of the text, not of the expansion. A node that contains itself is an
    error: it has no finite expansion.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        node_id = id(node)
        if children_done:
            open_nodes.discard(node_id)
            if isinstance(node, MappingNode):
                children = [child for pair in node.value for child in pair]
            else:
                children = node.value
            size = 2 + sum(sizes[id(child)] + 2 for child in children)
            if size > limit:
                return size
            sizes[node_id] = size
            continue
        if node_id in sizes:
            continue
        if node_id in open_nodes:
            raise _NodeError(node, "a YAML alias refers to a node that contains it")
        if isinstance(node, ScalarNode):
            sizes[node_id] = len(node.value) + 2
            continue
        open_nodes.add(node_id)
        stack.append((node, True))
        if isinstance(node, MappingNode):
            stack.extend((child, False) for pair in node.value for child in pair)
        else:
            stack.extend((child, False) for child in node.value)
    return sizes[id(root)]
