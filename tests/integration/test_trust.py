"""Signed artifacts and the trust policy on real node processes (ADR 0016): forged signatures
refused at apply, a policy that refuses unsigned and untrusted artifacts with a condition and
starts them once it allows them, and ``pctl get artifacts -o wide``."""

from __future__ import annotations

import http.client
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from pollen.api.errors import ApiError
from pollen.cli.localnode import tool
from pollen.cli.pctl import human_size
from tests.helpers import wait_for
from tests.integration.test_mesh_nodes import Swarm, build_examples, running_swarm

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    """Two nodes, each Ready in the other's view; pctl's current context is n1."""
    build_examples("hello")
    with running_swarm(tmp_path_factory.mktemp("trust"), ["n1", "n2"]) as swarm:
        yield swarm


def run(swarm: Swarm, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), env=swarm.env, input=stdin, capture_output=True, text=True, timeout=60
    )


def pctl(swarm: Swarm, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return run(swarm, tool("pctl"), *args, stdin=stdin)


def make_key(swarm: Swarm, name: str) -> tuple[Path, str]:
    path = swarm.work / f"{name}.key"
    created = run(swarm, tool("pollen"), "key", "create", "--out", str(path))
    assert created.returncode == 0, created.stderr
    return path, created.stdout.strip()


def module(swarm: Swarm, tag: str) -> Path:
    """hello.wasm with a custom section naming ``tag``: the same program, its own digest."""
    payload = bytes([len(tag)]) + tag.encode()
    data = (ROOT / "build/examples/hello.wasm").read_bytes() + b"\x00" + bytes([len(payload)])
    path = swarm.work / f"{tag}.wasm"
    path.write_bytes(data + payload)
    return path


def push(swarm: Swarm, path: Path, name: str, *extra: str) -> str:
    pushed = pctl(swarm, "push", str(path), "--name", name, *extra)
    assert pushed.returncode == 0, pushed.stderr
    return pushed.stdout.strip()


def policy(allow_unsigned: bool, *signers: str) -> str:
    return json.dumps(
        {
            "apiVersion": "pollen.dev/v1alpha1",
            "kind": "TrustPolicy",
            "metadata": {"name": "cluster"},
            "spec": {"allowUnsigned": allow_unsigned, "trustedSigners": list(signers)},
        }
    )


def workload(name: str, artifact: str) -> dict[str, Any]:
    return {
        "apiVersion": "pollen.dev/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": name},
        "spec": {"artifact": artifact, "replicas": 1},
    }


def replica(swarm: Swarm, workload_name: str) -> dict[str, Any] | None:
    try:
        items = swarm.client("n1").list("replicas")
    except ApiError:
        return None
    found = [r for r in items if r["spec"]["workload"] == workload_name]
    return found[0] if len(found) == 1 else None


def ready(item: dict[str, Any] | None) -> dict[str, Any] | None:
    conditions = (item or {}).get("status", {}).get("conditions", [])
    found = [c for c in conditions if c["type"] == "Ready"]
    return found[0] if found else None


def wait_refused(swarm: Swarm, workload_name: str, reason: str) -> dict[str, Any]:
    def refused() -> dict[str, Any] | None:
        item = replica(swarm, workload_name)
        cond = ready(item)
        if item and cond and item["status"].get("phase") == "Failed":
            return item if (cond["status"], cond["reason"]) == ("False", reason) else None
        return None

    found = wait_for(refused, timeout=30, what=f"{workload_name} refused as {reason}")
    assert isinstance(found, dict)
    return found


def wait_ready(swarm: Swarm, workload_name: str) -> dict[str, Any]:
    found = wait_for(
        lambda: (r := replica(swarm, workload_name)) and r["status"].get("phase") == "Ready" and r,
        timeout=60,
        what=f"{workload_name} Ready",
    )
    assert isinstance(found, dict)
    return found


def gateway_status(swarm: Swarm, node: str, path: str) -> int:
    gateway = swarm.nodes[node].endpoints["gateway"]
    assert isinstance(gateway, str)
    conn = http.client.HTTPConnection(urlsplit(gateway).netloc, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def test_a_forged_or_mismatched_signature_is_refused_at_apply(pair: Swarm) -> None:
    key, _ = make_key(pair, "forger")
    push(pair, module(pair, "genuine"), "genuine", "--sign-key", str(key), "--version", "1.0")
    genuine = pair.client("n1").get("artifacts", "genuine")
    assert genuine["spec"]["version"] == "1.0"
    forgeries = {
        # The same signature over other bytes, another name, another version.
        "forged-digest": {**genuine["spec"], "digest": "sha256:" + "0" * 64},
        "forged-name": genuine["spec"],
        "forged-version": {**genuine["spec"], "version": "2.0"},
        "forged-bytes": {**genuine["spec"], "signature": "A" * 86 + "=="},
    }
    for name, spec in forgeries.items():
        manifest = {"apiVersion": "pollen.dev/v1alpha1", "kind": "Artifact"}
        manifest |= {"metadata": {"name": name}, "spec": spec}
        with pytest.raises(ApiError) as refused:
            pair.client("n1").apply([manifest])
        assert refused.value.code == 422
        assert "spec.signature" in refused.value.message
        assert "does not verify" in refused.value.message
        with pytest.raises(ApiError):  # nothing was written
            pair.client("n1").get("artifacts", name)
        applied = pctl(pair, "apply", "-f", "-", stdin=json.dumps(manifest))
        assert applied.returncode == 1
        assert applied.stdout == ""
        assert applied.stderr.count("\n") == 1 and "does not verify" in applied.stderr
    assert pair.client("n1").health()["status"] == "ok"


def test_the_policy_refuses_unsigned_and_untrusted_artifacts_until_it_allows_them(
    pair: Swarm,
) -> None:
    trusted_key, trusted_id = make_key(pair, "release")
    other_key, other_id = make_key(pair, "stranger")
    applied = pctl(pair, "apply", "-f", "-", stdin=policy(False, trusted_id))
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout == "trustpolicy.pollen.dev/cluster created\n"
    shown = pctl(pair, "get", "tp")
    assert shown.stdout.split("\n")[1].split()[:3] == ["cluster", "Refused", "1"]
    # The policy reached the other node, which judges its own replicas by it.
    wait_for(
        lambda: pair.client("n2").get("trustpolicies", "cluster")["spec"]["allowUnsigned"] is False,
        what="the policy on n2",
    )

    push(pair, module(pair, "trusted"), "trusted", "--sign-key", str(trusted_key))
    push(pair, module(pair, "untrusted"), "untrusted", "--sign-key", str(other_key))
    push(pair, module(pair, "unsigned"), "unsigned")
    pair.client("n1").apply(
        [
            workload("signed-web", "trusted"),
            workload("stranger-web", "untrusted"),
            workload("plain-web", "unsigned"),
        ]
    )
    wait_ready(pair, "signed-web")
    stranger = wait_refused(pair, "stranger-web", "Untrusted")
    assert other_id in ready(stranger)["message"]  # type: ignore[index]
    plain = wait_refused(pair, "plain-web", "UnsignedArtifact")
    assert "requires a trusted" in ready(plain)["message"]  # type: ignore[index]

    # Nothing runs: the gateway finds no Ready replica, and the holder said why in an event.
    assert gateway_status(pair, "n1", "/plain-web/") == 503
    holder = plain["spec"]["node"]
    events = pair.client(holder).events("Replica", plain["metadata"]["name"])
    assert [e["reason"] for e in events if e["type"] == "Warning"] == ["UnsignedArtifact"]
    assert not [e for e in events if e["reason"] == "Started"]

    # Level-triggered: once the policy allows them, both start, with no other change.
    applied = pctl(pair, "apply", "-f", "-", stdin=policy(True, trusted_id))
    assert applied.stdout == "trustpolicy.pollen.dev/cluster configured\n"
    wait_ready(pair, "plain-web")
    wait_ready(pair, "stranger-web")
    assert gateway_status(pair, "n1", "/plain-web/") == 200

    # Tightened again, what runs unsigned is stopped.
    pctl(pair, "apply", "-f", "-", stdin=policy(False, trusted_id))
    wait_refused(pair, "plain-web", "UnsignedArtifact")
    assert gateway_status(pair, "n1", "/plain-web/") == 503
    assert ready(replica(pair, "signed-web"))["status"] == "True"  # type: ignore[index]
    deleted = pctl(pair, "delete", "trustpolicy", "cluster")
    assert deleted.returncode == 0, deleted.stderr
    wait_ready(pair, "plain-web")
    for name in ("signed-web", "stranger-web", "plain-web"):
        pair.client("n1").delete("workloads", name)


def test_only_one_policy_named_cluster(pair: Swarm) -> None:
    manifest = json.loads(policy(False))
    manifest["metadata"]["name"] = "strict"
    applied = pctl(pair, "apply", "-f", "-", stdin=json.dumps(manifest))
    assert applied.returncode == 1
    assert 'metadata.name: there is one trust policy for the swarm, named "cluster"' in (
        applied.stderr
    )
    manifest = json.loads(policy(False, "ed25519:not-a-key"))
    applied = pctl(pair, "apply", "-f", "-", stdin=json.dumps(manifest))
    assert applied.returncode == 1
    assert "spec.trustedSigners[0]" in applied.stderr


def test_get_artifacts_wide_shows_size_signer_and_holders(pair: Swarm) -> None:
    key, key_id = make_key(pair, "shown")
    path = module(pair, "shown")
    digest = push(pair, path, "shown", "--sign-key", str(key))
    push(pair, module(pair, "plain-shown"), "plain-shown")
    # n2 fetches the bytes from n1 (a GET of a blob it lacks), then announces that it holds them.
    assert pair.client("n2").get_blob(digest).body == path.read_bytes()

    def row(name: str) -> list[str] | None:
        listed = pctl(pair, "get", "artifacts", "-o", "wide")
        lines = [line.split() for line in listed.stdout.splitlines()]
        found = [cells for cells in lines[1:] if cells[0] == name]
        return found[0] if found else None

    def shown_by_both() -> list[str] | None:
        cells = row("shown")
        return cells if cells is not None and cells[-1] == "n1,n2" else None

    cells = wait_for(shown_by_both, timeout=20, what="n2 among the holders")
    header = pctl(pair, "get", "artifacts", "-o", "wide").stdout.split("\n")[0].split()
    assert header == ["NAME", "DIGEST", "SIZE", "AGE", "SIGNER", "HOLDERS"]
    assert cells[:3] == ["shown", digest[:19], human_size(path.stat().st_size)]  # type: ignore[index]
    assert cells[4] == key_id[:20]  # type: ignore[index]
    assert row("plain-shown")[-2:] == ["<unsigned>", "n1"]  # type: ignore[index]
    as_json = json.loads(pctl(pair, "get", "artifact", "shown", "-o", "json").stdout)
    assert as_json["status"]["holders"] == ["n1", "n2"]
    assert as_json["spec"]["signer"] == key_id
