"""The one place that decides whether a decoded object is an acceptable resource.

Manifests (after YAML parsing) and HTTP request bodies (after JSON decoding) both go through
:func:`validate_object`, so a resource that ``pctl apply`` accepts locally is accepted by a node,
and both reject it with the same words.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import orjson
import pydantic

from pollen.resources.errors import FieldError, Loc, describe_validation_error, quote_value
from pollen.resources.models import API_VERSION, KIND_MODELS, Resource

MAX_DOCUMENT_BYTES: Final = 1 << 20
"""Largest accepted resource: a YAML document's text, or an object's size as JSON."""

_KNOWN_KINDS = ", ".join(sorted(KIND_MODELS))
_KINDS_BY_LOWER = {kind.lower(): kind for kind in KIND_MODELS}


class InvalidResource(ValueError):
    """A decoded object that is not a valid resource.

    ``field`` is the dotted path of the first problem (``None`` when it is about the object as a
    whole), ``message`` says what is wrong with it, ``loc`` is the same path as a tuple, and
    ``errors`` lists every problem found, first one first. ``too_large`` is set when the
    object is over :data:`MAX_DOCUMENT_BYTES` (an HTTP server answers 413 rather than 422).
    """

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        loc: Loc = (),
        errors: Sequence[FieldError] = (),
        too_large: bool = False,
    ) -> None:
        self.message = message
        self.too_large = too_large
        self.field = field
        self.loc = loc
        self.errors: tuple[FieldError, ...] = tuple(errors) or (
            FieldError(field or "", message, loc),
        )
        super().__init__(f"{field}: {message}" if field else message)

    def __reduce__(self) -> tuple[Any, ...]:
        state = (self.message, self.field, self.loc, self.errors, self.too_large)
        return (_rebuild_invalid_resource, state)


def _rebuild_invalid_resource(
    message: str, field: str | None, loc: Loc, errors: tuple[FieldError, ...], too_large: bool
) -> InvalidResource:
    return InvalidResource(message, field=field, loc=loc, errors=errors, too_large=too_large)


def validate_object(data: Any) -> Resource:
    """Validate a JSON-like object into the model its ``kind`` names.

    Checks, in this order: a mapping; ``apiVersion`` present and ``pollen.dev/v1alpha1``;
    ``kind`` present and known; at most :data:`MAX_DOCUMENT_BYTES` as JSON; then every field
    (types, bounds, unknown fields). Raises :class:`InvalidResource` and nothing else.
    """
    if not isinstance(data, dict):
        raise InvalidResource(
            f"a resource must be a mapping with apiVersion, kind, metadata and spec, "
            f"not {_type_name(data)}"
        )
    check_api_version(data)
    kind = data.get("kind")
    if kind is None:
        raise InvalidResource("is required", field="kind", loc=("kind",))
    if not isinstance(kind, str):
        raise InvalidResource("must be a string", field="kind", loc=("kind",))
    model = KIND_MODELS.get(kind)
    if model is None:
        message = f"unknown kind {quote_value(kind)}; known kinds: {_KNOWN_KINDS}"
        suggestion = _KINDS_BY_LOWER.get(kind.lower())
        if suggestion is not None:
            message = f"unknown kind {quote_value(kind)}; did you mean {suggestion}?"
        raise InvalidResource(message, field="kind", loc=("kind",))
    if not fits_size_limit(data):
        raise InvalidResource("the resource is larger than 1 MiB as JSON", too_large=True)
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        errors = describe_validation_error(exc)
        first = errors[0]
        raise InvalidResource(
            first.message, field=first.field or None, loc=first.loc, errors=errors
        ) from None


def check_api_version(data: dict[Any, Any]) -> None:
    """Raise :class:`InvalidResource` unless ``data["apiVersion"]`` is the supported version."""
    api_version = data.get("apiVersion")
    if api_version is None:
        raise InvalidResource("is required", field="apiVersion", loc=("apiVersion",))
    if api_version != API_VERSION:
        shown = (
            quote_value(api_version) if isinstance(api_version, str) else _type_name(api_version)
        )
        raise InvalidResource(
            f"{shown} is not supported; only {API_VERSION} is supported",
            field="apiVersion",
            loc=("apiVersion",),
        )


def fits_size_limit(data: Any, limit: int = MAX_DOCUMENT_BYTES) -> bool:
    """Whether ``data`` serialized as JSON takes at most ``limit`` bytes."""
    try:
        # orjson is fast enough to run on every object; non-JSON values a YAML document can hold
        # (bytes, sets, integer keys) are measured through their str() form.
        size = len(orjson.dumps(data, default=str, option=orjson.OPT_NON_STR_KEYS))
    except (orjson.JSONEncodeError, TypeError, ValueError):
        # Integers beyond 64 bits or nesting deeper than orjson allows: estimate instead.
        return _estimate_size(data, limit) <= limit
    return size <= limit


def _estimate_size(data: Any, limit: int) -> int:
    """A JSON size estimate that stops counting once it passes ``limit``.

    Iterative, so deep nesting cannot overflow the stack, and bounded by ``limit``, so shared
    references cannot make it run long.
    """
    total = 0
    stack: list[Any] = [data]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, bool) or item is None:
            total += 5
        elif isinstance(item, int):
            # bit_length, not str(): str() of a huge int is slow and capped in Python 3.11.
            total += item.bit_length() * 3 // 10 + 2
        elif isinstance(item, dict):
            total += 2 + 2 * len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            total += 2 + len(item)
            stack.extend(item)
        else:
            total += 24
    return total


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__
