"""pctl as users run it: real ``pctl`` processes against a real ``pollen node`` process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pollen.api.client import ApiClient
from pollen.cli.config import Context, load_config, save_context
from pollen.cli.localnode import LocalNode, init_node, tool
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

PCTL = tool("pctl")
DIGEST = "sha256:" + "0" * 64


@dataclass
class Swarm:
    """One node, and the environment in which pctl's current context points at it."""

    node: LocalNode
    env: dict[str, str]
    work: Path

    def pctl(
        self, *args: str, stdin: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PCTL, *args],
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def client(self) -> ApiClient:
        return ApiClient(self.node.url, self.node.token)

    def manifests(self, name: str, documents: list[str]) -> Path:
        """A folder holding one file per document."""
        folder = self.work / name
        folder.mkdir()
        for index, text in enumerate(documents):
            (folder / f"{index:02d}.yaml").write_text(text)
        return folder


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    work = tmp_path_factory.mktemp("pctl")
    env = dict(os.environ, POLLEN_CONFIG=str(work / "config.yaml"))
    init_node(work / "node-1", "node-1", env=env)
    node = LocalNode(
        data_dir=work / "node-1",
        log_path=work / "node-1.log",
        env=env,
        extra_args=["--listen", "127.0.0.1:0"],
    )
    node.start()
    try:
        # The node points its context at the port it really bound, just after serving.
        wait_for(
            lambda: load_config(work / "config.yaml").context("node-1").server == node.url,
            what="the pctl context to point at the node",
        )
        yield Swarm(node=node, env=env, work=work)
    finally:
        node.kill()


def workload(name: str, replicas: int = 1, labels: str = "{}") -> str:
    return f"""\
apiVersion: pollen.dev/v1alpha1
kind: Workload
metadata:
  name: {name}
  labels: {labels}
spec:
  artifact: {DIGEST}
  replicas: {replicas}
"""


def lines_of(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()]


def assert_clean_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """One ``error:`` sentence on stderr, nothing on stdout, no traceback."""
    assert result.returncode != 0
    assert result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_apply_a_folder_then_get_in_every_format(swarm: Swarm) -> None:
    folder = swarm.manifests(
        "apply", [workload("alpha", 2, "{app: demo}"), workload("beta", 1, "{app: demo}")]
    )
    result = swarm.pctl("apply", "-f", str(folder))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "workload.pollen.dev/alpha created",
        "workload.pollen.dev/beta created",
    ]
    again = swarm.pctl("apply", "-f", str(folder))
    assert again.stdout.splitlines() == [
        "workload.pollen.dev/alpha unchanged",
        "workload.pollen.dev/beta unchanged",
    ]
    dry = swarm.pctl("apply", "--dry-run", "-f", "-", stdin=workload("alpha", 5))
    assert dry.stdout == "workload.pollen.dev/alpha configured (dry run)\n"
    assert swarm.client().get("workloads", "alpha")["spec"]["replicas"] == 2

    table = swarm.pctl("get", "workloads", "-l", "app=demo")
    assert table.returncode == 0, table.stderr
    rows = lines_of(table.stdout)
    assert rows[0] == ["NAME", "READY", "EXECUTOR", "ARTIFACT", "AGE"]
    assert [row[:4] for row in rows[1:]] == [
        ["alpha", "0/2", "http", "sha256:000000000000"],
        ["beta", "0/1", "http", "sha256:000000000000"],
    ]

    wide = swarm.pctl("get", "wl", "alpha", "-o", "wide")
    assert lines_of(wide.stdout)[0][5:] == ["GENERATION", "MEMORY", "CPU", "SELECTOR"]

    listed = json.loads(swarm.pctl("get", "wl", "-l", "app=demo", "-o", "json").stdout)
    assert listed["kind"] == "List"
    assert listed["apiVersion"] == "pollen.dev/v1alpha1"
    assert [item["metadata"]["name"] for item in listed["items"]] == ["alpha", "beta"]

    one = json.loads(swarm.pctl("get", "workload/alpha", "-o", "json").stdout)
    assert one["kind"] == "Workload"
    assert one["metadata"]["name"] == "alpha"

    as_yaml = yaml.safe_load(swarm.pctl("get", "wl", "alpha", "-o", "yaml").stdout)
    assert as_yaml == one

    names = swarm.pctl("get", "wl", "-l", "app=demo", "-o", "name")
    assert names.stdout == "workload/alpha\nworkload/beta\n"

    nodes = lines_of(swarm.pctl("get", "no").stdout)
    assert nodes[0] == ["NAME", "STATUS", "ADDRESSES", "AGE"]
    assert nodes[1][:2] == ["node-1", "Ready"]

    # What -o json prints can be applied again, as with kubectl.
    replay = swarm.pctl("apply", "-f", "-", stdin=json.dumps(listed))
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout.split() == [
        "workload.pollen.dev/alpha", "unchanged", "workload.pollen.dev/beta", "unchanged",
    ]  # fmt: skip


def test_empty_list_and_missing_object(swarm: Swarm) -> None:
    empty = swarm.pctl("get", "artifacts")
    assert empty.returncode == 0
    assert empty.stdout == ""
    assert empty.stderr == "No resources found.\n"
    assert json.loads(swarm.pctl("get", "art", "-o", "json").stdout)["items"] == []
    missing = swarm.pctl("get", "wl", "no-such-thing")
    assert_clean_error(missing, 'workload "no-such-thing" not found')


def test_describe(swarm: Swarm) -> None:
    swarm.pctl("apply", "-f", "-", stdin=workload("described", 1, "{team: a}"))
    result = swarm.pctl("describe", "wl", "described")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("Name:         described\n")
    assert "Labels:       team=a\n" in out
    assert "Generation:   1\n" in out
    assert "\nSpec:\n  Artifact:  " + DIGEST in out
    assert "  Replicas:  1\n" in out
    events = out[out.index("Events:") :].splitlines()
    assert events[1].split() == ["Type", "Reason", "Age", "From", "Message"]
    assert any(line.split()[:2] == ["Normal", "Created"] for line in events[3:])

    node = swarm.pctl("describe", "node/node-1")
    assert "  Conditions:\n" in node.stdout
    assert "Ready" in node.stdout[node.stdout.index("Conditions:") :]


def test_diff_exit_codes(swarm: Swarm) -> None:
    path = swarm.work / "diffed.yaml"
    path.write_text(workload("diffed", 1))
    assert swarm.pctl("apply", "-f", str(path)).returncode == 0

    same = swarm.pctl("diff", "-f", str(path))
    assert (same.returncode, same.stdout, same.stderr) == (0, "", "")

    path.write_text(workload("diffed", 3))
    changed = swarm.pctl("diff", "-f", str(path))
    assert changed.returncode == 1, changed.stderr
    assert "--- live/workload.pollen.dev/diffed\n" in changed.stdout
    assert "\n-  replicas: 1\n+  replicas: 3\n" in changed.stdout
    assert swarm.client().get("workloads", "diffed")["spec"]["replicas"] == 1  # nothing written

    new = swarm.pctl("diff", "-f", "-", stdin=workload("not-yet-there"))
    assert new.returncode == 1
    assert "+kind: Workload" in new.stdout

    broken = swarm.pctl("diff", "-f", "-", stdin=workload("bad", -1))
    assert broken.returncode == 2
    assert_clean_error(broken, "spec.replicas: must be >= 0")
    missing = swarm.pctl("diff", "-f", str(swarm.work / "absent.yaml"))
    assert missing.returncode == 2


def test_delete(swarm: Swarm) -> None:
    folder = swarm.manifests("delete", [workload("doomed-1"), workload("doomed-2")])
    swarm.pctl("apply", "-f", str(folder))
    one = swarm.pctl("delete", "wl", "doomed-1")
    assert (one.returncode, one.stdout) == (0, "workload.pollen.dev/doomed-1 deleted\n")
    by_file = swarm.pctl("delete", "-f", str(folder), "--ignore-not-found")
    assert (by_file.returncode, by_file.stdout) == (0, "workload.pollen.dev/doomed-2 deleted\n")
    again = swarm.pctl("delete", "wl", "doomed-1")
    assert_clean_error(again, 'workload "doomed-1" not found')


def test_wait(swarm: Swarm) -> None:
    ready = swarm.pctl("wait", "node/node-1", "--for=condition=Ready", "--timeout", "10s")
    assert (ready.returncode, ready.stdout) == (0, "node.pollen.dev/node-1 condition met\n")
    once = swarm.pctl("wait", "nodes", "node-1", "--for=condition=Ready=True", "--timeout=0")
    assert once.returncode == 0, once.stderr
    missing = swarm.pctl("wait", "wl/never-existed", "--for=condition=Ready")
    assert_clean_error(missing, 'workload "never-existed" not found')

    swarm.pctl("apply", "-f", "-", stdin=workload("waited"))
    started = time.monotonic()
    timed_out = swarm.pctl("wait", "wl/waited", "--for=condition=Never", "--timeout", "1s")
    assert time.monotonic() - started < 10
    assert timed_out.returncode == 1
    assert timed_out.stderr == "error: timed out waiting for the condition on workloads/waited\n"

    waiter = subprocess.Popen(
        [PCTL, "wait", "workload/waited", "--for=delete", "--timeout=30s"],
        env=swarm.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Give it time to be watching when the delete comes; if it is not yet, it finds the
        # object gone when it starts, which must end the same way. Either order passes.
        time.sleep(0.5)
        swarm.client().delete("workloads", "waited")
        out, err = waiter.communicate(timeout=30)
    finally:
        waiter.kill()
    assert (waiter.returncode, out, err) == (0, "workload.pollen.dev/waited deleted\n", "")

    gone = swarm.pctl("wait", "wl/never-existed", "--for=delete")
    assert gone.returncode == 0
    gone_now = swarm.pctl("wait", "wl/never-existed", "--for=delete", "--timeout=0")
    assert gone_now.returncode == 0


def test_bad_manifest_names_file_and_line_and_writes_nothing(swarm: Swarm) -> None:
    folder = swarm.manifests(
        "bad", [workload("fine-one"), workload("fine-two") + "---\n" + workload("broken", -1)]
    )
    result = swarm.pctl("apply", "-f", str(folder))
    assert_clean_error(
        result, f"{folder / '01.yaml'}: document 2, line 17: spec.replicas: must be >= 0"
    )
    assert result.stdout == ""
    names = [item["metadata"]["name"] for item in swarm.client().list("workloads")]
    assert not {"fine-one", "fine-two", "broken"} & set(names)


def test_errors_are_one_sentence(swarm: Swarm) -> None:
    assert_clean_error(swarm.pctl("get", "pods"), 'unknown kind "pods"')
    assert_clean_error(swarm.pctl("--context", "nope", "get", "wl"), 'context "nope" not found')
    assert_clean_error(swarm.pctl("apply", "-f", str(swarm.work / "absent.yaml")), "absent.yaml")

    config = swarm.work / "other-config.yaml"
    save_context(Context("wrong", swarm.node.url, "not-the-token"), make_current=True, path=config)
    save_context(Context("down", "http://127.0.0.1:1", "x"), make_current=False, path=config)
    env = dict(swarm.env, POLLEN_CONFIG=str(config))
    denied = subprocess.run(
        [PCTL, "get", "wl"], env=env, capture_output=True, text=True, check=False, timeout=60
    )
    assert_clean_error(denied, "refused the token")
    down = subprocess.run(
        [PCTL, "--context", "down", "get", "wl"],
        env=env, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert_clean_error(down, "cannot reach node at http://127.0.0.1:1: connection refused")


def test_get_watch_streams_changes_and_ends_quietly_on_ctrl_c(swarm: Swarm) -> None:
    watcher = subprocess.Popen(
        [PCTL, "get", "wl", "-w", "-l", "app=watched"],
        env=swarm.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stderr is not None and watcher.stdout is not None
        assert watcher.stderr.readline() == "No resources found.\n"
        swarm.pctl("apply", "-f", "-", stdin=workload("watched", 1, "{app: watched}"))
        assert watcher.stdout.readline().split() == ["NAME", "READY", "EXECUTOR", "ARTIFACT", "AGE"]
        assert watcher.stdout.readline().split()[:2] == ["watched", "0/1"]
        swarm.pctl("apply", "-f", "-", stdin=workload("watched", 4, "{app: watched}"))
        # Placement writes the Workload's status too (its artifact is held nowhere), so more
        # rows of the first generation may come first; each is a row of this Workload.
        rows = []
        while (row := watcher.stdout.readline().split()[:2]) != ["watched", "0/4"]:
            assert row[:1] == ["watched"] and len(rows) < 10, f"unexpected rows {[*rows, row]}"
            rows.append(row)
        watcher.send_signal(signal.SIGINT)
        watcher.wait(timeout=10)
        assert watcher.stderr.read() == ""
    finally:
        watcher.kill()
    assert watcher.returncode == 130


def test_events(swarm: Swarm) -> None:
    swarm.pctl("apply", "-f", "-", stdin=workload("eventful"))
    result = swarm.pctl("events")
    assert result.returncode == 0, result.stderr
    rows = lines_of(result.stdout)
    assert rows[0] == ["LAST", "SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]
    assert any(row[1:4] == ["Normal", "Created", "workload/eventful"] for row in rows[1:])
    only = swarm.pctl("events", "--for", "wl/eventful")
    assert all("workload/eventful" in line for line in only.stdout.splitlines()[1:])


def test_schema(swarm: Swarm) -> None:
    result = swarm.pctl("schema", "wl")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert "spec" in json.dumps(schema)
