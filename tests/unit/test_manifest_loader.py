"""Manifest loading: every bad input gives one clear line with file, document, line and field."""

from __future__ import annotations

import copy
import io
import json
import pickle
import textwrap
import time
from pathlib import Path
from typing import Any

import orjson
import pydantic
import pytest
import yaml
import yaml.resolver
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from yaml.nodes import ScalarNode

from pollen.resources import (
    API_VERSION,
    MAX_DOCUMENT_BYTES,
    FieldError,
    InvalidResource,
    LoadedResource,
    ManifestError,
    SourceLocation,
    Workload,
    WorkloadSpec,
    describe_validation_error,
    from_dict,
    load_bytes,
    load_paths,
    to_dict,
    validate_object,
)
from pollen.resources.loader import _ManifestLoader
from tests.unit.test_resources_models import resource_dicts

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "manifests" / "examples"

HELLO = """\
apiVersion: pollen.dev/v1alpha1
kind: Workload
metadata:
  name: hello
spec:
  artifact: hello
  replicas: 2
"""


def load(text: str, filename: str = "hello.yaml") -> list[LoadedResource]:
    return load_bytes(textwrap.dedent(text).encode(), filename)


def error_of(text: str | bytes, filename: str = "hello.yaml") -> ManifestError:
    data = textwrap.dedent(text).encode() if isinstance(text, str) else text
    with pytest.raises(ManifestError) as info:
        load_bytes(data, filename)
    return info.value


def workload(name: str = "hello", **spec: Any) -> str:
    lines = [
        "apiVersion: pollen.dev/v1alpha1",
        "kind: Workload",
        "metadata:",
        f"  name: {name}",
        "spec:",
        "  artifact: hello",
    ]
    lines += [f"  {key}: {json.dumps(value)}" for key, value in spec.items()]
    return "\n".join(lines) + "\n"


# --- What loads -------------------------------------------------------------------------------


def test_loads_one_workload_with_its_location() -> None:
    [loaded] = load(HELLO)
    assert isinstance(loaded.resource, Workload)
    assert loaded.resource.spec.replicas == 2
    assert loaded.location == SourceLocation("hello.yaml", 1, 1)


def test_documents_are_numbered_within_the_file_and_empty_ones_skipped() -> None:
    text = "---\n" + workload("a") + "---\n---\n# only a comment\n---\n" + workload("b") + "...\n"
    loaded = load(text)
    assert [item.resource.name for item in loaded] == ["a", "b"]
    assert [item.location.document for item in loaded] == [1, 4]
    assert [item.location.line for item in loaded] == [2, 12]


def test_json_is_yaml() -> None:
    data = orjson.dumps(
        {
            "apiVersion": API_VERSION,
            "kind": "Workload",
            "metadata": {"name": "hello"},
            "spec": {"artifact": "hello", "resources": {"memoryMB": 16}},
        },
        option=orjson.OPT_INDENT_2,
    )
    [loaded] = load_bytes(data, "hello.json")
    assert isinstance(loaded.resource, Workload)
    assert loaded.resource.spec.resources.memory_mb == 16


def test_json_errors_have_lines_too() -> None:
    data = b'{\n  "apiVersion": "pollen.dev/v1alpha1",\n  "kind": "Workload",\n'
    data += b'  "metadata": {"name": "hello"},\n  "spec": {\n    "artifact": "a",\n'
    data += b'    "replicas": "many"\n  }\n}\n'
    assert str(error_of(data, "hello.json")) == (
        "hello.json: document 1, line 7: spec.replicas: must be an integer"
    )


def test_a_list_loads_as_its_items() -> None:
    # What `pctl get workloads -o json` prints can be applied again.
    items = [json.loads(json.dumps(to_dict(from_dict(yaml.safe_load(workload(n)))))) for n in "ab"]
    data = json.dumps({"apiVersion": API_VERSION, "kind": "List", "items": items}, indent=2)
    loaded = load_bytes(data.encode(), "list.json")
    assert [item.resource.name for item in loaded] == ["a", "b"]
    assert loaded[1].location.line > loaded[0].location.line > 1
    items[1]["spec"]["replicas"] = -1
    data = json.dumps({"apiVersion": API_VERSION, "kind": "List", "items": items}, indent=2)
    message = str(error_of(data.encode(), "list.json"))
    assert "items[1].spec.replicas: must be >= 0" in message


def test_list_envelope_is_checked() -> None:
    assert "apiVersion: is required" in str(error_of("kind: List\nitems: []\n"))
    assert "items: must be a list" in str(
        error_of(f"apiVersion: {API_VERSION}\nkind: List\nitems: {{}}\n")
    )
    assert "bogus: unknown field" in str(
        error_of(f"apiVersion: {API_VERSION}\nkind: List\nitems: []\nbogus: 1\n")
    )


def test_status_is_accepted_and_validated() -> None:
    [loaded] = load(HELLO + "status:\n  readyReplicas: 1\n")
    assert isinstance(loaded.resource, Workload)
    assert loaded.resource.status.ready_replicas == 1
    error = error_of(HELLO + "status:\n  readyReplicas: -1\n")
    assert str(error) == "hello.yaml: document 1, line 9: status.readyReplicas: must be >= 0"


def test_timestamps_stay_strings() -> None:
    text = HELLO.replace(
        "  name: hello\n", "  name: hello\n  creationTimestamp: 2026-01-02T03:04:05Z\n"
    )
    [loaded] = load(text)
    assert loaded.resource.metadata.creation_timestamp == "2026-01-02T03:04:05Z"
    # A bare date is a string too, so the error is about its format, not its type.
    error = error_of(text.replace("2026-01-02T03:04:05Z", "2026-01-02"))
    assert error.field == "metadata.creationTimestamp"
    assert "RFC 3339" in error.message
    [loaded] = load(HELLO.replace("  replicas: 2\n", "  replicas: 2\n  args: [2026-01-02]\n"))
    assert isinstance(loaded.resource, Workload)
    assert loaded.resource.spec.args == ["2026-01-02"]


def test_anchors_and_merge_keys_work() -> None:
    text = """\
        apiVersion: pollen.dev/v1alpha1
        kind: Workload
        metadata:
          name: hello
          labels: &labels {app: hello, tier: web}
        spec:
          artifact: hello
          placement:
            nodeSelector: *labels
          resources:
            <<: {memoryMB: 16, cpuMillis: 50}
            memoryMB: 32
        """
    [loaded] = load(text)
    assert isinstance(loaded.resource, Workload)
    assert loaded.resource.spec.placement.node_selector == {"app": "hello", "tier": "web"}
    assert loaded.resource.spec.resources.memory_mb == 32  # a key overrides what it merges
    assert loaded.resource.spec.resources.cpu_millis == 50


def test_utf8_bom_and_crlf_line_ends() -> None:
    [loaded] = load_bytes(b"\xef\xbb\xbf" + HELLO.replace("\n", "\r\n").encode(), "bom.yaml")
    assert loaded.resource.name == "hello"


# --- Bad input: one line naming file, document, line and field ------------------------------


def test_the_example_message_from_the_contract() -> None:
    text = workload("first") + "---\n" + workload("hello", replicas=-1)
    error = error_of(text)
    # Lines count from the top of the file, as editors number them.
    assert str(error) == "hello.yaml: document 2, line 14: spec.replicas: must be >= 0"
    assert (error.file, error.document, error.line) == ("hello.yaml", 2, 14)
    assert (error.field, error.message) == ("spec.replicas", "must be >= 0")


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ({"replicas": "many"}, "spec.replicas", "must be an integer"),
        ({"replicas": 1.5}, "spec.replicas", "must be an integer"),
        ({"replicas": 20000}, "spec.replicas", "must be <= 10000"),
        ({"executor": "wasi"}, "spec.executor", "must be one of: http, command"),
        ({"bogus": 1}, "spec.bogus", "unknown field"),
        ({"env": {"PORT": 8080}}, "spec.env.PORT", "must be a string"),
        ({"env": {"1X": "a"}}, "spec.env", "environment variable name '1X' is not valid"),
        ({"args": ["a", 2]}, "spec.args[1]", "must be a string"),
        ({"args": "a b"}, "spec.args", "must be a list"),
        ({"resources": 5}, "spec.resources", "must be a mapping"),
        ({"resources": {"memoryMB": 0}}, "spec.resources.memoryMB", "must be >= 1"),
        ({"placement": {"spread": "maybe"}}, "spec.placement.spread", "must be one of: none, "),
        ({"healthPath": "healthz"}, "spec.healthPath", "must start with /"),
        ({"priority": 5000}, "spec.priority", "must be <= 1000"),
        ({"budget": {"maxInstances": -1}}, "spec.budget.maxInstances", "must be >= 0"),
        (
            {"replicas": 1, "minReplicas": 1},
            "spec",
            "give either replicas or minReplicas/maxReplicas, not both",
        ),
    ],
)
def test_field_errors(spec: dict[str, Any], field: str, message: str) -> None:
    text = workload("hello", **spec)
    error = error_of(text)
    assert error.field == field
    assert error.message.startswith(message)
    assert str(error).startswith("hello.yaml: document 1, line ")
    lines = text.splitlines()
    key = field.split(".")[-1].split("[")[0]
    assert key in lines[error.line - 1] if error.line else False


def test_empty_artifact() -> None:
    error = error_of(HELLO.replace("artifact: hello", "artifact: ''"))
    assert str(error) == "hello.yaml: document 1, line 6: spec.artifact: must not be empty"


def test_missing_field_points_at_its_parent() -> None:
    error = error_of(HELLO.replace("  artifact: hello\n", ""))
    assert str(error) == "hello.yaml: document 1, line 5: spec.artifact: is required"


def test_line_of_a_list_item() -> None:
    text = HELLO + "  args:\n    - a\n    - b\n    - 3\n"
    assert str(error_of(text)) == "hello.yaml: document 1, line 11: spec.args[2]: must be a string"


def test_bad_name() -> None:
    error = error_of(HELLO.replace("name: hello", "name: Hello_World"))
    assert error.field == "metadata.name"
    assert error.line == 4
    assert "lowercase DNS name" in error.message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kind: Workload\n", "hello.yaml: document 1, line 1: apiVersion: is required"),
        (
            "apiVersion: pollen.dev/v1alpha1\n",
            "hello.yaml: document 1, line 1: kind: is required",
        ),
        (
            "apiVersion: v1\nkind: Workload\n",
            'hello.yaml: document 1, line 1: apiVersion: "v1" is not supported; '
            "only pollen.dev/v1alpha1 is supported",
        ),
        (
            "apiVersion: pollen.dev/v1alpha1\nkind: Pod\n",
            'hello.yaml: document 1, line 2: kind: unknown kind "Pod"; '
            "known kinds: Artifact, Node, Replica, TrustPolicy, Workload",
        ),
        (
            "apiVersion: pollen.dev/v1alpha1\nkind: workload\n",
            'hello.yaml: document 1, line 2: kind: unknown kind "workload"; did you mean Workload?',
        ),
        (
            "apiVersion: pollen.dev/v1alpha1\nkind: [Workload]\n",
            "hello.yaml: document 1, line 2: kind: must be a string",
        ),
        (
            "- apiVersion: pollen.dev/v1alpha1\n",
            "hello.yaml: document 1, line 1: a resource must be a mapping with apiVersion, "
            "kind, metadata and spec, not a list",
        ),
        (
            "just text\n",
            "hello.yaml: document 1, line 1: a resource must be a mapping with apiVersion, "
            "kind, metadata and spec, not a string",
        ),
    ],
)
def test_envelope_errors(text: str, expected: str) -> None:
    assert str(error_of(text)) == expected


def test_duplicate_keys() -> None:
    text = HELLO + "  replicas: 3\n"
    assert str(error_of(text)) == (
        "hello.yaml: document 1, line 8: spec.replicas: duplicate key, first set on line 7"
    )
    # Keys spelled differently that mean the same are duplicates too.
    assert "duplicate key" in str(error_of('a: 1\n"a": 2\n'))


def test_duplicate_resources_in_one_file() -> None:
    error = error_of(workload("a") + "---\n" + workload("b") + "---\n" + workload("a"))
    assert str(error) == (
        'hello.yaml: document 3, line 18: metadata.name: Workload "a" is defined twice, '
        "first in hello.yaml, document 1, line 1"
    )


def test_same_name_of_different_kinds_is_fine() -> None:
    artifact = (
        "apiVersion: pollen.dev/v1alpha1\nkind: Artifact\nmetadata: {name: hello}\n"
        f"spec: {{digest: 'sha256:{'0' * 64}', size: 1}}\n"
    )
    assert len(load(HELLO + "---\n" + artifact)) == 2


def test_duplicate_resources_across_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(workload("x"))
    (tmp_path / "b.yaml").write_text(workload("y") + "---\n" + workload("x"))
    with pytest.raises(ManifestError) as info:
        load_paths([str(tmp_path)])
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert str(info.value) == (
        f'{b}: document 2, line 11: metadata.name: Workload "x" is defined twice, '
        f"first in {a}, document 1, line 1"
    )


def test_document_over_one_mebibyte() -> None:
    filler = "    - " + "x" * 1000 + "\n"
    text = HELLO + "  args:\n" + filler * (MAX_DOCUMENT_BYTES // len(filler) + 1)
    assert str(error_of(workload("a") + "---\n" + text)) == (
        "hello.yaml: document 2, line 8: the document is larger than 1 MiB"
    )
    # Just under the limit is fine.
    under = HELLO + "  args:\n" + filler * (MAX_DOCUMENT_BYTES // len(filler) - 2)
    assert len(load(under)) == 1


def test_document_size_counts_bytes_not_characters() -> None:
    filler = "    - " + "é" * 500 + "\n"  # 1,000 bytes of text in 500 characters
    text = HELLO + "  args:\n" + filler * (MAX_DOCUMENT_BYTES // 1000 + 2)
    assert "larger than 1 MiB" in str(error_of(text))


def test_not_utf8_names_the_byte_offset() -> None:
    data = HELLO.encode().replace(b"artifact: hello", b"artifact: hel\xfflo")
    offset = data.index(b"\xff")
    assert str(error_of(data)) == (
        f"hello.yaml: line 6: not valid UTF-8: byte 0xff at offset {offset}"
    )


def test_control_characters() -> None:
    data = HELLO.encode().replace(b"artifact: hello", b"artifact: hel\x07lo")
    assert str(error_of(data)) == "hello.yaml: line 6: character U+0007 is not allowed in YAML"


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("a: 1\nb: [\n", 3, "did not find expected node content"),
        ("a: b: c\n", 1, "mapping values are not allowed in this context"),
        ('a: "open\n', 2, "found unexpected end of stream"),
        ("a: *nowhere\n", 1, "found undefined alias"),
        ("a:\n  - 1\n b: 2\n", 3, "did not find expected key"),
        ("- a\nb: c\n", 2, "did not find expected '-' indicator"),
        ("\ta: 1\n", 1, "found character that cannot start any token"),
    ],
)
def test_malformed_yaml(text: str, line: int, words: str) -> None:
    error = error_of(workload("first") + "---\n" + text)
    assert error.document == 2
    assert error.line == line + 7
    assert error.message.startswith("invalid YAML: ")
    assert words in error.message


def test_billion_laughs_is_rejected_quickly() -> None:
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for this, previous in zip("bcdefghi", "abcdefgh", strict=True):
        text += f"{this}: &{this} [" + ",".join([f"*{previous}"] * 9) + "]\n"
    started = time.monotonic()
    assert str(error_of(text)) == (
        "hello.yaml: document 1, line 1: YAML aliases expand the document beyond 1 MiB"
    )
    assert time.monotonic() - started < 2


def test_alias_of_a_long_string_counts_its_length() -> None:
    text = "a: &a " + "x" * 60_000 + "\nb: [" + ", ".join(["*a"] * 20) + "]\n"
    assert "beyond 1 MiB" in str(error_of(text))


def test_self_referencing_alias() -> None:
    assert str(error_of(HELLO + "  args: &a [*a]\n")) == (
        "hello.yaml: document 1, line 8: spec.args: a YAML alias refers to a node that contains it"
    )


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, "- " * 100_000 + "x\n"])
def test_deep_nesting_is_an_error_not_a_crash(text: str) -> None:
    # libyaml's composer recurses in C: this depth would overflow the stack and kill the process.
    assert str(error_of(text)) == "hello.yaml: document 1, line 1: nested more than 256 levels deep"


def test_many_nesting_characters_without_depth_load() -> None:
    args = "".join(f"    - '[{i}]: -?'\n" for i in range(2000))
    [loaded] = load(HELLO + "  args:\n" + args)
    assert isinstance(loaded.resource, Workload)
    assert len(loaded.resource.spec.args) == 2000


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("!!binary aGVsbG8=", "the YAML tag !!binary is not supported"),
        ("!!set {a, b}", "the YAML tag !!set is not supported"),
        ("!custom x", "the YAML tag !custom is not supported"),
        ("!!python/name:os.system x", "the YAML tag !!python/name:os.system is not supported"),
        ("!!int [1]", "invalid YAML: expected a scalar node, but found sequence"),
        ("0x_", '"0x_" is not a valid integer'),
        ("!!bool maybe", '"maybe" is not a valid boolean'),
        ("9" * 5000, "too long for a integer"),
    ],
)
def test_odd_yaml_values(value: str, message: str) -> None:
    error = error_of(HELLO.replace("replicas: 2", f"replicas: {value}"))
    assert error.message == message
    assert error.line == 7
    if not message.startswith("invalid YAML"):
        assert error.field == "spec.replicas"


@given(
    st.sampled_from(
        [
            *("", "~", "null", "NULL", "yes", "No", "on", "OFF", "true", "False", "y", "n"),
            *("0", "-1", "+1", "0x1F", "0o17", "017", "0b101", "1_000", "1:30", "190:20:30"),
            *(".5", "1.5e+3", "1e3", ".inf", "-.Inf", ".NaN", "<<", "=", "2026-01-02", "a"),
        ]
    )
    | st.text(alphabet="0123456789-+._:eExXoObB<=~nNuUlLyYsStTfF ", max_size=12)
)
def test_fast_resolver_agrees_with_pyyaml(value: str) -> None:
    ours = _ManifestLoader("").resolve(ScalarNode, value, (True, False))
    theirs = yaml.resolver.Resolver().resolve(ScalarNode, value, (True, False))
    if theirs in ("tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value"):
        theirs = "tag:yaml.org,2002:str"  # deliberately strings here
    assert ours == theirs
    quoted = _ManifestLoader("").resolve(ScalarNode, value, (False, True))
    assert quoted == "tag:yaml.org,2002:str"


def test_equals_sign_is_a_plain_string() -> None:
    # YAML 1.1's "=" value type has no safe constructor; PyYAML alone would fail on it.
    [loaded] = load(HELLO + "  args: [=]\n")
    assert isinstance(loaded.resource, Workload)
    assert loaded.resource.spec.args == ["="]


def test_first_error_in_file_order_wins() -> None:
    text = workload("a", replicas=-1) + "---\n" + workload("b", bogus=1)
    assert error_of(text).document == 1
    error = error_of(HELLO.replace("name: hello", "name: BAD") + "  bogus: 1\n")
    assert error.field == "metadata.name"


def test_error_lines_stay_one_line() -> None:
    text = HELLO.replace("replicas: 2", 'env: {"A\\nB": x}')
    message = str(error_of(text, "we\nird.yaml"))
    assert "\n" not in message
    assert message.startswith("we\\nird.yaml: document 1, line 7: spec.env: ")


def test_long_values_are_cut_short_in_messages() -> None:
    text = HELLO.replace("name: hello", "name: hello\n  labels: {a: " + "b " * 5000 + "}")
    message = str(error_of(text))
    assert len(message) < 300
    assert "metadata.labels" in message


def test_manifest_error_pickles() -> None:
    error = error_of(workload("hello", replicas=-1))
    copied = pickle.loads(pickle.dumps(error))
    assert str(copied) == str(error)
    assert (copied.file, copied.document, copied.line, copied.field) == (
        error.file,
        error.document,
        error.line,
        error.field,
    )


# --- Paths, directories, stdin ----------------------------------------------------------------


def test_directory_is_read_sorted_and_only_manifests(tmp_path: Path) -> None:
    (tmp_path / "b.yml").write_text(workload("b"))
    (tmp_path / "a.yaml").write_text(workload("a"))
    (tmp_path / "c.json").write_text(json.dumps(yaml.safe_load(workload("c"))))
    (tmp_path / "notes.txt").write_text("not yaml: [")
    (tmp_path / ".pre-commit-config.yaml").write_text("repos: []\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.yaml").write_text(workload("d"))
    loaded = load_paths([str(tmp_path)])
    assert [item.resource.name for item in loaded] == ["a", "b", "c"]
    assert loaded[1].location.file == str(tmp_path / "b.yml")


def test_files_and_stdin_in_order(tmp_path: Path) -> None:
    path = tmp_path / "one.yaml"
    path.write_text(workload("one"))
    stdin = io.BytesIO(workload("two").encode())
    loaded = load_paths([str(path), "-"], stdin=stdin)
    assert [item.resource.name for item in loaded] == ["one", "two"]
    assert loaded[1].location == SourceLocation("<stdin>", 1, 1)


def test_stdin_errors_name_stdin() -> None:
    with pytest.raises(ManifestError) as info:
        load_paths(["-"], stdin=io.BytesIO(workload("x", replicas=-1).encode()))
    assert str(info.value).startswith("<stdin>: document 1, line 7: spec.replicas:")


def test_a_named_file_is_read_whatever_its_name(tmp_path: Path) -> None:
    path = tmp_path / "manifest.txt"
    path.write_text(HELLO)
    assert len(load_paths([path])) == 1


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ManifestError) as info:
        load_paths([str(missing)])
    assert str(info.value) == f"{missing}: no such file or directory"


def test_empty_directory_and_file(tmp_path: Path) -> None:
    assert load_paths([str(tmp_path)]) == []
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    assert load_paths([str(tmp_path)]) == []


def test_example_manifests_load() -> None:
    loaded = load_paths([str(EXAMPLES_DIR)])
    by_name = {item.resource.name: item.resource for item in loaded}
    assert sorted(by_name) == ["cpu", "echo", "hello"]
    hello, echo, cpu = by_name["hello"], by_name["echo"], by_name["cpu"]
    assert isinstance(hello, Workload) and isinstance(echo, Workload) and isinstance(cpu, Workload)
    assert hello.spec.artifact == "hello"
    assert hello.spec.executor == "http"
    assert hello.spec.replicas == 2
    assert hello.spec.placement.spread == "preferred"
    assert echo.spec.replicas == 1
    assert cpu.spec.executor == "command"
    assert cpu.spec.args


def test_a_thousand_documents() -> None:
    text = "---\n".join(workload(f"w-{index}", replicas=index % 5) for index in range(1000))
    loaded = load(text)
    assert len(loaded) == 1000
    assert loaded[-1].location == SourceLocation("hello.yaml", 1000, 7 * 999 + 999 + 1)


# --- validate_object, shared with the HTTP API -----------------------------------------------


def test_validate_object_accepts_a_resource() -> None:
    resource = validate_object(yaml.safe_load(HELLO))
    assert isinstance(resource, Workload)


def test_validate_object_errors() -> None:
    data = yaml.safe_load(HELLO)
    data["spec"]["replicas"] = -1
    data["spec"]["bogus"] = True
    with pytest.raises(InvalidResource) as info:
        validate_object(data)
    assert (info.value.field, info.value.message) == ("spec.replicas", "must be >= 0")
    assert str(info.value) == "spec.replicas: must be >= 0"
    assert info.value.errors == (
        FieldError("spec.replicas", "must be >= 0"),
        FieldError("spec.bogus", "unknown field"),
    )
    assert not info.value.too_large


def test_validate_object_size_cap() -> None:
    data = yaml.safe_load(HELLO)
    data["spec"]["args"] = ["x" * 1000] * 1100
    with pytest.raises(InvalidResource) as info:
        validate_object(data)
    assert info.value.too_large
    assert info.value.field is None
    assert "1 MiB" in info.value.message


def test_validate_object_handles_values_orjson_cannot_encode() -> None:
    data = yaml.safe_load(HELLO)
    data["spec"]["replicas"] = 10**30
    with pytest.raises(InvalidResource, match="must be <= 10000"):
        validate_object(data)
    nested: Any = "x"
    for _ in range(300):
        nested = [nested]
    data["spec"]["replicas"] = 1
    data["spec"]["args"] = nested
    with pytest.raises(InvalidResource, match=r"spec.args\[0\]: must be a string"):
        validate_object(data)


def test_invalid_resource_pickles() -> None:
    with pytest.raises(InvalidResource) as info:
        validate_object({"apiVersion": API_VERSION})
    copied = pickle.loads(pickle.dumps(info.value))
    assert (copied.field, copied.message, copied.errors) == (
        info.value.field,
        info.value.message,
        info.value.errors,
    )


def test_describe_validation_error_phrases() -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        WorkloadSpec.model_validate(
            {
                "artifact": "x" * 5000,
                "priority": 2000,
                "executor": "x",
                "env": {"A": ["b"]},
                "budget": {"maxInstances": "lots"},
                "args": [None],
                "placement": {"nodeSelector": {"a b": "c"}},
                "extra": 1,
            }
        )
    described = {error.field: error.message for error in describe_validation_error(info.value)}
    assert described == {
        "artifact": "must be at most 4096 characters",
        "priority": "must be <= 1000",
        "executor": "must be one of: http, command",
        "env.A": "must be a string",
        "budget.maxInstances": "must be an integer",
        "args[0]": "must be a string",
        "placement.nodeSelector": "label key 'a b' is not a valid label key",
        "extra": "unknown field",
    }


def test_keys_that_are_not_strings() -> None:
    error = error_of(HELLO + "  1: one\n")
    assert str(error) == 'hello.yaml: document 1, line 5: spec: key "1" must be a string'
    error = error_of(HELLO + "  env: {1: one}\n")
    assert str(error) == 'hello.yaml: document 1, line 8: spec.env: key "1" must be a string'


def test_field_paths_quote_keys_with_dots() -> None:
    data = yaml.safe_load(HELLO)
    data["metadata"]["annotations"] = {"example.com/owner": 5}
    with pytest.raises(InvalidResource) as info:
        validate_object(data)
    assert info.value.field == 'metadata.annotations["example.com/owner"]'


# --- Properties -------------------------------------------------------------------------------


@given(st.lists(resource_dicts, min_size=1, max_size=4), st.sampled_from(["yaml", "json"]))
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_generated_manifests_load_and_round_trip(docs: list[dict[str, Any]], style: str) -> None:
    keys = [(doc["kind"], doc["metadata"]["name"]) for doc in docs]
    assume(len(set(keys)) == len(keys))
    if style == "yaml":
        data = yaml.safe_dump_all(docs).encode()
    else:
        # JSON leaves characters such as U+2028 or DEL unescaped; YAML reads those as line
        # breaks or rejects them, so only plain text goes through this path.
        assume(all(_json_safe(doc) for doc in docs))
        data = b"\n---\n".join(orjson.dumps(doc) for doc in docs)
    loaded = load_bytes(data, "generated.yaml")
    assert [item.resource for item in loaded] == [from_dict(copy.deepcopy(d)) for d in docs]
    for item in loaded:
        assert from_dict(to_dict(item.resource)) == item.resource
    assert [item.location.document for item in loaded] == list(range(1, len(docs) + 1))


def _json_safe(value: Any) -> bool:
    if isinstance(value, str):
        return all(ch.isprintable() or ch in "\t" for ch in value)
    if isinstance(value, dict):
        return all(_json_safe(key) and _json_safe(item) for key, item in value.items())
    if isinstance(value, list):
        return all(_json_safe(item) for item in value)
    return True


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)

MUTATIONS = ["delete", "retype", "extra", "insert", "truncate", "non-utf8", "none"]


def _containers(value: Any) -> list[Any]:
    found: list[Any] = []
    if isinstance(value, dict | list):
        found.append(value)
        for item in value.values() if isinstance(value, dict) else value:
            found.extend(_containers(item))
    return found


@st.composite
def mutated_manifests(draw: st.DrawFn) -> bytes:
    docs = draw(st.lists(resource_dicts, min_size=1, max_size=3))
    mutation = draw(st.sampled_from(MUTATIONS))
    if mutation in ("delete", "retype", "extra"):
        container = draw(st.sampled_from(_containers(draw(st.sampled_from(docs)))))
        keys = list(container) if isinstance(container, dict) else list(range(len(container)))
        if mutation == "extra" or not keys:
            if isinstance(container, dict):
                container[draw(st.text(max_size=10))] = draw(json_values)
            else:
                container.append(draw(json_values))
        else:
            key = draw(st.sampled_from(keys))
            if mutation == "delete":
                del container[key]
            else:
                container[key] = draw(json_values)
    data = yaml.safe_dump_all(docs, allow_unicode=draw(st.booleans())).encode()
    offset = draw(st.integers(min_value=0, max_value=len(data)))
    if mutation == "insert":
        data = data[:offset] + draw(st.binary(min_size=1, max_size=16)) + data[offset:]
    elif mutation == "truncate":
        data = data[:offset]
    elif mutation == "non-utf8":
        bad = draw(st.sampled_from([b"\xff", b"\x80", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80"]))
        data = data[:offset] + bad + data[offset:]
    return data


@given(mutated_manifests())
@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_manifests_load_or_raise_manifest_error(data: bytes) -> None:
    try:
        load_bytes(data, "mutant.yaml")
    except ManifestError as exc:
        message = str(exc)
        assert message.startswith("mutant.yaml: ")
        assert exc.file == "mutant.yaml"
        assert len(message.splitlines()) == 1
        assert message.isprintable()


@given(json_values)
@settings(deadline=None)
def test_validate_object_on_any_json(value: Any) -> None:
    try:
        validate_object(value)
    except InvalidResource as exc:
        assert str(exc)


@given(
    st.fixed_dictionaries(
        {"apiVersion": st.just(API_VERSION), "kind": st.sampled_from(["Workload", "Node"])},
        optional={"metadata": json_values, "spec": json_values, "status": json_values},
    )
)
@settings(deadline=None)
def test_validate_object_on_nearly_valid_json(value: dict[str, Any]) -> None:
    try:
        validate_object(value)
    except InvalidResource as exc:
        assert exc.errors
        assert all(isinstance(error, FieldError) for error in exc.errors)
