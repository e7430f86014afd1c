"""``pctl``: drive a Pollen swarm the way kubectl drives Kubernetes.

The module has two halves. The first is pure functions that turn API objects into what pctl
prints (tables, ages, ``-o`` formats, describe, diff) and parse what users type (kinds, durations,
``--for``); tests call them without a node. The second is the click commands, which fetch and
print.

Start-up time matters: ``pctl get`` is run in loops and scripts. Only click, the standard library
and orjson are imported up front; pydantic (through the manifest loader), PyYAML and rich are
imported by the commands that need them. For the same reason tables are laid out here rather than
with ``rich.table.Table``, which takes about 0.6 s for 1,000 rows.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

import click

from pollen import API_VERSION

if TYPE_CHECKING:
    from pollen.api.client import ApiClient
    from pollen.api.errors import ApiError
    from pollen.resources.loader import LoadedResource

API_GROUP = "pollen.dev"

Obj = dict[str, Any]

# --- kinds ------------------------------------------------------------------------------------

# Kind -> (plural, short names), as in pollen.resources.models. Kept here because importing the
# models means importing pydantic, which alone costs more than a whole `pctl get`; a unit test
# keeps this table equal to the models, and unknown names still fall back to the models.
KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "Workload": ("workloads", ("wl",)),
    "Replica": ("replicas", ("rep",)),
    "Artifact": ("artifacts", ("art",)),
    "Node": ("nodes", ("no",)),
    "TrustPolicy": ("trustpolicies", ("tp",)),
}
_ALIASES: dict[str, str] = {
    alias: kind
    for kind, (plural, shorts) in KINDS.items()
    for alias in (kind.lower(), plural, *shorts)
}


class CliError(Exception):
    """A failure to report to the user as one sentence, without a traceback."""


@dataclass(frozen=True)
class KindInfo:
    """A resolved kind: ``Workload``, and its plural ``workloads`` as used in API paths."""

    kind: str
    plural: str

    @property
    def singular(self) -> str:
        """``workload``, as in ``-o name`` output."""
        return self.kind.lower()

    @property
    def qualified(self) -> str:
        """``workload.pollen.dev``, as kubectl names custom resources in its messages."""
        return f"{self.kind.lower()}.{API_GROUP}"


def resolve(name: str) -> KindInfo:
    """The kind for a singular, plural or short name (``wl``), case-insensitively.

    ``workloads.pollen.dev`` works too, as in kubectl. Raises ``CliError`` for unknown names.
    """
    bare = name.lower().removesuffix(f".{API_GROUP}")
    kind = _ALIASES.get(bare)
    if kind is not None:
        return KindInfo(kind, KINDS[kind][0])
    from pollen.resources.models import KIND_MODELS, UnknownKindError, resolve_kind

    try:
        kind = resolve_kind(bare)
    except UnknownKindError as exc:
        raise CliError(str(exc)) from None
    return KindInfo(kind, KIND_MODELS[kind].PLURAL)


def kind_of(obj: Obj) -> KindInfo:
    """The kind of an object the node sent."""
    return resolve(str(obj.get("kind", "")))


def split_ref(kind_arg: str, names: Sequence[str]) -> tuple[KindInfo, list[str]]:
    """``KIND NAME...`` or ``KIND/NAME`` into the kind and the names."""
    if "/" in kind_arg:
        kind_text, _, name = kind_arg.partition("/")
        if names:
            raise CliError(f"there is no need to give a name after {kind_arg}")
        if not name:
            raise CliError(f"{kind_arg!r} has no name after the slash")
        return resolve(kind_text), [name]
    return resolve(kind_arg), list(names)


# --- values -----------------------------------------------------------------------------------


def _get(obj: Any, *path: str) -> Any:
    """``obj[path[0]][path[1]]...``, or None as soon as a step is missing or not a mapping."""
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def parse_time(value: Any) -> datetime | None:
    """An RFC 3339 timestamp as an aware datetime, or None if it is missing or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def human_duration(seconds: float) -> str:
    """A duration the way kubectl shows ages: ``45s``, ``5m30s``, ``3h``, ``2d``, ``3y``.

    The same steps as Kubernetes' ``duration.HumanDuration``, so the numbers read the same.
    """
    total = round(seconds)
    if total < -1:
        return "<invalid>"
    if total < 0:
        return "0s"
    if total < 120:
        return f"{total}s"
    minutes = int(seconds // 60)
    if minutes < 10:
        secs = int(seconds) % 60
        return f"{minutes}m" if secs == 0 else f"{minutes}m{secs}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = int(seconds // 3600)
    if hours < 8:
        mins = minutes % 60
        return f"{hours}h" if mins == 0 else f"{hours}h{mins}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d" if rest == 0 else f"{hours // 24}d{rest}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 24 // 365}y" if days == 0 else f"{hours // 24 // 365}y{days}d"
    return f"{hours // 24 // 365}y"


def format_age(timestamp: Any, now: datetime) -> str:
    """How long ago ``timestamp`` was, kubectl style; ``<unknown>`` without a timestamp."""
    when = parse_time(timestamp)
    if when is None:
        return "<unknown>"
    return human_duration((now - when).total_seconds())


def short_digest(value: Any) -> str:
    """``sha256:`` and the first 12 hex digits, as container tools abbreviate digests."""
    text = "" if value is None else str(value)
    algo, sep, hexpart = text.partition(":")
    if sep and algo == "sha256" and len(hexpart) > 12:
        return f"sha256:{hexpart[:12]}"
    return text


def human_size(size: Any) -> str:
    """Bytes in binary units: ``512B``, ``22KiB``, ``1.5MiB``."""
    if not isinstance(size, int | float) or isinstance(size, bool):
        return "<unknown>"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(value)}B"
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _text(value: Any) -> str:
    if value is None:
        return "<none>"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _pairs(mapping: Any) -> str:
    """``k=v,k2=v2`` for a label-like mapping, ``<none>`` when empty."""
    if not isinstance(mapping, dict) or not mapping:
        return "<none>"
    return ",".join(f"{key}={value}" for key, value in sorted(mapping.items()))


def desired_replicas(spec: Any) -> int:
    """How many replicas a Workload spec asks for: replicas, else minReplicas, else 1."""
    for key in ("replicas", "minReplicas"):
        value = _get(spec, key)
        if isinstance(value, int):
            return value
    return 1


def condition(obj: Obj, condition_type: str) -> Obj | None:
    """The condition of that type in ``status.conditions``, if any."""
    conditions = _get(obj, "status", "conditions")
    if isinstance(conditions, list):
        for cond in conditions:
            if isinstance(cond, dict) and cond.get("type") == condition_type:
                return cond
    return None


def node_status(obj: Obj) -> str:
    """``Ready``, ``NotReady`` or ``Unknown`` from the Ready condition, as kubectl shows nodes."""
    ready = condition(obj, "Ready")
    status = ready.get("status") if ready else None
    text = {"True": "Ready", "False": "NotReady"}.get(str(status), "Unknown")
    if _get(obj, "spec", "unschedulable") is True:
        text += ",SchedulingDisabled"
    return text


def _cpu(millis: Any) -> str:
    if not isinstance(millis, int):
        return "<none>"
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


def _memory(megabytes: Any) -> str:
    return f"{megabytes}MB" if isinstance(megabytes, int) else "<none>"


# --- tables -----------------------------------------------------------------------------------


def _workload_row(obj: Obj, now: datetime, wide: bool) -> list[str]:
    spec = obj.get("spec") or {}
    ready = _get(obj, "status", "readyReplicas") or 0
    row = [
        _text(_get(obj, "metadata", "name")),
        f"{ready}/{desired_replicas(spec)}",
        _text(spec.get("executor", "http")),
        short_digest(spec.get("artifact")),
        format_age(_get(obj, "metadata", "creationTimestamp"), now),
    ]
    if wide:
        row += [
            _text(_get(obj, "metadata", "generation")),
            _memory(_get(spec, "resources", "memoryMB")),
            _cpu(_get(spec, "resources", "cpuMillis")),
            _pairs(_get(spec, "placement", "nodeSelector")),
        ]
    return row


def _replica_row(obj: Obj, now: datetime, wide: bool) -> list[str]:
    spec = obj.get("spec") or {}
    node = _get(obj, "status", "node") or spec.get("node")
    row = [
        _text(_get(obj, "metadata", "name")),
        _text(spec.get("workload")),
        _text(node),
        _text(_get(obj, "status", "phase") or "Pending"),
        format_age(_get(obj, "metadata", "creationTimestamp"), now),
    ]
    if wide:
        score = spec.get("score")
        row += [
            f"{score:.2f}" if isinstance(score, int | float) else "<none>",
            short_digest(spec.get("artifact")) or "<none>",
        ]
    return row


def short_signer(value: Any) -> str:
    """``ed25519:`` and the first 12 base64 characters of the key, as ``short_digest`` does."""
    text = "" if value is None else str(value)
    algo, sep, key = text.partition(":")
    if sep and algo == "ed25519" and len(key) > 12:
        return f"ed25519:{key[:12]}"
    return text


def _artifact_row(obj: Obj, now: datetime, wide: bool) -> list[str]:
    spec = obj.get("spec") or {}
    row = [
        _text(_get(obj, "metadata", "name")),
        short_digest(spec.get("digest")),
        human_size(spec.get("size")),
        format_age(_get(obj, "metadata", "creationTimestamp"), now),
    ]
    if wide:
        # A signer without a signature is a claim nobody checked: the artifact is unsigned.
        signed = spec.get("signature") and spec.get("signer")
        holders = _get(obj, "status", "holders")
        row += [
            short_signer(spec.get("signer")) if signed else "<unsigned>",
            ",".join(map(str, holders)) if isinstance(holders, list) and holders else "<none>",
        ]
    return row


def _trust_policy_row(obj: Obj, now: datetime, wide: bool) -> list[str]:
    spec = obj.get("spec") or {}
    signers = spec.get("trustedSigners")
    signers = signers if isinstance(signers, list) else []
    row = [
        _text(_get(obj, "metadata", "name")),
        "Allowed" if spec.get("allowUnsigned", True) is not False else "Refused",
        str(len(signers)),
        format_age(_get(obj, "metadata", "creationTimestamp"), now),
    ]
    if wide:
        row.append(",".join(short_signer(s) for s in signers) or "<none>")
    return row


def _node_row(obj: Obj, now: datetime, wide: bool) -> list[str]:
    spec = obj.get("spec") or {}
    addresses = spec.get("addresses")
    row = [
        _text(_get(obj, "metadata", "name")),
        node_status(obj),
        ",".join(map(str, addresses)) if isinstance(addresses, list) and addresses else "<none>",
        format_age(_get(obj, "metadata", "creationTimestamp"), now),
    ]
    if wide:
        # The round trip from the node that answered, estimated from Vivaldi coordinates.
        rtt = _get(obj, "status", "estimatedRTTMs")
        row += [
            f"{rtt:.1f}ms" if isinstance(rtt, int | float) else "<none>",
            _cpu(_get(spec, "capacity", "cpuMillis")),
            _memory(_get(spec, "capacity", "memoryMB")),
            _pairs(_get(obj, "metadata", "labels")),
            _text(_get(obj, "status", "api")),
        ]
    return row


_COLUMNS: dict[str, tuple[list[str], list[str]]] = {
    "Workload": (
        ["NAME", "READY", "EXECUTOR", "ARTIFACT", "AGE"],
        ["GENERATION", "MEMORY", "CPU", "SELECTOR"],
    ),
    "Replica": (["NAME", "WORKLOAD", "NODE", "PHASE", "AGE"], ["SCORE", "ARTIFACT"]),
    "Artifact": (["NAME", "DIGEST", "SIZE", "AGE"], ["SIGNER", "HOLDERS"]),
    "Node": (["NAME", "STATUS", "ADDRESSES", "AGE"], ["RTT", "CPU", "MEMORY", "LABELS", "API"]),
    "TrustPolicy": (["NAME", "UNSIGNED", "SIGNERS", "AGE"], ["TRUSTED"]),
}
_ROWS = {
    "Workload": _workload_row,
    "Replica": _replica_row,
    "Artifact": _artifact_row,
    "Node": _node_row,
    "TrustPolicy": _trust_policy_row,
}


def table_headers(kind: str, *, wide: bool = False) -> list[str]:
    """The column headers of ``pctl get`` for one kind."""
    narrow, extra = _COLUMNS.get(kind, (["NAME", "AGE"], []))
    return narrow + extra if wide else list(narrow)


def table_row(obj: Obj, now: datetime, *, wide: bool = False) -> list[str]:
    """The cells of one object's row in ``pctl get``."""
    make = _ROWS.get(str(obj.get("kind")))
    if make is None:  # a kind newer than this pctl: show what every object has
        return [
            _text(_get(obj, "metadata", "name")),
            format_age(_get(obj, "metadata", "creationTimestamp"), now),
        ]
    return make(obj, now, wide)


# Control characters from the node (a message, a label) must not move the cursor or recolour
# the terminal; line breaks would break table rows.
_CONTROL = {code: "?" for code in (*range(0x20), 0x7F)} | {0x09: " ", 0x0A: " ", 0x0D: " "}


def clean(text: str) -> str:
    """``text`` with control characters replaced, safe to print as one table cell."""
    return text.translate(_CONTROL) if not text.isprintable() else text


def _width(text: str) -> int:
    if text.isascii():
        return len(text)
    from rich.cells import cell_len  # wide characters (CJK, emoji) take two columns

    return cell_len(text)


class TableWriter:
    """Lays out rows as kubectl does: no rules, columns three spaces apart, last one ragged.

    The header comes with the first rows rendered. Column widths are remembered, so that rows
    rendered later (``get -w``) line up with the table printed first, as far as they fit.
    ``rule`` adds a line of dashes under the header, as kubectl describe does.
    """

    GAP = "   "

    def __init__(self, headers: Sequence[str], *, rule: bool = False) -> None:
        self.headers = list(headers)
        self.widths = [len(h) for h in headers]
        self.rule = rule
        self.header_done = False

    def render(self, rows: Iterable[Sequence[str]]) -> list[str]:
        """The lines for ``rows``, after the header if it is not out yet."""
        cleaned = [[clean(cell) for cell in row] for row in rows]
        for row in cleaned:
            for index, cell in enumerate(row[: len(self.widths)]):
                width = _width(cell)
                if width > self.widths[index]:
                    self.widths[index] = width
        lines = []
        if not self.header_done:
            lines.append(self._line(self.headers))
            if self.rule:
                lines.append(self._line(["-" * len(h) for h in self.headers]))
            self.header_done = True
        lines.extend(self._line(row) for row in cleaned)
        return lines

    def _line(self, cells: Sequence[str]) -> str:
        last = len(cells) - 1
        parts = [
            cell if index == last else cell + " " * (self.widths[index] - _width(cell))
            for index, cell in enumerate(cells)
        ]
        return self.GAP.join(parts).rstrip()


def render_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A whole table as one string, without a trailing newline."""
    return "\n".join(TableWriter(headers).render(rows))


def object_table(objects: Sequence[Obj], kind: str, now: datetime, *, wide: bool = False) -> str:
    """The ``pctl get`` table for ``objects``, all of one kind."""
    return render_table(
        table_headers(kind, wide=wide), [table_row(obj, now, wide=wide) for obj in objects]
    )


# --- -o json|yaml|name ------------------------------------------------------------------------


def object_name(obj: Obj) -> str:
    """``workload/hello``, what ``-o name`` prints."""
    return f"{str(obj.get('kind', '')).lower()}/{_get(obj, 'metadata', 'name')}"


def list_document(objects: Sequence[Obj]) -> Obj:
    """A ``List`` wrapping ``objects``, the shape ``-o json|yaml`` prints for several objects."""
    return {"apiVersion": API_VERSION, "kind": "List", "items": list(objects)}


def to_json(document: Any) -> str:
    """Indented JSON, keys in the order the node sent them."""
    import orjson

    return orjson.dumps(document, option=orjson.OPT_INDENT_2).decode()


def to_yaml(document: Any, *, sort_keys: bool = False) -> str:
    """Block-style YAML, keys in the order the node sent them unless ``sort_keys``."""
    import yaml

    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    text: str = yaml.dump(
        document,
        Dumper=dumper,
        sort_keys=sort_keys,
        default_flow_style=False,
        allow_unicode=True,
        width=100_000,  # long strings (messages, signatures) stay on one line
    )
    return text


def format_objects(objects: Sequence[Obj], output: str, *, single: bool) -> str:
    """``objects`` as ``-o json``, ``yaml`` or ``name`` prints them, without trailing newline.

    ``single`` is for ``get KIND NAME``: the object itself rather than a List.
    """
    if output == "name":
        return "\n".join(object_name(obj) for obj in objects)
    document: Any = objects[0] if single and len(objects) == 1 else list_document(objects)
    if output == "json":
        return to_json(document)
    if output == "yaml":
        return to_yaml(document).rstrip("\n")
    raise CliError(f'unknown output format "{output}"; use wide, yaml, json or name')


# --- describe ---------------------------------------------------------------------------------

# Mappings whose keys are user data (label keys, variable names), printed as they are rather
# than turned into title-case field names.
_VERBATIM_MAPS = frozenset({"labels", "annotations", "env", "nodeSelector"})
_WORD_BREAK = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def field_title(key: str) -> str:
    """``readyReplicas`` as ``Ready Replicas``, the way kubectl describes custom resources."""
    words = _WORD_BREAK.sub(" ", key)
    return words[:1].upper() + words[1:]


def _aligned(pairs: Sequence[tuple[str, str]], indent: str) -> list[str]:
    if not pairs:
        return []
    width = max(_width(key) for key, _ in pairs) + 2
    lines = []
    for key, value in pairs:
        head = f"{indent}{key}"
        pad = " " * (width - _width(key))
        first, *rest = value.split("\n") if value else [""]
        lines.append(f"{head}{pad}{first}".rstrip())
        lines.extend(f"{indent}{' ' * width}{more}".rstrip() for more in rest)
    return lines


def _scalar(value: Any) -> str:
    text = _text(value)
    # Keep line breaks of long strings (continued under the value), drop other controls.
    return "\n".join(clean(part) for part in text.split("\n"))


def describe_tree(value: Any, indent: str = "  ", *, verbatim: bool = False) -> list[str]:
    """A nested mapping as indented ``Key:  value`` lines, like kubectl describe."""
    if not isinstance(value, dict):
        return [f"{indent}{_scalar(value)}"]
    lines: list[str] = []
    pending: list[tuple[str, str]] = []  # scalar siblings, aligned together

    def flush() -> None:
        lines.extend(_aligned(pending, indent))
        pending.clear()

    for key, item in value.items():
        title = (clean(str(key)) if verbatim else field_title(str(key))) + ":"
        if isinstance(item, dict) and item:
            flush()
            lines.append(f"{indent}{title}")
            lines.extend(describe_tree(item, indent + "  ", verbatim=key in _VERBATIM_MAPS))
        elif isinstance(item, list) and item:
            flush()
            lines.append(f"{indent}{title}")
            for element in item:
                if isinstance(element, dict):
                    nested = describe_tree(element, indent + "    ")
                    # A YAML-like marker shows where one element of a list ends.
                    first = nested[0] if nested else ""
                    lines.append(f"{indent}  - {first[len(indent) + 4 :]}")
                    lines.extend(nested[1:])
                else:
                    lines.append(f"{indent}  {_scalar(element)}")
        elif isinstance(item, dict | list):
            pending.append((title, "<none>"))
        else:
            pending.append((title, _scalar(item)))
    flush()
    return lines


def _labels_lines(title: str, mapping: Any) -> list[tuple[str, str]]:
    if not isinstance(mapping, dict) or not mapping:
        return [(title, "<none>")]
    return [(title, "\n".join(f"{k}={v}" for k, v in sorted(mapping.items())))]


def conditions_table(conditions: Sequence[Obj], now: datetime, indent: str = "  ") -> list[str]:
    """The Conditions block of describe: one row a condition."""
    headers = ["Type", "Status", "Reason", "ObservedGeneration", "LastTransition", "Message"]
    rows = []
    for cond in conditions:
        when = cond.get("lastTransitionTime")
        rows.append(
            [
                _text(cond.get("type")),
                _text(cond.get("status")),
                _text(cond.get("reason") or "<none>"),
                _text(cond.get("observedGeneration")),
                f"{format_age(when, now)} ago" if when else "<unknown>",
                _text(cond.get("message") or ""),
            ]
        )
    return [indent + line for line in TableWriter(headers, rule=True).render(rows)]


def events_block(events: Sequence[Obj], now: datetime) -> list[str]:
    """The Events block of describe, oldest first, as kubectl shows it."""
    if not events:
        return ["Events:  <none>"]
    headers = ["Type", "Reason", "Age", "From", "Message"]
    rows = [
        [
            _text(event.get("type")),
            _text(event.get("reason")),
            _event_age(event, now),
            _text(event.get("node")),
            _text(event.get("message")),
        ]
        for event in events
    ]
    return ["Events:", *("  " + line for line in TableWriter(headers, rule=True).render(rows))]


def _event_age(event: Obj, now: datetime) -> str:
    age = format_age(event.get("timestamp"), now)
    count = event.get("count")
    return f"{age} (x{count})" if isinstance(count, int) and count > 1 else age


def replicas_block(replicas: Sequence[Obj], now: datetime) -> list[str]:
    """A Workload's Replicas for ``pctl describe``, in the order placement ranks them (highest
    score first, ties to the lowest node name): where they run, and why there."""
    if not replicas:
        return ["Replicas:  <none>"]
    ranked = sorted(
        replicas,
        key=lambda r: (
            -float(_get(r, "spec", "score") or 0.0),
            str(_get(r, "spec", "node") or ""),
            str(_get(r, "metadata", "name") or ""),
        ),
    )
    headers = ["NAME", "NODE", "PHASE", "SCORE", "REVISION", "AGE"]
    rows = [
        [
            _text(_get(r, "metadata", "name")),
            _text(_get(r, "spec", "node")),
            _text(_get(r, "status", "phase")),
            f"{float(_get(r, 'spec', 'score') or 0.0):.2f}",
            _text(_get(r, "spec", "revision")),
            format_age(_get(r, "metadata", "creationTimestamp"), now),
        ]
        for r in ranked
    ]
    return ["Replicas:", *("  " + line for line in TableWriter(headers, rule=True).render(rows))]


def describe(
    obj: Obj, events: Sequence[Obj], now: datetime, replicas: Sequence[Obj] | None = None
) -> str:
    """The ``pctl describe`` text for one object and the events about it; for a Workload,
    ``replicas`` are its Replicas."""
    meta = obj.get("metadata") or {}
    created = meta.get("creationTimestamp")
    header: list[tuple[str, str]] = [
        ("Name:", _scalar(meta.get("name"))),
        ("Kind:", _scalar(obj.get("kind"))),
        ("API Version:", _scalar(obj.get("apiVersion"))),
        *_labels_lines("Labels:", meta.get("labels")),
        *_labels_lines("Annotations:", meta.get("annotations")),
        ("UID:", _scalar(meta.get("uid"))),
        (
            "Created:",
            f"{created} ({format_age(created, now)} ago)" if created else "<unknown>",
        ),
        ("Generation:", _scalar(meta.get("generation"))),
    ]
    if meta.get("finalizers"):
        header.append(("Finalizers:", ", ".join(map(str, meta["finalizers"]))))
    if meta.get("deletionTimestamp"):
        header.append(("Deleting:", f"since {meta['deletionTimestamp']}"))
    lines = _aligned(header, "")
    spec = obj.get("spec")
    lines.append("Spec:" if spec else "Spec:  <none>")
    if isinstance(spec, dict) and spec:
        lines.extend(describe_tree(spec))
    status = dict(obj.get("status") or {})
    conditions = status.pop("conditions", None) or []
    lines.append("Status:" if status or conditions else "Status:  <none>")
    lines.extend(describe_tree(status))
    if conditions:
        lines.append("  Conditions:")
        lines.extend(conditions_table(conditions, now, indent="    "))
    if replicas is not None:
        lines.extend(replicas_block(replicas, now))
    lines.extend(events_block(events, now))
    return "\n".join(lines)


# --- events -----------------------------------------------------------------------------------

EVENT_HEADERS = ["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]


def event_row(event: Obj, now: datetime) -> list[str]:
    """One row of ``pctl events``."""
    involved = event.get("involvedObject") or {}
    return [
        _event_age(event, now),
        _text(event.get("type")),
        _text(event.get("reason")),
        f"{str(involved.get('kind', '')).lower()}/{involved.get('name', '')}",
        _text(event.get("message")),
    ]


# --- apply and diff ---------------------------------------------------------------------------


def apply_line(result: Obj, *, dry_run: bool = False) -> str:
    """``workload.pollen.dev/hello created``, a line of ``pctl apply`` output."""
    info = resolve(str(result.get("kind", "")))
    suffix = " (dry run)" if dry_run else ""
    return f"{info.qualified}/{result.get('name')} {result.get('action')}{suffix}"


def user_view(obj: Obj | None) -> Obj:
    """The parts of an object that users write: labels, annotations, finalizers and spec.

    ``diff`` compares these; status and bookkeeping (uid, generation) are the node's.
    """
    if obj is None:
        return {}
    meta = obj.get("metadata") or {}
    view_meta: Obj = {"name": meta.get("name")}
    for key in ("labels", "annotations", "finalizers"):
        if meta.get(key):
            view_meta[key] = meta[key]
    view: Obj = {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind")}
    view["metadata"] = view_meta
    if obj.get("spec") is not None:
        view["spec"] = obj["spec"]
    return view


def unified_diff(live: Obj | None, merged: Obj | None, label: str) -> str:
    """A unified diff of the user-owned YAML of two versions of one object; empty if equal."""
    import difflib

    before = to_yaml(user_view(live), sort_keys=True) if live is not None else ""
    after = to_yaml(user_view(merged), sort_keys=True) if merged is not None else ""
    return "".join(
        difflib.unified_diff(
            before.splitlines(keepends=True),
            after.splitlines(keepends=True),
            fromfile=f"live/{label}",
            tofile=f"merged/{label}",
        )
    )


# --- wait and durations -----------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_duration(text: str) -> float:
    """``30s``, ``2m``, ``1h``, ``1m30s``, ``500ms`` or plain seconds (``45``), in seconds."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        pos, seconds = 0, 0.0
        for match in _DURATION.finditer(value):
            if match.start() != pos:
                break
            number, unit = float(match.group(1)), match.group(2)
            seconds += number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
            pos = match.end()
        if pos != len(value) or not value:
            raise CliError(
                f'invalid duration "{text}"; use a number of seconds or a value like 30s, 2m, 1h'
            ) from None
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise CliError(f'invalid duration "{text}"; it must be a finite number >= 0')
    return seconds


@dataclass(frozen=True)
class WaitFor:
    """What ``pctl wait --for``: a condition with a status, creation, or deletion."""

    delete: bool = False
    create: bool = False
    condition: str = ""
    status: str = "True"

    def met(self, obj: Obj) -> bool:
        """Whether ``obj`` has the condition, for its current generation.

        A condition observed for an older generation does not count: right after an apply,
        ``Ready`` may still describe the previous spec.
        """
        if self.create:
            return True
        cond = condition(obj, self.condition)
        if cond is None or str(cond.get("status")) != self.status:
            return False
        generation = _get(obj, "metadata", "generation")
        observed = cond.get("observedGeneration")
        return not (
            isinstance(generation, int) and isinstance(observed, int) and observed < generation
        )


def parse_wait_for(text: str) -> WaitFor:
    """``condition=Ready``, ``condition=Ready=False``, ``create`` or ``delete``."""
    if text == "delete":
        return WaitFor(delete=True)
    if text == "create":
        return WaitFor(create=True)
    what, sep, rest = text.partition("=")
    if what == "condition" and sep and rest:
        name, has_status, status = rest.partition("=")
        statuses = {"true": "True", "false": "False", "unknown": "Unknown"}
        if name and (not has_status or status.lower() in statuses):
            return WaitFor(
                condition=name, status=statuses[status.lower()] if has_status else "True"
            )
    raise CliError(
        f'unrecognised --for "{text}"; use condition=NAME, condition=NAME=False, create or delete'
    )


# --- logs and top -----------------------------------------------------------------------------


def log_text(line: Obj, *, prefix: bool = False, timestamps: bool = False) -> str:
    """One log line as ``pctl logs`` prints it: the text as the workload wrote it, after
    ``[node/replica]`` with ``prefix`` (kubectl's ``--prefix``) and the time with
    ``timestamps``."""
    parts = []
    if prefix:
        parts.append(f"[{_text(line.get('node'))}/{_text(line.get('replica'))}]")
    if timestamps:
        parts.append(_text(line.get("time")))
    parts.append(str(line.get("text", "")))
    return " ".join(parts)


def cpu_time(seconds: Any) -> str:
    """CPU time used, ``0.42s``, ``12.3s``, or kubectl-style ages beyond two minutes."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return "<unknown>"
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 120:
        return f"{seconds:.1f}s"
    return human_duration(seconds)


def top_memory(size: Any) -> str:
    """Bytes as ``kubectl top`` shows them: ``1234Mi``, ``512Ki`` below one MiB."""
    if not isinstance(size, int) or isinstance(size, bool):
        return "<unknown>"
    if size <= 0:
        return "0"
    return f"{size >> 20}Mi" if size >= 1 << 20 else f"{size >> 10}Ki"


def _percent(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "<unknown>"
    return f"{round(value)}%"


TOP_NODE_HEADERS = ["NAME", "CPU%", "MEMORY", "MEMORY%", "INSTANCES"]
TOP_WORKLOAD_HEADERS = ["NAME", "REPLICAS", "REQUESTS", "ERRORS", "CPU", "MEMORY"]


def top_node_row(name: str, metrics: Obj | None) -> list[str]:
    """A ``pctl top nodes`` row from a NodeMetrics object (None: the node did not answer)."""
    usage = _get(metrics, "usage") or {}
    instances = usage.get("instances")
    return [
        name,
        _percent(usage.get("cpuPercent")),
        top_memory(usage.get("memoryUsedBytes")),
        _percent(usage.get("memoryPercent")),
        str(instances) if isinstance(instances, int) else "<unknown>",
    ]


def top_workload_row(name: str, metrics: Obj | None) -> list[str]:
    """A ``pctl top workloads`` row from a WorkloadMetrics object: the replicas' sums.

    MEMORY is, per replica, the linear memory of its instances now or, when none runs (an
    ``http`` workload between requests), the most one instance reached; summed.
    """
    if metrics is None:
        return [name, *["<unknown>"] * 5]
    replicas = [r for r in metrics.get("replicas") or [] if isinstance(r, dict)]

    def number(replica: Obj, key: str) -> float:
        value = replica.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            return float(value)
        return 0.0

    def total(key: str) -> float:
        return sum(number(r, key) for r in replicas)

    memory = sum(max(number(r, "memoryBytes"), number(r, "memoryPeakBytes")) for r in replicas)
    return [
        name,
        str(len(replicas)),
        str(int(total("requests"))),
        str(int(total("errors"))),
        cpu_time(total("cpuSeconds")),
        top_memory(int(memory)),
    ]


# --- the commands -----------------------------------------------------------------------------


@dataclass
class _State:
    context: str | None
    client: ApiClient | None = None


def _client(ctx: click.Context) -> ApiClient:
    from pollen.api.client import ApiClient
    from pollen.cli.config import load_config

    state: _State = ctx.find_object(_State) or _State(None)
    if state.client is None:
        context = load_config().context(state.context)
        state.client = ApiClient(context.server, context.token)
        ctx.call_on_close(state.client.close)
    return state.client


def _echo(text: str) -> None:
    # One write for a whole table: click.echo flushes every call, and pipes are slow to flush.
    click.echo(text)


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(code)


def _describe_os_error(exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    reason = reason[:1].lower() + reason[1:]
    return f"{exc.filename}: {reason}" if exc.filename else reason


def _user_error(exc: BaseException) -> str | None:
    """The sentence to print for an expected failure, or None for a bug."""
    from pollen.api.errors import ApiError
    from pollen.cli.config import ConfigError

    if isinstance(exc, CliError | ApiError | ConfigError):
        return str(exc)
    if isinstance(exc, OSError):
        return _describe_os_error(exc)
    # Raised only from modules that are already loaded when they can occur; looking them up in
    # sys.modules keeps pydantic out of commands that never touch manifests.
    loader = sys.modules.get("pollen.resources.loader")
    if loader is not None and isinstance(exc, getattr(loader, "ManifestError", ())):
        return str(exc)
    models = sys.modules.get("pollen.resources.models")
    if models is not None and isinstance(exc, models.UnknownKindError):
        return str(exc)
    return None


# click >= 8.2 signals "no arguments, so show help" with this; older versions print help itself.
_NO_ARGS_IS_HELP: type[click.UsageError] | tuple[()] = getattr(
    click.exceptions, "NoArgsIsHelpError", ()
)


class _Pctl(click.Group):
    """The pctl group, with kubectl's manners: ``error: ...`` and no tracebacks for users."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise click.exceptions.Exit(130) from None  # Ctrl-C ends a command quietly
        except BrokenPipeError:
            _quiet_stdout()
            raise click.exceptions.Exit(141) from None  # as a process killed by SIGPIPE
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:
            message = _user_error(exc)
            if message is None:
                raise
            _fail(message)

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        # click prints its own errors as "Error: ..."; run it non-standalone and print them
        # kubectl's way, so that every failure reads alike.
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NO_ARGS_IS_HELP as exc:
            click.echo(exc.format_message())  # bare `pctl` shows help, as kubectl does
            code = 0
        except click.UsageError as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            if exc.ctx is not None:
                click.echo(f"See '{exc.ctx.command_path} --help' for usage.", err=True)
            code = exc.exit_code
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            code = exc.exit_code
        except click.Abort:
            code = 130
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


def _quiet_stdout() -> None:
    """After the reader of a pipe left (``| head``), drop further output instead of failing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


@click.group(
    cls=_Pctl,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option("--context", "context_name", metavar="NAME", help="Context to use [default: current]")
@click.pass_context
def main(ctx: click.Context, context_name: str | None) -> None:
    """Control a Pollen swarm: apply, get, describe, diff, wait, delete, push, logs, top."""
    ctx.obj = _State(context_name)


def _load(paths: Sequence[str]) -> list[LoadedResource]:
    from pollen.resources.loader import load_paths

    return load_paths(list(paths))  # "-" reads standard input


def _apply_error(exc: ApiError, loaded: Sequence[LoadedResource]) -> CliError:
    """The node names a bad item as ``items[i]``; say which file and document it came from.

    The item's line is where its document starts; the field is in the node's message.
    """
    index = exc.details.get("index")
    if not isinstance(index, int) or not 0 <= index < len(loaded):
        return CliError(str(exc))
    item = loaded[index]
    message = re.sub(r"^items\[\d+\]\s*(\([^)]*\))?:\s*", "", exc.message)
    where = item.location
    line = f", line {where.line}" if where.line is not None else ""
    what = f'{item.resource.kind} "{item.resource.name}"'
    return CliError(f"{where.file}: document {where.document}{line}: {what}: {message}")


def _to_items(loaded: Sequence[LoadedResource]) -> list[Obj]:
    from pollen.resources.models import to_dict

    return [to_dict(item.resource) for item in loaded]


def _with_pushed_paths(
    loaded: Sequence[LoadedResource], client: ApiClient | None
) -> tuple[list[LoadedResource], list[Obj]]:
    """Workloads naming a local file pointed at its digest (the file pushed with ``client``),
    and the Artifacts to apply with them."""
    from pollen.cli.push import PushError, resolve_paths

    try:
        return resolve_paths(loaded, client)
    except PushError as exc:
        raise CliError(str(exc)) from None


@main.command()
@click.option(
    "-f",
    "--filename",
    "paths",
    multiple=True,
    required=True,
    metavar="PATH",
    help="File, directory or - for stdin (repeatable)",
)
@click.option("--dry-run", is_flag=True, help="Ask the node what would change; change nothing")
@click.pass_context
def apply(ctx: click.Context, paths: tuple[str, ...], dry_run: bool) -> None:
    """Create or update resources from manifests, all or nothing."""
    from pollen.api.errors import ApiError

    loaded = _load(paths)
    if not loaded:
        raise CliError("no objects passed to apply")
    client = _client(ctx)
    # A dry run pushes nothing; it still computes the digests, to show what would be applied.
    loaded, artifacts = _with_pushed_paths(loaded, None if dry_run else client)
    try:
        # The Artifacts go last, so that item indexes in the node's errors match ``loaded``.
        results = client.apply(_to_items(loaded) + artifacts, dry_run=dry_run)
    except ApiError as exc:
        raise _apply_error(exc, loaded) from None
    _echo("\n".join(apply_line(result, dry_run=dry_run) for result in results))


_OUTPUTS = click.Choice(["wide", "yaml", "json", "name"])


@main.command()
@click.argument("kind", metavar="KIND[/NAME]")
@click.argument("name", required=False)
@click.option("-o", "--output", type=_OUTPUTS, help="Output format [default: a table]")
@click.option("-w", "--watch", is_flag=True, help="After listing, print changes as they happen")
@click.option("-l", "--selector", metavar="k=v,...", help="Only objects with these labels")
@click.pass_context
def get(
    ctx: click.Context,
    kind: str,
    name: str | None,
    output: str | None,
    watch: bool,
    selector: str | None,
) -> None:
    """List resources of one kind, or show one."""
    info, names = split_ref(kind, [name] if name else [])
    one = names[0] if names else None
    client = _client(ctx)
    if watch:
        _watch(client, info, one, selector, output)
        return
    objects = [client.get(info.plural, one)] if one else client.list(info.plural, selector)
    if not objects and output in (None, "wide", "name"):
        click.echo("No resources found.", err=True)
        return
    if output in (None, "wide"):
        _echo(object_table(objects, info.kind, datetime.now(UTC), wide=output == "wide"))
    else:
        _echo(format_objects(objects, output or "", single=one is not None))


def _watch(
    client: ApiClient, info: KindInfo, name: str | None, selector: str | None, output: str | None
) -> None:
    writer: TableWriter | None = None
    initial: list[Obj] | None = []
    try:
        for event in client.watch(info.plural, name, label_selector=selector):
            obj = event.get("object")
            if event.get("type") == "BOOKMARK":
                if initial is None:  # a keep-alive bookmark
                    continue
                objects, initial = initial, None
                if output in (None, "wide"):
                    writer = TableWriter(table_headers(info.kind, wide=output == "wide"))
                    if objects:
                        now = datetime.now(UTC)
                        rows = [table_row(o, now, wide=output == "wide") for o in objects]
                        _echo("\n".join(writer.render(rows)))
                    else:
                        click.echo("No resources found.", err=True)
                elif objects:
                    _echo(_stream_format(objects, output or ""))
                continue
            if not isinstance(obj, dict):
                continue
            if initial is not None:
                initial.append(obj)
            elif writer is not None:
                row = table_row(obj, datetime.now(UTC), wide=output == "wide")
                # After an empty listing, the header comes out with this first row.
                _echo("\n".join(writer.render([row])))
            else:
                _echo(_stream_format([obj], output or ""))
    except KeyboardInterrupt:
        raise click.exceptions.Exit(130) from None
    raise CliError("the node closed the watch")


def _stream_format(objects: Sequence[Obj], output: str) -> str:
    # A stream of objects, not a List: one JSON document or one YAML document per change.
    if output == "name":
        return "\n".join(object_name(obj) for obj in objects)
    if output == "json":
        return "\n".join(to_json(obj) for obj in objects)
    return "\n".join(f"---\n{to_yaml(obj).rstrip()}" for obj in objects)


@main.command(name="describe")
@click.argument("kind", metavar="KIND[/NAME]")
@click.argument("names", nargs=-1)
@click.pass_context
def describe_command(ctx: click.Context, kind: str, names: tuple[str, ...]) -> None:
    """Show resources in detail, with their recent events."""
    info, wanted = split_ref(kind, names)
    client = _client(ctx)
    objects = [client.get(info.plural, n) for n in wanted] if wanted else client.list(info.plural)
    if not objects:
        click.echo("No resources found.", err=True)
        return
    events = client.events(kind=info.kind, name=wanted[0] if len(wanted) == 1 else None)
    replicas = client.list("replicas") if info.kind == "Workload" else []
    now = datetime.now(UTC)
    texts = []
    for obj in objects:
        obj_name = _get(obj, "metadata", "name")
        mine = [e for e in events if _get(e, "involvedObject", "name") == obj_name]
        held = [r for r in replicas if _get(r, "spec", "workload") == obj_name]
        texts.append(describe(obj, mine, now, held if info.kind == "Workload" else None))
    _echo("\n\n\n".join(texts))


@main.command()
@click.argument("kind", metavar="KIND[/NAME]", required=False)
@click.argument("names", nargs=-1)
@click.option(
    "-f", "--filename", "paths", multiple=True, metavar="PATH", help="Delete what these define"
)
@click.option("--ignore-not-found", is_flag=True, help="Treat an object already gone as deleted")
@click.pass_context
def delete(
    ctx: click.Context,
    kind: str | None,
    names: tuple[str, ...],
    paths: tuple[str, ...],
    ignore_not_found: bool,
) -> None:
    """Delete resources by name, or those that manifests define."""
    from pollen.api.errors import ApiError

    targets: list[tuple[KindInfo, str]]
    if paths:
        if kind:
            raise click.UsageError("give either KIND NAME or -f PATH, not both")
        targets = [
            (resolve(item.resource.kind), item.resource.metadata.name) for item in _load(paths)
        ]
    elif kind:
        info, wanted = split_ref(kind, names)
        if not wanted:
            raise click.UsageError(f"give the name of the {info.singular} to delete")
        targets = [(info, name) for name in wanted]
    else:
        raise click.UsageError("give KIND NAME or -f PATH")
    client = _client(ctx)
    failed = False
    for info, name in targets:
        try:
            client.delete(info.plural, name)
        except ApiError as exc:
            if exc.code == 404 and ignore_not_found:
                continue
            if exc.code == 0:  # the node is unreachable: no point trying the others
                raise
            click.echo(f"error: {exc}", err=True)
            failed = True
            continue
        _echo(f"{info.qualified}/{name} deleted")
    if failed:
        raise click.exceptions.Exit(1)


@main.command()
@click.option(
    "-f", "--filename", "paths", multiple=True, required=True, metavar="PATH",
    help="File, directory or - for stdin (repeatable)",
)  # fmt: skip
@click.pass_context
def diff(ctx: click.Context, paths: tuple[str, ...]) -> None:
    """Show what apply would change.

    Exit status: 0 when nothing would change, 1 when something would, 2 on error.
    """
    from pollen.api.errors import ApiError

    # Exit status 1 means "differences" here, so every failure must exit 2 instead.
    try:
        loaded = _load(paths)
        if not loaded:
            raise CliError("no objects passed to diff")
        client = _client(ctx)
        loaded, artifacts = _with_pushed_paths(loaded, None)
        try:
            results = client.apply(_to_items(loaded) + artifacts, dry_run=True)
        except ApiError as exc:
            raise _apply_error(exc, loaded) from None
        chunks = []
        for result in results:
            info = resolve(str(result.get("kind")))
            name = str(result.get("name"))
            if result.get("action") == "unchanged":
                continue
            live = None if result.get("action") == "created" else client.get(info.plural, name)
            chunks.append(unified_diff(live, result.get("object"), f"{info.qualified}/{name}"))
    except (click.exceptions.Exit, click.ClickException, KeyboardInterrupt, BrokenPipeError):
        raise
    except Exception as exc:
        message = _user_error(exc)
        if message is None:
            raise
        _fail(message, code=2)
    text = "".join(chunks)
    if text:
        click.echo(text, nl=False)
        raise click.exceptions.Exit(1)


@main.command()
@click.argument("ref", metavar="KIND/NAME")
@click.argument("name", required=False)
@click.option(
    "--for", "for_", required=True, metavar="CONDITION",
    help="condition=NAME[=STATUS], create or delete",
)  # fmt: skip
@click.option("--timeout", default="60s", show_default=True, help="Give up after this long")
@click.pass_context
def wait(ctx: click.Context, ref: str, name: str | None, for_: str, timeout: str) -> None:
    """Wait until a resource has a condition, or is gone."""
    info, names = split_ref(ref, [name] if name else [])
    if len(names) != 1:
        raise click.UsageError("give one resource, as KIND/NAME")
    target = names[0]
    wanted = parse_wait_for(for_)
    seconds = parse_duration(timeout)
    what = f"{info.plural}/{target}"
    client = _client(ctx)
    try:
        reached = _wait(client, info, target, wanted, seconds)
    except TimeoutError:
        reached = False
    if not reached:
        _fail(f"timed out waiting for the condition on {what}")
    _echo(f"{info.qualified}/{target} {'deleted' if wanted.delete else 'condition met'}")


def _wait(client: ApiClient, info: KindInfo, name: str, wanted: WaitFor, seconds: float) -> bool:
    import time

    from pollen.api.errors import ApiError

    if seconds <= 0:  # as in kubectl, --timeout=0 checks once and does not wait
        try:
            obj = client.get(info.plural, name)
        except ApiError as exc:
            if exc.code == 404 and wanted.delete:
                return True
            raise
        return not wanted.delete and wanted.met(obj)
    if wanted.create:
        return _wait_created(client, info, name, seconds)
    deadline = time.monotonic() + seconds
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        exists = False
        listing = True
        for event in client.watch(info.plural, name, timeout=remaining):
            kind = event.get("type")
            if kind == "BOOKMARK":
                if listing and not exists:
                    if wanted.delete:
                        return True
                    raise CliError(f'{info.singular} "{name}" not found')
                listing = False
                continue
            changed = event.get("object")
            if kind == "DELETED":
                if wanted.delete:
                    return True
                raise CliError(f"{info.plural}/{name} was deleted while waiting for the condition")
            exists = True
            if not wanted.delete and isinstance(changed, dict) and wanted.met(changed):
                return True
        # The node ended the stream (it cuts off watchers that fall behind): watch again,
        # after a pause so that a node that keeps closing streams is not hammered.
        time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))


def _wait_created(client: ApiClient, info: KindInfo, name: str, seconds: float) -> bool:
    """Wait until ``name`` exists, watching its kind (a watch of one name ends at absence)."""
    for event in client.watch(info.plural, timeout=seconds):
        changed = event.get("object")
        if (
            event.get("type") in ("ADDED", "MODIFIED")
            and isinstance(changed, dict)
            and _get(changed, "metadata", "name") == name
        ):
            return True
    return False


@main.command()
@click.option("-w", "--watch", is_flag=True, help="After listing, print events as they happen")
@click.option("--for", "for_", metavar="KIND/NAME", help="Only events about this object")
@click.pass_context
def events(ctx: click.Context, watch: bool, for_: str | None) -> None:
    """List recent events of the node, oldest first."""
    kind = name = None
    if for_:
        info, names = split_ref(for_, [])
        kind, name = info.kind, names[0]
    client = _client(ctx)
    writer = TableWriter(EVENT_HEADERS)
    if not watch:
        items = client.events(kind=kind, name=name)
        if not items:
            click.echo("No events found.", err=True)
            return
        now = datetime.now(UTC)
        _echo("\n".join(writer.render([event_row(e, now) for e in items])))
        return
    initial: list[Obj] | None = []
    try:
        for line in client.watch_events(kind=kind, name=name):
            event = line.get("object")
            if line.get("type") == "BOOKMARK":
                if initial is not None:
                    now = datetime.now(UTC)
                    if initial:
                        _echo("\n".join(writer.render([event_row(e, now) for e in initial])))
                    initial = None
                continue
            if not isinstance(event, dict):
                continue
            if initial is not None:
                initial.append(event)
                continue
            _echo("\n".join(writer.render([event_row(event, datetime.now(UTC))])))
    except KeyboardInterrupt:
        raise click.exceptions.Exit(130) from None
    raise CliError("the node closed the watch")


@main.command()
@click.argument("file", metavar="FILE")
@click.option("--name", metavar="NAME", help="The Artifact's name [default: from the file name]")
@click.option(
    "--sign-key",
    metavar="KEY",
    help="Sign the digest and manifest with this publisher key (from 'pollen key create')",
)
@click.option("--version", "version", metavar="VERSION", help="The module's version, as published")
@click.option(
    "--executor",
    type=click.Choice(["http", "command"]),
    help="The executor the module is written for",
)
@click.option("--memory-mb", type=int, metavar="MB", help="Memory one instance needs, declared")
@click.pass_context
def push(
    ctx: click.Context,
    file: str,
    name: str | None,
    sign_key: str | None,
    version: str | None,
    executor: str | None,
    memory_mb: int | None,
) -> None:
    """Upload a WebAssembly module and record it as an Artifact; prints its digest."""
    from pathlib import Path

    from pollen.cli.push import PushError, read_module, read_sign_key, sign_module
    from pollen.cli.push import push as push_module

    try:
        module = read_module(
            Path(file), name, version=version, executor=executor, memory_mb=memory_mb
        )
        if sign_key is not None:
            module = sign_module(module, read_sign_key(Path(sign_key)))
        results = push_module(_client(ctx), module)
    except PushError as exc:
        raise CliError(str(exc)) from None
    for result in results:
        click.echo(apply_line(result), err=True)
    _echo(module.digest)


@main.command()
@click.argument("workload")
@click.option("-f", "--follow", is_flag=True, help="Stream new lines until the replicas stop")
@click.option(
    "--tail",
    type=int,
    default=-1,
    metavar="N",
    help="Only the last N lines of each replica [default: -1, every line kept]",
)
@click.option(
    "--prefix/--no-prefix",
    default=None,
    help="Start each line with [node/replica] [default: when there are several replicas]",
)
@click.option("--timestamps", is_flag=True, help="Start each line with its time")
@click.pass_context
def logs(
    ctx: click.Context,
    workload: str,
    follow: bool,
    tail: int,
    prefix: bool | None,
    timestamps: bool,
) -> None:
    """Print the logs of a workload's replicas, wherever in the swarm they run.

    With -f, new lines follow until the replicas stop; a workload not placed yet is waited for.
    """
    if tail < -1:
        raise click.BadParameter("must be -1 (every line) or more", param_hint="'--tail'")
    client = _client(ctx)
    if prefix is None:
        replicas = [
            r
            for r in client.list("replicas")
            if _get(r, "spec", "workload") == workload and _get(r, "spec", "node")
        ]
        prefix = len(replicas) > 1
    backlog: list[str] | None = []
    try:
        for line in client.logs(workload, follow=follow, tail=None if tail < 0 else tail):
            kind = line.get("type")
            if kind == "BOOKMARK":
                if backlog is not None:
                    if backlog:  # the kept lines in one write: click.echo flushes every call
                        _echo("\n".join(backlog))
                    backlog = None
            elif kind == "WARNING":
                click.echo(f"warning: {line.get('message')}", err=True)
            elif kind is None:
                text = log_text(line, prefix=prefix, timestamps=timestamps)
                if backlog is not None:
                    backlog.append(text)
                else:
                    _echo(text)
    except KeyboardInterrupt:
        raise click.exceptions.Exit(130) from None
    if backlog:
        _echo("\n".join(backlog))


@main.command()
@click.argument("kind", metavar="nodes|workloads")
@click.argument("name", required=False)
@click.pass_context
def top(ctx: click.Context, kind: str, name: str | None) -> None:
    """Show CPU and memory of nodes, or requests, CPU and memory of workloads."""
    info = resolve(kind)
    if info.kind not in ("Node", "Workload"):
        raise CliError(f"pctl top shows nodes or workloads, not {info.plural}")
    client = _client(ctx)
    objects = [client.get(info.plural, name)] if name else client.list(info.plural)
    if not objects:
        click.echo("No resources found.", err=True)
        return
    names = [str(_get(obj, "metadata", "name")) for obj in objects]
    if info.kind == "Node":
        # Only Ready nodes are asked: one that is down would hold the others' rows back.
        wanted = [n for n, obj in zip(names, objects, strict=True) if node_status(obj) == "Ready"]
        answers = _ask_each(client, wanted, lambda c, n: c.node_usage(n))
        _echo(render_table(TOP_NODE_HEADERS, [top_node_row(n, answers.get(n)) for n in names]))
        return
    answers = _ask_each(client, names, lambda c, n: c.workload_usage(n))
    for workload, metrics in answers.items():
        for warning in metrics.get("warnings") or []:
            click.echo(f"warning: workload {workload}: {warning}", err=True)
    _echo(render_table(TOP_WORKLOAD_HEADERS, [top_workload_row(n, answers.get(n)) for n in names]))


def _ask_each(
    client: ApiClient, names: Sequence[str], call: Callable[[ApiClient, str], Obj]
) -> dict[str, Obj]:
    """``call(client, name)`` for each name, a few at a time, each thread with its own
    connection; a name whose call failed is left out, with a warning."""
    from concurrent.futures import ThreadPoolExecutor

    from pollen.api.errors import ApiError

    def one(name: str) -> tuple[str, Obj | None]:
        with client.clone() as own:
            try:
                return name, call(own, name)
            except ApiError as exc:
                click.echo(f"warning: {name}: {exc}", err=True)
                return name, None

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, names))
    return {name: answer for name, answer in results if answer is not None}


@main.command()
@click.argument("kind")
def schema(kind: str) -> None:
    """Print the JSON Schema of a kind, for editors and validators."""
    from pollen.resources.schema import json_schema

    _echo(to_json(json_schema(resolve(kind).kind)))


if __name__ == "__main__":  # pragma: no cover
    main()
