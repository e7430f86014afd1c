"""Short, human phrasing of pydantic validation errors.

The manifest loader and the node's HTTP API both report bad resources through
:func:`describe_validation_error`, so ``pctl apply`` reads the same whether the mistake was caught
locally or by a node: ``spec.replicas: must be >= 0``, ``spec.bogus: unknown field``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pydantic
from pydantic_core import ErrorDetails

Loc = tuple[str | int, ...]

# A plain key is shown as ``.key``; anything else (dots, slashes, spaces) as ``["key"]`` so that a
# label key like ``app.kubernetes.io/name`` cannot be mistaken for three nested fields.
_PLAIN_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# Quoted values longer than this are shortened in messages: one field must not make a line of
# a quarter of a megabyte.
_MAX_QUOTED = 60
_LONG_QUOTED_RE = re.compile(
    rf"'(?:[^'\\]|\\.){{{_MAX_QUOTED + 1},}}'|\"(?:[^\"\\]|\\.){{{_MAX_QUOTED + 1},}}\""
)
_QUOTED_VALUE_RE = re.compile(r"'([^']*)'")

_TIMESTAMP_PATTERN_PREFIX = r"^\d{4}-\d{2}-\d{2}T"

_PHRASES: dict[str, str] = {
    "missing": "is required",
    "extra_forbidden": "unknown field",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "int_parsing_size": "is too large",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "string_type": "must be a string",
    "string_sub_type": "must be a string",
    "string_unicode": "must be valid UTF-8 text",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "dict_type": "must be a mapping",
    "mapping_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "iterable_type": "must be a list",
    "none_required": "must be null",
    "recursion_loop": "refers to itself",
}


@dataclass(frozen=True)
class FieldError:
    """One problem with one field: ``field`` is a dotted path (``spec.args[2]``), ``""`` for the
    object as a whole. ``loc`` is the raw path, used to find the field's line in a manifest."""

    field: str
    message: str
    loc: Loc = dataclasses.field(default=(), compare=False, repr=False)

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


def format_field_path(loc: Sequence[str | int]) -> str:
    """The dotted form of a pydantic ``loc``: ``("spec", "args", 2)`` -> ``spec.args[2]``."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif _PLAIN_KEY_RE.match(item):
            parts.append(f".{item}" if parts else item)
        else:
            parts.append(f"[{quote_value(item)}]")
    return "".join(parts)


def describe_validation_error(exc: pydantic.ValidationError) -> list[FieldError]:
    """Every error in ``exc`` as a field path and a short phrase, in pydantic's order."""
    return [_describe(error) for error in exc.errors(include_url=False, include_input=False)]


def _describe(error: ErrorDetails) -> FieldError:
    loc: Loc = tuple(error["loc"])
    message = _phrase(error)
    # A dict key that failed its own check: pydantic appends "[key]" to the key's location.
    if loc and loc[-1] == "[key]" and len(loc) >= 2:
        key = loc[-2]
        loc = loc[:-2]
        message = f"key {quote_value(str(key))} {message}"
    # A key that is not a string (YAML's `1:` or `on:`) where field names are expected.
    elif error["type"] == "invalid_key" and loc:
        key = loc[-1]
        loc = loc[:-1]
        message = f"key {quote_value(str(key))} must be a string"
    return FieldError(field=format_field_path(loc), message=_shorten(message), loc=loc)


def _phrase(error: ErrorDetails) -> str:
    kind = error["type"]
    ctx: dict[str, Any] = dict(error.get("ctx") or {})
    simple = _PHRASES.get(kind)
    if simple is not None:
        return simple
    if kind == "greater_than_equal":
        return f"must be >= {ctx['ge']}"
    if kind == "greater_than":
        return f"must be > {ctx['gt']}"
    if kind == "less_than_equal":
        return f"must be <= {ctx['le']}"
    if kind == "less_than":
        return f"must be < {ctx['lt']}"
    if kind == "string_too_short":
        if ctx.get("min_length") == 1:
            return "must not be empty"
        return f"must be at least {ctx.get('min_length')} characters"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} items"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} items"
    if kind in ("enum", "literal_error"):
        choices = _QUOTED_VALUE_RE.findall(str(ctx.get("expected", "")))
        if len(choices) == 1:
            return f"must be {choices[0]}"
        if choices:
            return "must be one of: " + ", ".join(choices)
    if kind == "string_pattern_mismatch":
        pattern = str(ctx.get("pattern", ""))
        if pattern == "^/":
            return "must start with /"
        if pattern.startswith(_TIMESTAMP_PATTERN_PREFIX):
            return "must be an RFC 3339 timestamp such as 2026-01-02T15:04:05Z"
        return f"must match the pattern {pattern}"
    if kind == "value_error":
        return _strip_prefix(error["msg"], "Value error, ")
    if kind == "assertion_error":
        return _strip_prefix(error["msg"], "Assertion failed, ")
    # Anything rarer: pydantic's own words, in the same voice as the rest.
    message = error["msg"]
    if message.startswith("Input should"):
        message = "must" + message[len("Input should") :]
    return message[:1].lower() + message[1:]


def _strip_prefix(message: str, prefix: str) -> str:
    return message[len(prefix) :] if message.startswith(prefix) else message


def quote_value(value: str) -> str:
    """``value`` in double quotes, escaped, and cut short if long."""
    if len(value) > _MAX_QUOTED:
        value = value[:_MAX_QUOTED] + "..."
    escaped = "".join(_escape(ch) for ch in value)
    return f'"{escaped}"'


def printable(text: str) -> str:
    """``text`` with non-printable characters escaped, so that it prints on one line."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _escape(ch: str) -> str:
    # Non-printable characters (newlines, U+2028, ...) are escaped so a message stays one line.
    if ch == '"':
        return '\\"'
    if ch.isprintable() and ch != "\\":
        return ch
    return repr(ch)[1:-1]


def _shorten(message: str) -> str:
    """Cut long quoted values inside a message and keep it on one line."""

    def cut(match: re.Match[str]) -> str:
        text = match.group(0)
        return text[: _MAX_QUOTED + 1] + "..." + text[-1]

    message = _LONG_QUOTED_RE.sub(cut, message)
    return " ".join(message.split())
