"""The resource model: Workload, Replica, Artifact, Node and TrustPolicy, the Kubernetes way.

Every resource has ``apiVersion``, ``kind``, ``metadata`` (identity and bookkeeping), ``spec``
(desired state, written by users) and ``status`` (observed state, written by reconcilers).
Field names are camelCase on the wire and snake_case in Python. Unknown fields are rejected
everywhere, so a typo in a manifest is an error rather than a silently ignored key.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    model_validator,
)
from pydantic.alias_generators import to_camel

from pollen import API_VERSION as API_VERSION

API_GROUP = "pollen.dev"

# DNS-1123 subdomain, as Kubernetes uses for object names.
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# Label keys: optional DNS prefix and a name; values: empty or alphanumerics with -_. inside.
_LABEL_KEY_RE = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_name(value: str) -> str:
    if len(value) > 253 or not _NAME_RE.fullmatch(value):
        raise ValueError(
            "must be a lowercase DNS name: a-z, 0-9, '-' and '.', starting and ending "
            "with a letter or digit, at most 253 characters"
        )
    return value


def _check_labels(value: dict[str, str]) -> dict[str, str]:
    for key, item in value.items():
        if len(key) > 317 or not _LABEL_KEY_RE.fullmatch(key):
            raise ValueError(f"label key {key!r} is not a valid label key")
        if not _LABEL_VALUE_RE.fullmatch(item):
            raise ValueError(f"label value {item!r} for {key!r} is not a valid label value")
    return value


def _check_env(value: dict[str, str]) -> dict[str, str]:
    for key in value:
        if not _ENV_NAME_RE.fullmatch(key):
            raise ValueError(f"environment variable name {key!r} is not valid")
    return value


def _check_digest(value: str) -> str:
    if not DIGEST_RE.fullmatch(value):
        raise ValueError("must be sha256: followed by 64 lowercase hex digits")
    return value


class ArtifactReference(StrEnum):
    """What a Workload's ``spec.artifact`` names (see :func:`artifact_reference`)."""

    DIGEST = "digest"  # sha256:<64 lowercase hex digits>
    NAME = "name"  # an Artifact's metadata.name
    PATH = "path"  # a file on the machine running pctl, which pctl apply pushes first


def is_local_path(value: str) -> bool:
    """Whether ``value`` is written as a local path: ``./``, ``../`` or ``/`` first, or
    ``.wasm`` last (so ``hello.wasm`` is a file, never an Artifact named so)."""
    return value.startswith(("./", "../", "/")) or value.endswith(".wasm")


def artifact_reference(value: str) -> ArtifactReference:
    """The one rule for what ``spec.artifact`` refers to: a digest, a local path, or an
    Artifact's name, in that order of precedence. Raises ``ValueError`` for anything else."""
    if DIGEST_RE.fullmatch(value):
        return ArtifactReference.DIGEST
    if value.startswith("sha256:"):
        raise ValueError("a digest must be sha256: followed by 64 lowercase hex digits")
    if is_local_path(value):
        return ArtifactReference.PATH
    if len(value) <= 253 and _NAME_RE.fullmatch(value):
        return ArtifactReference.NAME
    raise ValueError(
        "must be a sha256: digest, the name of an Artifact, or (in a manifest) a local path "
        "such as ./hello.wasm"
    )


def _check_artifact_reference(value: str) -> str:
    artifact_reference(value)
    return value


ObjectName = Annotated[str, AfterValidator(_check_name)]
Labels = Annotated[dict[str, str], AfterValidator(_check_labels)]
Digest = Annotated[str, AfterValidator(_check_digest)]
ShortText = Annotated[str, StringConstraints(max_length=4096)]
Timestamp = Annotated[
    str,
    StringConstraints(pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$"),
]


class Model(BaseModel):
    """Base of every record: camelCase aliases, unknown fields rejected, immutable."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        strict=False,
        str_max_length=65536,
    )


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(Model):
    """One observed aspect of a resource, as in Kubernetes ``status.conditions``."""

    type: Annotated[str, StringConstraints(min_length=1, max_length=316)]
    status: ConditionStatus
    reason: Annotated[str, StringConstraints(max_length=1024)] = ""
    message: Annotated[str, StringConstraints(max_length=32768)] = ""
    last_transition_time: Timestamp | None = None
    observed_generation: Annotated[int, Field(strict=True, ge=0)] | None = None


class ObjectMeta(Model):
    """Identity and bookkeeping common to every resource."""

    name: ObjectName
    uid: Annotated[str, StringConstraints(max_length=128)] | None = None
    labels: Labels = Field(default_factory=dict)
    annotations: dict[str, Annotated[str, StringConstraints(max_length=262144)]] = Field(
        default_factory=dict
    )
    generation: Annotated[int, Field(strict=True, ge=0)] | None = None
    creation_timestamp: Timestamp | None = None
    deletion_timestamp: Timestamp | None = None
    finalizers: list[Annotated[str, StringConstraints(min_length=1, max_length=316)]] = Field(
        default_factory=list
    )


class Status(Model):
    """Observed state shared by every kind: conditions and the generation they describe."""

    observed_generation: Annotated[int, Field(strict=True, ge=0)] | None = None
    conditions: list[Condition] = Field(default_factory=list)


class Resource(Model):
    """Common shape of every kind. Subclasses narrow ``kind``, ``spec`` and ``status``."""

    KIND: ClassVar[str] = ""
    PLURAL: ClassVar[str] = ""
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ()

    api_version: Literal["pollen.dev/v1alpha1"] = API_VERSION
    kind: str
    metadata: ObjectMeta
    spec: Any = None
    status: Any = None

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def key(self) -> tuple[str, str]:
        """The identity of this object in the store: (kind, name)."""
        return (self.kind, self.metadata.name)

    def condition(self, condition_type: str) -> Condition | None:
        """The condition of ``condition_type`` in ``status``, if any."""
        status = self.status
        if status is None:
            return None
        for cond in getattr(status, "conditions", []):
            if cond.type == condition_type:
                return cond  # type: ignore[no-any-return]
        return None


# --- Workload -------------------------------------------------------------------------------


class Executor(StrEnum):
    HTTP = "http"
    COMMAND = "command"


class Spread(StrEnum):
    """How replicas of one Workload are spread over nodes."""

    NONE = "none"  # any node may hold several replicas
    PREFERRED = "preferred"  # distinct nodes while there are enough, then share
    STRICT = "strict"  # never two replicas on one node


class ResourceRequirements(Model):
    """What one instance of a Workload may use."""

    memory_mb: Annotated[int, Field(strict=True, ge=1, le=1_048_576, alias="memoryMB")] = 64
    cpu_millis: Annotated[int, Field(strict=True, ge=1, le=1_024_000)] = 100
    timeout_ms: Annotated[int, Field(strict=True, ge=1, le=86_400_000)] = 30_000


class Placement(Model):
    node_selector: Labels = Field(default_factory=dict)
    spread: Spread = Spread.PREFERRED


class Budget(Model):
    """Swarm-wide ceilings for one Workload; a replica beyond them stays unscheduled."""

    max_instances: Annotated[int, Field(strict=True, ge=0)] | None = None
    cpu_millis: Annotated[int, Field(strict=True, ge=0)] | None = None
    memory_mb: Annotated[int, Field(strict=True, ge=0)] | None = Field(
        default=None, alias="memoryMB"
    )


class WorkloadSpec(Model):
    artifact: Annotated[
        str,
        StringConstraints(min_length=1, max_length=4096),
        AfterValidator(_check_artifact_reference),
    ]
    replicas: Annotated[int, Field(strict=True, ge=0, le=10_000)] | None = None
    min_replicas: Annotated[int, Field(strict=True, ge=0, le=10_000)] | None = None
    max_replicas: Annotated[int, Field(strict=True, ge=0, le=10_000)] | None = None
    executor: Executor = Executor.HTTP
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    env: Annotated[dict[str, ShortText], AfterValidator(_check_env)] = Field(default_factory=dict)
    args: list[ShortText] = Field(default_factory=list)
    placement: Placement = Field(default_factory=Placement)
    budget: Budget = Field(default_factory=Budget)
    priority: Annotated[int, Field(strict=True, ge=-1000, le=1000)] = 0
    health_path: Annotated[str, StringConstraints(pattern=r"^/", max_length=2048)] | None = None

    @model_validator(mode="after")
    def _replica_counts(self) -> WorkloadSpec:
        if self.replicas is not None and (
            self.min_replicas is not None or self.max_replicas is not None
        ):
            raise ValueError("give either replicas or minReplicas/maxReplicas, not both")
        if (
            self.min_replicas is not None
            and self.max_replicas is not None
            and self.min_replicas > self.max_replicas
        ):
            raise ValueError("minReplicas must be <= maxReplicas")
        return self

    @property
    def desired_replicas(self) -> int:
        """How many replicas the swarm should run: ``replicas``, else ``minReplicas``, else 1."""
        if self.replicas is not None:
            return self.replicas
        if self.min_replicas is not None:
            return self.min_replicas
        return 1


class WorkloadStatus(Status):
    replicas: Annotated[int, Field(strict=True, ge=0)] = 0
    ready_replicas: Annotated[int, Field(strict=True, ge=0)] = 0


class Workload(Resource):
    """A WebAssembly module to keep running somewhere in the swarm, ``replicas`` times."""

    KIND: ClassVar[str] = "Workload"
    PLURAL: ClassVar[str] = "workloads"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("wl",)

    kind: Literal["Workload"] = "Workload"
    spec: WorkloadSpec
    status: WorkloadStatus = Field(default_factory=WorkloadStatus)


# --- Replica --------------------------------------------------------------------------------


class ReplicaPhase(StrEnum):
    PENDING = "Pending"
    FETCHING = "Fetching"
    STARTING = "Starting"
    READY = "Ready"
    DRAINING = "Draining"
    STOPPED = "Stopped"
    FAILED = "Failed"


class ReplicaSpec(Model):
    workload: ObjectName
    workload_generation: Annotated[int, Field(strict=True, ge=0)] = 0
    #: Which version of the Workload's instance template this replica runs: a hash of what
    #: an instance is made from (artifact, executor, resources, env, args, health path), so
    #: that scaling or re-placing a Workload does not roll its replicas, and changing it does.
    revision: Annotated[str, StringConstraints(max_length=64, pattern=r"^[0-9a-f]*$")] = ""
    # Empty until the claiming node resolves the Workload's artifact; the default must be a
    # valid value, or a Replica stored with it would not validate when read back.
    artifact: Annotated[str, StringConstraints(max_length=4096)] = ""
    node: ObjectName | None = None
    # Finite: claims are ordered by score on every node, and NaN compares false with everything
    # (and serializes to JSON null, which would not validate back).
    score: Annotated[float, Field(allow_inf_nan=False)] = 0.0


class ReplicaStatus(Status):
    phase: ReplicaPhase = ReplicaPhase.PENDING
    node: ObjectName | None = None
    message: Annotated[str, StringConstraints(max_length=32768)] = ""


class Replica(Resource):
    """One claimed instance slot of a Workload: which node holds it and how it fares."""

    KIND: ClassVar[str] = "Replica"
    PLURAL: ClassVar[str] = "replicas"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("rep",)

    kind: Literal["Replica"] = "Replica"
    spec: ReplicaSpec
    status: ReplicaStatus = Field(default_factory=ReplicaStatus)


# --- Artifact -------------------------------------------------------------------------------


class ArtifactNeeds(Model):
    """What the publisher declares one instance of the module needs (signed with it)."""

    memory_mb: Annotated[int, Field(strict=True, ge=1, le=1_048_576)] | None = Field(
        default=None, alias="memoryMB"
    )


class ArtifactSpec(Model):
    """An artifact's manifest. With a ``signature``, ``signer`` signed the digest and the
    manifest fields (``pollen.resources.signing``); without one, ``signer`` is an unverified
    claim and the artifact counts as unsigned."""

    digest: Digest
    size: Annotated[int, Field(strict=True, ge=0)]
    media_type: Annotated[str, StringConstraints(max_length=255)] = "application/wasm"
    version: Annotated[str, StringConstraints(max_length=255)] | None = None
    #: The executor the module is written for, as its publisher declares it.
    executor: Executor | None = None
    needs: ArtifactNeeds | None = None
    signer: Annotated[str, StringConstraints(max_length=1024)] | None = None
    signature: Annotated[str, StringConstraints(max_length=1024)] | None = None


class ArtifactStatus(Status):
    #: The nodes that advertise the artifact's bytes in membership gossip, as the node that
    #: answered the request sees them. Filled in when served; never stored in the document.
    holders: list[ObjectName] | None = None


class Artifact(Resource):
    """Content-addressed code: a digest, its size, and who signed it."""

    KIND: ClassVar[str] = "Artifact"
    PLURAL: ClassVar[str] = "artifacts"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("art",)

    kind: Literal["Artifact"] = "Artifact"
    spec: ArtifactSpec
    status: ArtifactStatus = Field(default_factory=ArtifactStatus)


# --- Node -----------------------------------------------------------------------------------


class Capacity(Model):
    memory_mb: Annotated[int, Field(strict=True, ge=0, alias="memoryMB")] = 0
    cpu_millis: Annotated[int, Field(strict=True, ge=0)] = 0


class NodeSpec(Model):
    addresses: list[Annotated[str, StringConstraints(max_length=1024)]] = Field(
        default_factory=list
    )
    capacity: Capacity = Field(default_factory=Capacity)
    unschedulable: StrictBool = False


class NodeStatus(Status):
    api: Annotated[str, StringConstraints(max_length=1024)] | None = None
    version: Annotated[str, StringConstraints(max_length=255)] | None = None
    #: Round trip from the node that answered the request, estimated from Vivaldi coordinates.
    #: Filled in by that node when it serves the object; never stored in the document.
    estimated_rtt_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = Field(
        default=None, alias="estimatedRTTMs"
    )


class Node(Resource):
    """A member of the swarm. Fast-changing facts (load, coordinates) travel in gossip."""

    KIND: ClassVar[str] = "Node"
    PLURAL: ClassVar[str] = "nodes"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("no",)

    kind: Literal["Node"] = "Node"
    spec: NodeSpec = Field(default_factory=NodeSpec)
    status: NodeStatus = Field(default_factory=NodeStatus)


# --- TrustPolicy ----------------------------------------------------------------------------

#: The name of the one TrustPolicy of a swarm.
TRUST_POLICY_NAME = "cluster"
#: A signer: ``ed25519:`` and the standard base64 of a raw 32-byte Ed25519 public key. The last
#: character before ``=`` carries 4 bits and 2 zero bits, so every key has exactly one spelling.
SIGNER_RE = re.compile(r"^ed25519:[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$")


def _check_signer(value: str) -> str:
    if not SIGNER_RE.fullmatch(value):
        raise ValueError(
            "must be ed25519: followed by the base64 of a 32-byte public key, as "
            "'pollen key create' prints it"
        )
    return value


SignerId = Annotated[str, AfterValidator(_check_signer)]


class TrustPolicySpec(Model):
    """Which artifacts nodes may run. A signature that does not verify never runs."""

    #: Whether artifacts without a trusted signature (unsigned, or signed by a key not listed
    #: below) may run. True when no TrustPolicy exists, so that a new swarm runs what it is given.
    allow_unsigned: StrictBool = True
    #: The publishers whose signatures are trusted.
    trusted_signers: list[SignerId] = Field(default_factory=list)


def _check_trust_policy_name(value: str) -> str:
    if value != TRUST_POLICY_NAME:
        raise ValueError(f'there is one trust policy for the swarm, named "{TRUST_POLICY_NAME}"')
    return value


class TrustPolicyMeta(ObjectMeta):
    """A TrustPolicy's metadata: the name is always ``cluster``."""

    name: Annotated[str, AfterValidator(_check_trust_policy_name)]


class TrustPolicy(Resource):
    """The swarm's trust policy for artifacts: one object, named ``cluster``."""

    KIND: ClassVar[str] = "TrustPolicy"
    PLURAL: ClassVar[str] = "trustpolicies"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("tp",)

    kind: Literal["TrustPolicy"] = "TrustPolicy"
    metadata: TrustPolicyMeta
    spec: TrustPolicySpec = Field(default_factory=TrustPolicySpec)
    status: Status = Field(default_factory=Status)


# --- Registry and conversion ----------------------------------------------------------------

KIND_MODELS: dict[str, type[Resource]] = {
    model.KIND: model for model in (Workload, Replica, Artifact, Node, TrustPolicy)
}

_KIND_ALIASES: dict[str, str] = {}
for _model in KIND_MODELS.values():
    for _alias in (_model.KIND.lower(), _model.PLURAL, *_model.SHORT_NAMES):
        _KIND_ALIASES[_alias] = _model.KIND


class UnknownKindError(ValueError):
    """A kind name that is none of the kinds in :data:`KIND_MODELS` or their aliases."""


def resolve_kind(name: str) -> str:
    """The canonical kind for a singular, plural or short name, case-insensitively.

    >>> resolve_kind("wl")
    'Workload'
    """
    kind = _KIND_ALIASES.get(name.lower())
    if kind is None:
        known = ", ".join(sorted(KIND_MODELS))
        raise UnknownKindError(f'unknown kind "{name}"; known kinds: {known}')
    return kind


def to_dict(resource: Resource) -> dict[str, Any]:
    """The JSON form of ``resource``: camelCase keys, ``None`` values left out."""
    return resource.model_dump(mode="json", by_alias=True, exclude_none=True)


def from_dict(data: Any) -> Resource:
    """Validate a JSON-like mapping into the model its ``kind`` names.

    Raises ``UnknownKindError`` for a missing or unknown kind and ``pydantic.ValidationError``
    for anything else that is wrong.
    """
    if not isinstance(data, dict):
        raise UnknownKindError("a resource must be a mapping with apiVersion and kind")
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in KIND_MODELS:
        known = ", ".join(sorted(KIND_MODELS))
        raise UnknownKindError(f"unknown kind {kind!r}; known kinds: {known}")
    return KIND_MODELS[kind].model_validate(data)
