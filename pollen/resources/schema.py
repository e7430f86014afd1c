"""JSON Schema of each kind, for editors (``pctl schema KIND``).

The schema is pydantic's, reshaped for editors such as yaml-language-server: references are
inlined (hover and completion work everywhere without ``$ref`` support), an optional field's
``anyOf: [X, null]`` becomes ``X`` with ``type: [..., "null"]``, generated titles such as
"Memorymb" are dropped, and ``apiVersion`` and ``kind`` are required, as the loader requires
them. What remains uses draft-07 keywords only, the draft editors support best.
"""

from __future__ import annotations

from typing import Any

from pollen.resources.models import API_VERSION, KIND_MODELS, resolve_kind

SCHEMA_DIALECT = "http://json-schema.org/draft-07/schema#"
SCHEMA_BASE_URL = "https://pollen.dev/schemas"


def schema_id(kind: str) -> str:
    """The ``$id`` of a kind's schema: ``https://pollen.dev/schemas/v1alpha1/workload.json``."""
    version = API_VERSION.rsplit("/", 1)[-1]
    return f"{SCHEMA_BASE_URL}/{version}/{resolve_kind(kind).lower()}.json"


def json_schema(kind: str) -> dict[str, Any]:
    """The JSON Schema of ``kind`` (any of its names: ``Workload``, ``workloads``, ``wl``).

    Raises :class:`~pollen.resources.models.UnknownKindError` for an unknown kind.
    """
    canonical = resolve_kind(kind)
    generated = KIND_MODELS[canonical].model_json_schema(by_alias=True, mode="validation")
    definitions: dict[str, Any] = generated.pop("$defs", {})
    body = _simplify(generated, definitions, depth=0)
    body.pop("title", None)
    required = [name for name in ("apiVersion", "kind") if name not in body.get("required", [])]
    body["required"] = required + list(body.get("required", []))
    return {
        "$schema": SCHEMA_DIALECT,
        "$id": schema_id(canonical),
        "title": canonical,
        **body,
    }


def _simplify(schema: Any, definitions: dict[str, Any], depth: int) -> Any:
    # The models are not recursive; the bound only guards against a future one looping here.
    if depth > 64:
        raise ValueError("schema nesting too deep; is a model recursive?")
    if isinstance(schema, list):
        return [_simplify(item, definitions, depth + 1) for item in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        target = definitions[ref.removeprefix("#/$defs/")]
        merged = {**target, **{key: value for key, value in schema.items() if key != "$ref"}}
        return _simplify(merged, definitions, depth + 1)
    result: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "title" or (key == "default" and value is None):
            continue
        if key in ("properties", "patternProperties", "$defs"):
            # Property names are data here, not keywords: a field may be called "title".
            result[key] = {
                name: _simplify(sub, definitions, depth + 1) for name, sub in value.items()
            }
        else:
            result[key] = _simplify(value, definitions, depth + 1)
    return _collapse_nullable(result)


def _collapse_nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """``{"anyOf": [{"type": "integer", ...}, {"type": "null"}]}`` -> one schema.

    Keywords such as ``minimum`` apply only to values of their own type, so the merged schema
    accepts exactly what the ``anyOf`` did.
    """
    options = schema.get("anyOf")
    if not (isinstance(options, list) and len(options) == 2 and {"type": "null"} in options):
        return schema
    other = options[0] if options[1] == {"type": "null"} else options[1]
    if not isinstance(other.get("type"), str) or set(other) & set(schema) - {"anyOf"}:
        return schema
    merged = {key: value for key, value in schema.items() if key != "anyOf"}
    merged.update(other)
    merged["type"] = [other["type"], "null"]
    if "enum" in merged and None not in merged["enum"]:
        merged["enum"] = [*merged["enum"], None]
    return merged
