"""``pctl logs`` and ``pctl top`` against three real nodes running real wasm modules.

pctl talks to n1 throughout; the workloads are pinned to n2 and n3 (``pollen.dev/hostname``, or
the ``role=worker`` label those two carry), so what pctl shows comes from other nodes, through
n1's node proxy.
"""

from __future__ import annotations

import http.client
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pollen.api.client import ApiClient
from pollen.api.errors import ApiError
from pollen.api.server import PREFIX
from pollen.cli.localnode import LocalNode, tool
from tests.helpers import wait_for
from tests.integration.test_mesh_nodes import Swarm, running_swarm

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["n1", "n2", "n3"]
CALLED = "caller: calling another workload"  # what caller logs (pollen.log) on each request


def workload(name: str, artifact: str, executor: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "pollen.dev/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": name},
        "spec": {"artifact": artifact, "executor": executor, **spec},
    }


def cpu_job(name: str, iterations: int, every: int, **spec: Any) -> dict[str, Any]:
    return workload(
        name,
        "cpu",
        "command",
        args=["--iterations", str(iterations)],
        env={"REPORT_EVERY": str(every)},
        **spec,
    )


def on(node: str) -> dict[str, Any]:
    return {"nodeSelector": {"pollen.dev/hostname": node}}


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    """n1, and n2 and n3 labelled ``role=worker``; cpu, caller and echo pushed; pctl on n1."""
    worker = ["--label", "role=worker"]
    with running_swarm(
        tmp_path_factory.mktemp("observe"),
        NAMES,
        push=["cpu", "caller", "echo"],
        extra={"n2": worker, "n3": worker},
    ) as swarm:
        yield swarm


def pctl(swarm: Swarm, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """pctl against n1 (the context ``pollen init`` made current)."""
    result = subprocess.run(
        [tool("pctl"), *args], env=swarm.env, capture_output=True, text=True, timeout=120
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def replicas(swarm: Swarm, name: str) -> list[dict[str, Any]]:
    try:
        items = swarm.client("n1").list("replicas")
    except ApiError:
        return []
    return [r for r in items if r["spec"]["workload"] == name]


def phases(swarm: Swarm, name: str) -> list[tuple[str, str]]:
    """(node, phase) of each replica of ``name``, as n1 sees them."""
    return sorted(
        (r["spec"].get("node") or "", r["status"].get("phase", "")) for r in replicas(swarm, name)
    )


def get(url: str, path: str) -> int:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def gateway(swarm: Swarm, node: str = "n1") -> str:
    url = swarm.nodes[node].endpoints["gateway"]
    assert isinstance(url, str)
    return url


@pytest.fixture(scope="module")
def http_workloads(trio: Swarm) -> Swarm:
    """caller on n3, echo anywhere; both Ready."""
    trio.client("n1").apply(
        [workload("caller", "caller", "http", replicas=1, placement=on("n3")),
         workload("echo", "echo", "http", replicas=1)]
    )  # fmt: skip
    for name in ("caller", "echo"):
        wait_for(
            lambda n=name: [p for _, p in phases(trio, n)] == ["Ready"], 60, what=f"{name} Ready"
        )
    assert phases(trio, "caller") == [("n3", "Ready")]
    return trio


def test_logs_of_a_job_come_from_the_node_that_ran_it(trio: Swarm) -> None:
    trio.client("n1").apply([cpu_job("job", 300_000, 100_000, replicas=1, placement=on("n2"))])
    wait_for(lambda: phases(trio, "job") == [("n2", "Stopped")], 60, what="the job to complete")
    shown = pctl(trio, "logs", "job")
    lines = shown.stdout.splitlines()
    # cpu reports progress on stderr and its result on stdout; the runtime notes the exit.
    assert lines[:3] == [
        "cpu: 100000 of 300000 checked",
        "cpu: 200000 of 300000 checked",
        "primes below 300000: 25997",
    ]
    assert re.fullmatch(r"run 1 exited with status 0 after [0-9.]+ s", lines[3]), lines
    assert shown.stderr == ""

    # One replica: no prefix unless asked for; --tail per replica; --timestamps before the text.
    tailed = pctl(trio, "logs", "job", "--tail", "2", "--prefix", "--timestamps").stdout
    first, second = tailed.splitlines()
    assert re.fullmatch(r"\[n2/job-[0-9a-f]+\] \S+Z primes below 300000: 25997", first), first
    assert second.startswith("[n2/job-")
    assert pctl(trio, "logs", "job", "--tail", "0").stdout == ""

    # The API says where each line comes from.
    lines = list(trio.client("n1").logs("job"))
    assert lines[-1] == {"type": "BOOKMARK"}
    assert {(line["node"], line["stream"]) for line in lines[:-1]} == {
        ("n2", "stderr"),
        ("n2", "stdout"),
        ("n2", "system"),
    }
    # n1 runs no replica of it: its own part is empty.
    assert list(trio.client("n1").logs("job", local=True)) == [{"type": "BOOKMARK"}]


def test_logs_follow_a_job_until_it_completes(trio: Swarm) -> None:
    trio.client("n1").apply([cpu_job("long", 6_000_000, 1_000_000, replicas=1, placement=on("n3"))])
    # Right after apply, as the example manifest's comment does: follow waits for placement.
    follower = pctl(trio, "logs", "long", "-f")
    lines = follower.stdout.splitlines()
    assert lines[0] == "cpu: 1000000 of 6000000 checked"
    assert lines[-2] == "primes below 6000000: 412849"
    assert lines[-1].startswith("run 1 exited with status 0")
    # The stream ended because the job did: n3 says so in the document too.
    wait_for(lambda: phases(trio, "long") == [("n3", "Stopped")], 30, what="long Stopped")


class Follower:
    """``pctl logs ... -f`` in the background, its output lines collected as they come."""

    def __init__(self, swarm: Swarm, *args: str) -> None:
        self.proc = subprocess.Popen(
            [tool("pctl"), "logs", *args, "-f"],
            env=swarm.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def interrupt(self) -> tuple[int, str]:
        """Ctrl-C: the exit status and what went to stderr."""
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=30)
        self._reader.join(10)
        return self.proc.returncode, err


def test_follow_streams_a_new_line_from_another_node(http_workloads: Swarm) -> None:
    swarm = http_workloads
    # --tail 0: nothing kept is shown, so every line printed was logged while following.
    follower = Follower(swarm, "caller", "--tail", "0")
    last = [0.0]

    def requested_and_streamed() -> bool:
        # The follower's stream may not be open yet: ask again now and then until a line
        # logged after it opened comes through.
        if time.monotonic() - last[0] > 0.5:
            assert get(gateway(swarm), "/caller/?to=echo") == 200
            last[0] = time.monotonic()
        return CALLED in follower.lines

    try:
        wait_for(requested_and_streamed, 30, what="a new line streamed from n3")
    finally:
        code, err = follower.interrupt()
    assert code == 130
    assert err == ""
    assert set(follower.lines) == {CALLED}


def top_rows(swarm: Swarm, *args: str) -> dict[str, list[str]]:
    out = pctl(swarm, "top", *args).stdout.splitlines()
    return {line.split()[0]: line.split() for line in out}


def test_top_nodes_lists_every_node(http_workloads: Swarm) -> None:
    rows = top_rows(http_workloads, "nodes")
    assert rows["NAME"] == ["NAME", "CPU%", "MEMORY", "MEMORY%", "INSTANCES"]
    assert sorted(rows) == ["NAME", *NAMES]
    for name in NAMES:
        _, cpu, memory, memory_percent, instances = rows[name]
        assert re.fullmatch(r"\d+%", cpu), rows[name]
        assert re.fullmatch(r"\d+Mi", memory), rows[name]
        assert re.fullmatch(r"\d+%", memory_percent), rows[name]
        assert instances.isdigit()
    assert int(rows["n3"][4]) >= 1  # caller runs there
    # Through n1, each node answers for itself.
    metrics = http_workloads.client("n1").node_usage("n3")
    assert (metrics["kind"], metrics["metadata"]["name"]) == ("NodeMetrics", "n3")
    assert metrics["usage"]["memoryTotalBytes"] > metrics["usage"]["memoryUsedBytes"] > 0


def test_top_workloads_counts_requests_as_they_grow(http_workloads: Swarm) -> None:
    swarm = http_workloads
    rows = top_rows(swarm, "workloads")
    assert rows["NAME"] == ["NAME", "REPLICAS", "REQUESTS", "ERRORS", "CPU", "MEMORY"]
    before = int(rows["caller"][2])
    for _ in range(3):
        assert get(gateway(swarm, "n2"), "/caller/?to=echo") == 200
    wait_for(
        lambda: int(top_rows(swarm, "workloads", "caller")["caller"][2]) >= before + 3,
        30,
        what="caller's request count to grow by 3",
    )
    row = top_rows(swarm, "workloads", "caller")["caller"]
    assert row[1] == "1" and row[3] == "0"
    usage = swarm.client("n1").workload_usage("caller")
    assert [(r["node"], r["phase"]) for r in usage["replicas"]] == [("n3", "Ready")]
    assert usage["replicas"][0]["cpuSeconds"] > 0
    assert usage["warnings"] == []


def test_an_unknown_workload_is_a_clear_error(trio: Swarm) -> None:
    for args in (["logs", "nosuch"], ["logs", "nosuch", "-f"], ["top", "workloads", "nosuch"]):
        result = pctl(trio, *args, check=False)
        assert result.returncode == 1, args
        assert result.stderr == 'error: workload "nosuch" not found\n', args
        assert result.stdout == ""
    client = trio.client("n1")
    for call in (lambda: list(client.logs("nosuch")), lambda: client.workload_usage("nosuch")):
        with pytest.raises(ApiError) as caught:
            call()
        assert (caught.value.code, caught.value.reason) == (404, "NotFound")
    bad = pctl(trio, "top", "replicas", check=False)
    assert (bad.returncode, bad.stderr) == (
        1,
        "error: pctl top shows nodes or workloads, not replicas\n",
    )


def raw_get(node: LocalNode, target: str) -> tuple[int, Any]:
    parts = urlsplit(node.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", target, headers={"Authorization": f"Bearer {node.token}"})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    try:
        return response.status, orjson.loads(body.splitlines()[0]) if body else None
    except orjson.JSONDecodeError:
        return response.status, body


query_value = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.text(max_size=12),
    st.sampled_from(["", "-1", "1e3", "0x10", " 5", "5 ", "+5", "1000001", "9" * 5000]),
)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    route=st.sampled_from(["workloads/caller/logs", "workloads/caller/usage", "nodes/n3/usage"]),
    tail=query_value,
    local=st.sampled_from([None, "true", "false", "maybe", "2", ""]),
    follow=st.sampled_from([None, "false", "yes please", "tru"]),
)
def test_hypothesis_hostile_query_strings_get_a_status(
    http_workloads: Swarm, route: str, tail: str, local: str | None, follow: str | None
) -> None:
    """tail, local and follow as anyone may send them: 200, or 400 with a Status; never 500."""
    node = http_workloads.nodes["n1"]
    params = [("tail", tail), ("local", local), ("follow", follow)]
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in params if v is not None)
    status, answer = raw_get(node, f"{PREFIX}/{route}?{query}")
    if status != 200:
        assert status == 400, answer
        assert answer["kind"] == "Status" and answer["code"] == 400 and answer["message"]
    if route.endswith("/logs") and status == 200:
        valid_tail = tail.isascii() and tail.isdigit() and int(tail) <= 1_000_000
        assert valid_tail
    assert raw_get(node, "/healthz")[0] == 200


def test_a_hung_holder_adds_one_warning_and_the_rest_still_show(trio: Swarm) -> None:
    """Last in this module: it stops n3 for a while."""
    trio.client("n1").apply(
        [cpu_job("pair", 200_000, 100_000, replicas=2,
                 placement={"nodeSelector": {"role": "worker"}, "spread": "strict"})]
    )  # fmt: skip
    wait_for(
        lambda: phases(trio, "pair") == [("n2", "Stopped"), ("n3", "Stopped")],
        60,
        what="the pair of jobs completed on n2 and n3",
    )
    both = pctl(trio, "logs", "pair").stdout.splitlines()
    # Two replicas: each line starts with where it comes from.
    assert sum(line.startswith("[n2/pair-") for line in both) == 3
    assert sum(line.startswith("[n3/pair-") for line in both) == 3

    n3 = trio.nodes["n3"]
    assert n3.proc is not None
    n3.proc.send_signal(signal.SIGSTOP)  # alive to the mesh for a moment, but no answers
    try:
        shown = pctl(trio, "logs", "pair")
    finally:
        n3.proc.send_signal(signal.SIGCONT)
    lines = shown.stdout.splitlines()
    assert [line for line in lines if "primes below" in line] == [
        line for line in both if line.startswith("[n2/") and "primes below" in line
    ]
    warnings = shown.stderr.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning: node n3"), warnings
    # The node that answered keeps serving.
    assert ApiClient(trio.nodes["n1"].url, trio.nodes["n1"].token).health()["status"] == "ok"
