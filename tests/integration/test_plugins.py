"""Reconciler plugins in a real node process: the example plugin at work, broken ones survived.

The plugins are installed packages (development dependencies): the example in
``examples/plugins/pollen-signer-label`` and the deliberately broken ones in
``tests/plugins/pollen-test-plugins``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import NodeProcess
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

SIGNER = "example.com/signer"
DIGEST_SIGNED = "sha256:" + "1" * 64
DIGEST_UNSIGNED = "sha256:" + "2" * 64


def artifact(name: str, digest: str, signer: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"digest": digest, "size": 1024}
    if signer is not None:
        spec["signer"] = signer
    return {
        "apiVersion": "pollen.dev/v1alpha1",
        "kind": "Artifact",
        "metadata": {"name": name},
        "spec": spec,
    }


def workload(name: str, artifact_ref: str) -> dict[str, Any]:
    return {
        "apiVersion": "pollen.dev/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": name},
        "spec": {"artifact": artifact_ref, "replicas": 1},
    }


def condition(obj: dict[str, Any], condition_type: str) -> dict[str, Any] | None:
    for item in obj.get("status", {}).get("conditions", []):
        if item["type"] == condition_type:
            return item  # type: ignore[no-any-return]
    return None


def start(node_factory: Callable[..., NodeProcess], *plugins: str) -> NodeProcess:
    args = ["--listen", "127.0.0.1:0"]
    for plugin in plugins:
        args += ["--plugin", plugin]
    return node_factory("node-1", *args)


def test_the_example_plugin_labels_workloads_with_their_signer(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = start(node_factory, "signer-label")
    client = node.client()
    loaded = condition(client.get("nodes", "node-1"), "PluginsLoaded")
    assert loaded is not None
    assert (loaded["status"], loaded["message"]) == ("True", "running plugins: signer-label")
    client.apply(
        [
            artifact("hello", DIGEST_SIGNED, "Release Team <release@example.com>"),
            artifact("scratch", DIGEST_UNSIGNED, None),
            workload("by-name", "hello"),
            workload("by-digest", DIGEST_SIGNED),
            workload("orphan", "sha256:" + "3" * 64),
        ]
    )

    def labelled(name: str) -> str | None:
        return client.get("workloads", name)["metadata"].get("labels", {}).get(SIGNER)

    wait_for(lambda: labelled("by-name") and labelled("by-digest"), what="signer labels")
    assert labelled("by-name") == "Release-Team-release-example.com"
    by_name = client.get("workloads", "by-name")
    assert by_name["metadata"]["annotations"][SIGNER] == "Release Team <release@example.com>"
    signed = condition(by_name, "Signed")
    assert signed is not None
    assert (signed["status"], signed["reason"], signed["observedGeneration"]) == (
        "True",
        "Signed",
        1,
    )
    # Selectable by signer, through the API as pctl does it.
    selected = client.list("workloads", label_selector=f"{SIGNER}=Release-Team-release-example.com")
    assert sorted(item["metadata"]["name"] for item in selected) == ["by-digest", "by-name"]
    wait_for(lambda: condition(client.get("workloads", "orphan"), "Signed"))
    orphan = condition(client.get("workloads", "orphan"), "Signed")
    assert orphan is not None and (orphan["status"], orphan["reason"]) == (
        "Unknown",
        "ArtifactNotFound",
    )
    # Level-triggered: point the Workload at an unsigned artifact and the label goes.
    client.apply([workload("by-name", "scratch")])
    wait_for(lambda: labelled("by-name") is None, what="the label to go")
    unsigned = condition(client.get("workloads", "by-name"), "Signed")
    assert unsigned is not None
    assert (unsigned["status"], unsigned["reason"], unsigned["observedGeneration"]) == (
        "False",
        "Unsigned",
        2,
    )
    reasons = {e["reason"] for e in client.events(kind="Workload", name="by-digest")}
    assert "SignerLabelled" in reasons
    # The same through pctl, as a user would look.
    shown = node.pctl("get", "workloads", "-l", f"{SIGNER}=Release-Team-release-example.com")
    assert shown.returncode == 0, shown.stderr
    assert b"by-digest" in shown.stdout and b"by-name" not in shown.stdout


def test_broken_plugins_are_left_out_and_the_node_says_why(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = start(
        node_factory,
        "broken-import",
        "broken-factory",
        "not-a-reconciler",
        "no-such-plugin",
        "hanging",
        "signer-label",
    )
    client = node.client()
    assert client.health()["status"] == "ok"
    own = client.get("nodes", "node-1")
    loaded = condition(own, "PluginsLoaded")
    assert loaded is not None
    assert (loaded["status"], loaded["reason"]) == ("False", "PluginFailed")
    for name in ("broken-import", "broken-factory", "not-a-reconciler", "no-such-plugin"):
        assert f'plugin "{name}"' in loaded["message"]
    warnings = [
        e
        for e in client.events(kind="Node", name="node-1")
        if e["reason"] == "PluginFailed" and e["type"] == "Warning"
    ]
    assert len(warnings) == 4
    log = node.log_path.read_text()
    assert (
        'plugin "broken-import" (pollen_test_plugins.missing:factory) cannot be imported: '
        "ModuleNotFoundError" in log
    )
    assert "its factory raised RuntimeError: the plugin's configuration is missing" in log
    assert "which is not a reconciler: it has no kind, reconcile" in log
    assert 'no plugin "no-such-plugin" is installed' in log
    assert log.count("the node runs without it") == 4
    described = node.pctl("describe", "node", "node-1")
    assert described.returncode == 0, described.stderr
    assert b"PluginsLoaded" in described.stdout and b"PluginFailed" in described.stdout
    # The plugins that did load run: one hangs on every object, the other is not held up.
    client.apply([artifact("hello", DIGEST_SIGNED, "ops"), workload("web", "hello")])
    wait_for(
        lambda: client.get("workloads", "web")["metadata"].get("labels", {}).get(SIGNER) == "ops",
        what="the working plugin to label the workload",
    )
    assert 'plugin "hanging" enabled' in node.log_path.read_text()
    assert client.health()["status"] == "ok"
    # Nor does the hanging one hold up a graceful stop.
    assert node.stop(timeout=15) == 0
