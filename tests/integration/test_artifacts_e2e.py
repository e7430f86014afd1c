"""Artifacts as users move them: ``pctl push`` to one node process, fetched by another.

Also the blobs API of one node, and ``pctl apply`` of a Workload that names a local file.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pollen.api.client import ApiClient
from pollen.api.errors import ApiError
from pollen.cli.config import load_config
from pollen.cli.localnode import tool
from tests.conftest import NodeProcess
from tests.helpers import wait_for
from tests.integration.test_mesh_nodes import Swarm, _all_see

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PCTL = tool("pctl")


@pytest.fixture(scope="module")
def hello_wasm() -> Path:
    """``build/examples/hello.wasm``, built as ``make examples`` builds it."""
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "build.py"), "--out", "build/examples", "hello"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return ROOT / "build" / "examples" / "hello.wasm"


@pytest.fixture
def swarm(tmp_path: Path, pollen_env: dict[str, str]) -> Iterator[Swarm]:
    swarm = Swarm(tmp_path, pollen_env)
    yield swarm
    for node in swarm.nodes.values():
        node.kill()


def pctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PCTL, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def digest_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def fetched(client: ApiClient, digest: str) -> bytes | None:
    """The blob as the node serves it, or None while no holder is known to it yet."""
    try:
        return client.get_blob(digest).body
    except ApiError as exc:
        if exc.code == 404:
            return None
        raise


def test_a_module_pushed_to_one_node_is_fetched_by_another(swarm: Swarm, hello_wasm: Path) -> None:
    n1 = swarm.first("n1")
    swarm.join("n2")
    swarm.join("n3")
    wait_for(
        _all_see(swarm, {"n1": "True", "n2": "True", "n3": "True"}),
        timeout=30,
        what="every node Ready everywhere",
    )
    config = Path(swarm.env["POLLEN_CONFIG"])
    wait_for(lambda: load_config(config).context("n1").server == n1.url, what="the n1 context")

    pushed = pctl(swarm.env, "--context", "n1", "push", str(hello_wasm))
    assert pushed.returncode == 0, pushed.stderr
    digest = digest_of(hello_wasm)
    assert pushed.stdout == digest + "\n"
    assert pushed.stderr == "artifact.pollen.dev/hello created\n"
    assert swarm.client("n1").blob_size(digest) == hello_wasm.stat().st_size

    # The Artifact reaches n3 in the document, the bytes reach it over the mesh.
    artifact = wait_for(
        lambda: any(a["metadata"]["name"] == "hello" for a in swarm.client("n3").list("artifacts")),
        timeout=15,
        what="the Artifact on n3",
    )
    assert artifact
    assert swarm.client("n3").get("artifacts", "hello")["spec"] == {
        "digest": digest,
        "size": hello_wasm.stat().st_size,
        "mediaType": "application/wasm",
    }
    assert swarm.client("n3").blob_size(digest) is None
    body = wait_for(lambda: fetched(swarm.client("n3"), digest), 15, "n3 to fetch the blob")
    assert body == hello_wasm.read_bytes()
    assert swarm.client("n3").blob_size(digest) == len(body)
    answer = swarm.client("n3").get_blob(digest)  # held now: served without a fetch
    assert "Pollen-Fetched-From" not in answer.headers
    # n2 may fetch from n1 or from n3, which holds it too now.
    body = wait_for(lambda: fetched(swarm.client("n2"), digest), 15, "n2 to fetch the blob")
    assert body == hello_wasm.read_bytes()
    assert [b["digest"] for b in swarm.client("n2").list_blobs()] == [digest]

    # A second push of the same bytes uploads nothing and changes nothing.
    again = pctl(swarm.env, "--context", "n1", "push", str(hello_wasm), "--name", "hello")
    assert again.returncode == 0 and again.stderr == "artifact.pollen.dev/hello unchanged\n"


def test_the_blobs_api(node: NodeProcess) -> None:
    client = node.client()
    data = b"\0asm\x01\0\0\0"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert client.list_blobs() == []
    assert client.put_blob(digest, data) == {
        "apiVersion": "pollen.dev/v1alpha1",
        "kind": "Blob",
        "digest": digest,
        "size": len(data),
    }
    assert client.blob_size(digest) == len(data)
    answer = client.get_blob(digest)
    assert answer.body == data
    assert answer.headers["ETag"] == f'"{digest}"'
    assert client.list_blobs() == [{"digest": digest, "size": len(data)}]

    wrong = "sha256:" + "0" * 64
    with pytest.raises(ApiError, match="does not match the digest") as info:
        client.put_blob(wrong, data)
    assert info.value.code == 400
    assert client.blob_size(wrong) is None
    with pytest.raises(ApiError, match="no alive node advertises it") as info:
        client.get_blob(wrong)
    assert info.value.code == 404
    for hostile in ("sha256:" + "A" * 64, "sha256:..", "md5:abc"):
        with pytest.raises(ApiError, match="not an artifact digest") as info:
            client.put_blob(hostile, data)
        assert info.value.code == 400
    # The node keeps serving, and nothing half-written is left.
    assert client.list_blobs() == [{"digest": digest, "size": len(data)}]
    assert not list((node.data_dir / "artifacts" / "sha256").glob(".incoming-*"))


def test_an_oversized_upload_is_refused_before_it_is_read(node: NodeProcess) -> None:
    import http.client

    conn = http.client.HTTPConnection(node.url.removeprefix("http://"), timeout=30)
    conn.putrequest("PUT", "/apis/pollen.dev/v1alpha1/blobs/sha256:" + "1" * 64)
    conn.putheader("Authorization", f"Bearer {node.token}")
    conn.putheader("Content-Length", str(257 << 20))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413
    conn.close()
    assert node.client().list_blobs() == []


def test_push_refuses_what_is_not_a_module(node: NodeProcess, tmp_path: Path) -> None:
    empty = tmp_path / "empty.wasm"
    empty.write_bytes(b"")
    text = tmp_path / "notes.wasm"
    text.write_text("hello\n")
    cases = [
        (empty, "the file is empty; push takes a WebAssembly module"),
        (text, "not a WebAssembly module (it does not start with the bytes \\0asm)"),
        (tmp_path / "missing.wasm", "no such file or directory"),
        (tmp_path, "is a directory, not a WebAssembly module"),
    ]
    for path, message in cases:
        result = node.pctl("push", str(path))
        assert result.returncode == 1
        assert result.stderr.decode() == f"error: {path}: {message}\n"
        assert result.stdout == b""
    module = tmp_path / "m.wasm"
    module.write_bytes(b"\0asm\x01\0\0\0")
    result = node.pctl("push", str(module), "--name", "Not_A_Name")
    assert result.returncode == 1
    assert "Artifact name 'Not_A_Name': must be a lowercase DNS name" in result.stderr.decode()
    assert node.client().list_blobs() == []


def test_apply_pushes_a_workload_s_local_file_first(
    node: NodeProcess, tmp_path: Path, hello_wasm: Path
) -> None:
    folder = tmp_path / "app"
    (folder / "wasm").mkdir(parents=True)
    (folder / "wasm" / "Hello_Web.wasm").write_bytes(hello_wasm.read_bytes())
    manifest = folder / "web.yaml"
    manifest.write_text(
        "apiVersion: pollen.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: web\n"
        "spec:\n  artifact: ./wasm/Hello_Web.wasm\n"
    )
    digest = digest_of(hello_wasm)

    dry = node.pctl("apply", "-f", str(manifest), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.decode().splitlines() == [
        "workload.pollen.dev/web created (dry run)",
        "artifact.pollen.dev/hello-web created (dry run)",
    ]
    assert node.client().blob_size(digest) is None  # a dry run pushes nothing
    diff = node.pctl("diff", "-f", str(manifest))
    assert diff.returncode == 1 and f"artifact: {digest}" in diff.stdout.decode()

    applied = node.pctl("apply", "-f", str(manifest))
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.decode().splitlines() == [
        "workload.pollen.dev/web created",
        "artifact.pollen.dev/hello-web created",
    ]
    assert node.client().get("workloads", "web")["spec"]["artifact"] == digest
    assert node.client().get("artifacts", "hello-web")["spec"]["digest"] == digest
    assert node.client().blob_size(digest) == hello_wasm.stat().st_size
    unchanged = node.pctl("diff", "-f", str(manifest))
    assert unchanged.returncode == 0, unchanged.stdout

    missing = folder / "missing.yaml"
    missing.write_text(manifest.read_text().replace("Hello_Web", "Gone").replace("web\n", "w2\n"))
    failed = node.pctl("apply", "-f", str(missing))
    assert failed.returncode == 1
    # The line is where the document starts, as for the node's own errors.
    assert failed.stderr.decode() == (
        f"error: {missing}: document 1, line 1: spec.artifact: "
        f"{folder / 'wasm' / 'Gone.wasm'}: no such file or directory\n"
    )
    assert node.client().list("workloads") == [node.client().get("workloads", "web")]


def test_the_node_refuses_a_local_path_it_cannot_read(node: NodeProcess) -> None:
    workload = {
        "apiVersion": "pollen.dev/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": "web"},
        "spec": {"artifact": "./hello.wasm"},
    }
    with pytest.raises(ApiError, match="is a local path; pctl apply pushes the file") as info:
        node.client().apply([workload])
    assert info.value.code == 422
    assert info.value.details["field"] == "spec.artifact"
