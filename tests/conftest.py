"""Shared fixtures: real node processes on 127.0.0.1 and a private pctl configuration."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pollen.api.client import ApiClient
from pollen.api.errors import ApiError
from pollen.cli.localnode import LocalNode, init_node, tool
from tests.helpers import wait_for

POLLEN = tool("pollen")
PCTL = tool("pctl")


@dataclass
class NodeProcess(LocalNode):
    """A real ``pollen node`` process, plus the pctl environment that points at it."""

    name: str = "node-1"

    def client(self) -> ApiClient:
        return ApiClient(self.url, self.token)

    def healthy(self) -> bool:
        try:
            return self.client().health().get("status") == "ok"
        except ApiError:
            return False

    def pctl(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run pctl against this node's context (the one ``pollen init`` made current)."""
        return subprocess.run(
            [PCTL, "--context", self.name, *args],
            env=self.env,
            input=stdin,
            capture_output=True,
            timeout=60,
            check=False,
        )


@pytest.fixture
def pollen_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose pctl configuration lives in the test's own directory."""
    env = dict(os.environ)
    env["POLLEN_CONFIG"] = str(tmp_path / "pctl-config.yaml")
    return env


@pytest.fixture
def node_factory(
    tmp_path: Path, pollen_env: dict[str, str]
) -> Iterator[Callable[..., NodeProcess]]:
    """Make initialised, started nodes; every one is killed at the end of the test."""
    nodes: list[NodeProcess] = []

    def make(name: str = "node-1", *extra_args: str, start: bool = True) -> NodeProcess:
        data_dir = tmp_path / name
        init_node(data_dir, name, env=pollen_env)
        node = NodeProcess(
            data_dir=data_dir,
            log_path=tmp_path / f"{name}.log",
            env=pollen_env,
            # Any free mesh port: the default 7946 would collide with other runs on the machine.
            extra_args=list(extra_args)
            if "--listen" in extra_args
            else ["--listen", "127.0.0.1:0", *extra_args],
            name=name,
        )
        nodes.append(node)
        if start:
            node.start()
            wait_for(node.healthy, what=f"node {name} to answer /healthz")
        return node

    yield make
    for node in nodes:
        node.kill()


@pytest.fixture
def node(node_factory: Callable[..., NodeProcess]) -> NodeProcess:
    """One running node; its pctl context is current in ``pollen_env``."""
    return node_factory()
