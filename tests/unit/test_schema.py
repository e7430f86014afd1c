"""JSON Schema for editors: generated for every kind, camelCase, closed, and it accepts what the
loader accepts (checked with a small validator for the keywords the schema uses)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings

from pollen.resources import (
    KIND_MODELS,
    UnknownKindError,
    from_dict,
    json_schema,
    load_paths,
    schema_id,
    to_dict,
)
from tests.unit.test_resources_models import resource_dicts

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "manifests" / "examples"

# Every keyword the generated schemas may use; anything else would be ignored by the checker
# below, so its appearance fails the test instead.
KNOWN_KEYWORDS = {
    "$schema",
    "$id",
    "title",
    "description",
    "type",
    "properties",
    "required",
    "additionalProperties",
    "propertyNames",
    "items",
    "enum",
    "const",
    "default",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
}


@pytest.mark.parametrize("kind", sorted(KIND_MODELS))
def test_every_kind_has_a_schema(kind: str) -> None:
    schema = json_schema(kind)
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["$id"] == f"https://pollen.dev/schemas/v1alpha1/{kind.lower()}.json"
    assert schema["title"] == kind
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert {"apiVersion", "kind", "metadata"} <= set(schema["required"])
    assert schema["properties"]["apiVersion"]["const"] == "pollen.dev/v1alpha1"
    assert schema["properties"]["kind"]["const"] == kind
    json.dumps(schema)  # plain JSON, printable by `pctl schema`
    for sub in _subschemas(schema):
        assert set(sub) <= KNOWN_KEYWORDS, set(sub) - KNOWN_KEYWORDS
        if "properties" in sub:
            assert sub["additionalProperties"] is False


def test_kind_names_resolve() -> None:
    assert json_schema("wl") == json_schema("Workload") == json_schema("workloads")
    assert schema_id("no") == "https://pollen.dev/schemas/v1alpha1/node.json"
    with pytest.raises(UnknownKindError):
        json_schema("pods")


def test_each_call_returns_a_fresh_schema() -> None:
    schema = json_schema("wl")
    schema["properties"].clear()
    assert json_schema("wl")["properties"]


def test_workload_schema_details() -> None:
    properties = json_schema("wl")["properties"]
    spec = properties["spec"]["properties"]
    assert spec["replicas"]["minimum"] == 0
    assert spec["replicas"]["maximum"] == 10_000
    assert spec["replicas"]["type"] == ["integer", "null"]
    assert spec["executor"]["enum"] == ["http", "command"]
    assert spec["executor"]["default"] == "http"
    assert set(spec["resources"]["properties"]) == {"memoryMB", "cpuMillis", "timeoutMs"}
    assert spec["resources"]["properties"]["memoryMB"]["minimum"] == 1
    assert "nodeSelector" in spec["placement"]["properties"]
    assert spec["placement"]["properties"]["spread"]["enum"] == ["none", "preferred", "strict"]
    assert spec["healthPath"]["pattern"] == "^/"
    assert "artifact" in properties["spec"]["required"]
    assert "readyReplicas" in properties["status"]["properties"]
    conditions = properties["status"]["properties"]["conditions"]["items"]
    assert conditions["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert "lastTransitionTime" in conditions["properties"]
    assert "title" not in spec["replicas"]  # generated titles ("Memorymb") are dropped


def test_schema_accepts_the_examples() -> None:
    loaded = load_paths([str(EXAMPLES_DIR)])
    assert loaded
    for path in sorted(EXAMPLES_DIR.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert _problems(json_schema(document["kind"]), document) == [], path


def test_schema_rejects_what_the_loader_rejects() -> None:
    document = yaml.safe_load((EXAMPLES_DIR / "hello.yaml").read_text())
    schema = json_schema("Workload")
    document["spec"]["bogus"] = 1
    document["spec"]["replicas"] = -1
    document["spec"]["executor"] = "wasi"
    del document["spec"]["artifact"]
    assert sorted(_problems(schema, document)) == [
        "spec.artifact: required",
        "spec.bogus: unknown",
        "spec.executor: not in enum",
        "spec.replicas: below minimum",
    ]


@given(resource_dicts)
@settings(deadline=None)
def test_schema_accepts_every_valid_resource(data: dict[str, Any]) -> None:
    resource = from_dict(data)
    schema = json_schema(resource.kind)
    assert _problems(schema, data) == []
    assert _problems(schema, to_dict(resource)) == []


# --- A checker for the draft-07 keywords above ------------------------------------------------

_TYPES: dict[str, Any] = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
}


def _type_ok(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def _problems(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    where = path or "(root)"
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        if not any(_type_ok(value, name) for name in names):
            return [f"{where}: wrong type"]
    problems: list[str] = []
    if "const" in schema and value != schema["const"]:
        problems.append(f"{where}: not the constant")
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: not in enum")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            problems.append(f"{where}: below minimum")
        if "maximum" in schema and value > schema["maximum"]:
            problems.append(f"{where}: above maximum")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            problems.append(f"{where}: too short")
        if len(value) > schema.get("maxLength", len(value)):
            problems.append(f"{where}: too long")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            problems.append(f"{where}: pattern")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            problems += _problems(schema["items"], item, f"{path}[{index}]")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                problems.append(f"{path + '.' if path else ''}{name}: required")
        for name, item in value.items():
            child = f"{path}.{name}" if path else name
            if name in properties:
                problems += _problems(properties[name], item, child)
            elif schema.get("additionalProperties") is False:
                problems.append(f"{child}: unknown")
            elif isinstance(schema.get("additionalProperties"), dict):
                problems += _problems(schema["additionalProperties"], item, child)
            if "propertyNames" in schema:
                problems += [
                    f"{child}: bad name" for _ in _problems(schema["propertyNames"], name, child)
                ]
    return problems


def _subschemas(schema: Any) -> list[dict[str, Any]]:
    found = [schema]
    for key in ("items", "additionalProperties", "propertyNames"):
        if isinstance(schema.get(key), dict):
            found += _subschemas(schema[key])
    for sub in schema.get("properties", {}).values():
        found += _subschemas(sub)
    return found
