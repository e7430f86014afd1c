"""``pollen``: create a cluster, run a node, run the demo."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import sys
import threading
from pathlib import Path

import click

from pollen.cli.keys import key
from pollen.mesh.identity import IdentityError, default_node_name, init_data_dir

DEFAULT_API = "127.0.0.1:7070"
DEFAULT_LISTEN = "127.0.0.1:7946"
DEFAULT_GATEWAY = "127.0.0.1:0"
PLUGIN_HELP = (
    "Enable a reconciler plugin: an entry-point name in the group pollen.reconcilers, "
    "or module:attribute (repeatable)"
)


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def parse_host_port(value: str, option: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) into its parts, with a clear error."""
    host, sep, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise click.BadParameter(f"{value!r} is not HOST:PORT", param_hint=option)
    return host, int(port_text)


def parse_labels(values: tuple[str, ...]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not k=v", param_hint="--label")
        labels[key] = value
    return labels


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pollen")
def main() -> None:
    """Pollen: a leaderless orchestrator for WebAssembly."""


@main.command()
@click.option("--data-dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--cluster-name", default="pollen", show_default=True)
@click.option("--name", "node_name", default=None, help="This node's name [default: host name]")
@click.option(
    "--api", "api", default=DEFAULT_API, show_default=True, help="API address the context points at"
)
def init(data_dir: Path, cluster_name: str, node_name: str | None, api: str) -> None:
    """Create a new cluster: root key, this node's identity, a pctl context."""
    from pollen.cli.config import ConfigError, Context, save_context

    host, port = parse_host_port(api, "--api")
    try:
        identity = init_data_dir(
            data_dir, cluster_name=cluster_name, node_name=node_name or default_node_name()
        )
    except IdentityError as exc:
        _fail(str(exc))
        return
    try:
        save_context(
            Context(
                name=identity.node_name, server=f"http://{host}:{port}", token=identity.api_token
            ),
            make_current=True,
        )
    except (ConfigError, OSError) as exc:
        _fail(f"initialised {data_dir}, but could not write the pctl context: {exc}")
    click.echo(
        f'Initialised cluster "{cluster_name}" with node "{identity.node_name}" in {data_dir}.\n'
        f'pctl context "{identity.node_name}" is now current. Start the node with:\n'
        f"  pollen node --data-dir {data_dir}"
    )


@main.command()
@click.option("--data-dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--api",
    "api",
    default=DEFAULT_API,
    show_default=True,
    help="HTTP API address (port 0: any free port)",
)
@click.option(
    "--listen",
    default=DEFAULT_LISTEN,
    show_default=True,
    help="QUIC mesh address (UDP; port 0: any free port)",
)
@click.option(
    "--gateway",
    default=DEFAULT_GATEWAY,
    show_default=True,
    help="HTTP gateway address for workloads: /WORKLOAD/PATH (port 0: any free port)",
)
@click.option("--join", "join_token", default=None, help="Join token from 'pollen token create'")
@click.option("--name", default=None, help="Node name [default: the one chosen at init]")
@click.option("--label", "labels", multiple=True, help="Node label k=v (repeatable)")
@click.option("--plugin", "plugins", multiple=True, help=PLUGIN_HELP)
@click.option(
    "--memory-reserve",
    "memory_reserve_mb",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    help="MB of memory the machine must keep available; below it the node evicts replicas",
)
@click.option(
    "--artifact-quota",
    "artifact_quota",
    default="1GiB",
    show_default=True,
    help="Bytes of artifacts the node keeps (e.g. 512MiB, 2G; 'none': no limit); the least "
    "recently used that no local replica needs are deleted to stay within it",
)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages")
def node(
    data_dir: Path,
    api: str,
    listen: str,
    gateway: str,
    join_token: str | None,
    name: str | None,
    labels: tuple[str, ...],
    plugins: tuple[str, ...],
    memory_reserve_mb: int,
    artifact_quota: str,
    verbose: bool,
) -> None:
    """Run a node until SIGTERM or Ctrl-C.

    With --join on an empty data directory, the node first enrols with the token: it gets a
    certificate from a node of the cluster, then joins the mesh. A plugin that cannot be
    loaded is left out: the node starts without it and says why (docs/plugins.md).
    """
    from pollen.mesh.identity import NODE_FILE
    from pollen.node import NodeConfig, PollenNode

    host, port = parse_host_port(api, "--api")
    listen_host, listen_port = parse_host_port(listen, "--listen")
    gateway_host, gateway_port = parse_host_port(gateway, "--gateway")
    quota = parse_quota(artifact_quota)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    seeds: tuple[tuple[str, int], ...] = ()
    if join_token is not None:
        seeds = _token_addresses(join_token)
        if not (data_dir / NODE_FILE).exists():
            _enrol(data_dir, join_token, name or default_node_name())
    config = NodeConfig(
        data_dir=data_dir,
        api_host=host,
        api_port=port,
        gateway_host=gateway_host,
        gateway_port=gateway_port,
        listen_host=listen_host,
        listen_port=listen_port,
        name=name,
        labels=parse_labels(labels),
        seeds=seeds,
        plugins=plugins,
        memory_reserve_mb=memory_reserve_mb,
        artifact_quota=quota,
    )
    try:
        pollen_node = PollenNode(config)
    except IdentityError as exc:
        _fail(str(exc))
        return
    try:
        asyncio.run(_run_node(pollen_node))
    except OSError as exc:
        _fail(
            f"cannot serve on {api} (API), {gateway} (gateway) or {listen} (mesh): "
            f"{exc.strerror or exc}"
        )


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1 << 10,
    "kib": 1 << 10,
    "mi": 1 << 20,
    "mib": 1 << 20,
    "gi": 1 << 30,
    "gib": 1 << 30,
    "ti": 1 << 40,
    "tib": 1 << 40,
}


def parse_quota(text: str) -> int | None:
    """``--artifact-quota``: bytes with an optional decimal (``500MB``, ``2G``) or binary
    (``512MiB``, ``1Gi``) unit, or ``none``; exits with one sentence otherwise."""
    cleaned = text.strip().lower()
    if cleaned == "none":
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", cleaned)
    if match is None or match.group(2) not in _SIZE_UNITS:
        _fail(f"--artifact-quota {text!r} is not a size: use bytes with a unit, like 512MiB or 2G")
        raise AssertionError("unreachable")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if size <= 0:
        _fail("--artifact-quota must be more than 0 bytes (or 'none' for no limit)")
    return size


def _token_addresses(token: str) -> tuple[tuple[str, int], ...]:
    from datetime import UTC, datetime

    from pollen.mesh.tokens import TokenError, verify_token

    try:
        return verify_token(token, datetime.now(UTC)).addresses
    except TokenError as exc:
        _fail(f"the join token is not usable: {exc}")
        raise AssertionError("unreachable") from exc


def _enrol(data_dir: Path, token: str, node_name: str) -> None:
    """Spend ``token`` for a certificate and write a new data directory with it."""
    from pollen.mesh.tokens import EnrolmentError
    from pollen.mesh.transport import TransportError, join_data_dir

    try:
        asyncio.run(join_data_dir(data_dir, token, node_name))
    except (EnrolmentError, TransportError) as exc:
        _fail(f"could not join the cluster: {exc}")
    except IdentityError as exc:
        _fail(str(exc))


@main.group()
def token() -> None:
    """Join tokens."""


@token.command("create")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--ttl", default="1h", show_default=True, help="How long the token is valid")
@click.option(
    "--address",
    "addresses",
    multiple=True,
    help="Address to dial, HOST:PORT [default: where this node's mesh listens]",
)
def token_create(data_dir: Path, ttl: str, addresses: tuple[str, ...]) -> None:
    """Print a single-use join token for a new node (this node must hold the root key)."""
    from datetime import UTC, datetime, timedelta

    import orjson

    from pollen.mesh.identity import load_credentials
    from pollen.mesh.tokens import create_token
    from pollen.node import ENDPOINTS_FILE

    seconds = _parse_ttl(ttl)
    try:
        credentials = load_credentials(data_dir)
    except IdentityError as exc:
        _fail(str(exc))
        return
    if credentials.root_key is None:
        _fail(f"{data_dir} holds no root key: only the node that created the cluster admits")
        return
    dial = [parse_host_port(a, "--address") for a in addresses]
    if not dial:
        try:
            endpoints = orjson.loads((data_dir / ENDPOINTS_FILE).read_bytes())
            dial = [parse_host_port(str(endpoints["listen"]), "--address")]
        except (OSError, orjson.JSONDecodeError, KeyError, click.BadParameter):
            _fail(f"the node in {data_dir} is not running; start it or give --address")
            return
    click.echo(
        create_token(
            credentials.root_key,
            cluster=credentials.cluster_name,
            addresses=dial,
            ttl=timedelta(seconds=seconds),
            now=datetime.now(UTC),
        )
    )


main.add_command(key)


def _parse_ttl(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    value, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(value) * units[unit]
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a duration like 30m or 1h", param_hint="--ttl"
        ) from None
    if not 0 < seconds <= 30 * 86400:
        raise click.BadParameter("must be between 1s and 30d", param_hint="--ttl")
    return seconds


async def _run_node(pollen_node: object) -> None:
    from pollen.node import PollenNode

    assert isinstance(pollen_node, PollenNode)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await pollen_node.start()
    _point_context_at(pollen_node)
    pollen_node.announce()
    try:
        await stop.wait()
    finally:
        await pollen_node.stop()


def _point_context_at(pollen_node: object) -> None:
    """Keep this node's pctl context pointing at where the API really listens.

    Only a context that already holds this node's token is touched: the daemon never adds
    contexts on its own, it keeps the one ``pollen init`` wrote accurate.
    """
    from pollen.cli.config import ConfigError, Context, load_config, save_context
    from pollen.node import PollenNode

    assert isinstance(pollen_node, PollenNode)
    try:
        config = load_config()
    except (ConfigError, OSError):
        return
    for context in config.contexts:
        if context.name == pollen_node.name and context.token == pollen_node.identity.api_token:
            if context.server != pollen_node.api_url:
                save_context(
                    Context(context.name, pollen_node.api_url, context.token), make_current=False
                )
            return


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option(
    "--executor",
    type=click.Choice(["http", "command"]),
    default="http",
    show_default=True,
    help="Serve HTTP requests (WAGI) or run once as a command",
)
@click.option("--port", default=8080, show_default=True, help="HTTP port on 127.0.0.1 (0: any)")
@click.option("-e", "--env", "env_items", multiple=True, help="Environment variable K=V")
@click.option("--memory-mb", type=int, default=None, help="Memory limit [default: 64]")
@click.option(
    "--timeout-ms", type=int, default=None, help="Per-invocation timeout [default: 30000]"
)
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=None,
    help="HTTP worker processes on the one port [default: the number of CPU cores]",
)
def run(
    file: Path,
    args: tuple[str, ...],
    executor: str,
    port: int,
    env_items: tuple[str, ...],
    memory_mb: int | None,
    timeout_ms: int | None,
    workers: int | None,
) -> None:
    """Run one module in the sandbox, with no cluster: serve it over HTTP, or run it once.

    Arguments after FILE (put them after `--`) are the module's argv. The exit status of a
    command is the module's own.

    With --executor http, requests are served by --workers processes (one per core by
    default): a request's Python runs under its process's GIL, so one process uses about
    one core; each worker has its own engine and HTTP server on the same port. --workers 1
    serves from this process.
    """
    from pydantic import ValidationError

    from pollen.runtime.pool import default_workers
    from pollen.runtime.standalone import default_cache_dir, run_command, run_http

    env: dict[str, str] = {}
    for item in env_items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not K=V", param_hint="--env")
        env[key] = value
    cache_dir = default_cache_dir()
    try:
        if executor == "command":
            sys.exit(
                run_command(
                    file,
                    args=args,
                    env=env,
                    memory_mb=memory_mb,
                    timeout_ms=timeout_ms,
                    cache_dir=cache_dir,
                )
            )
        sys.exit(
            run_http(
                file,
                port=port,
                args=args,
                env=env,
                memory_mb=memory_mb,
                timeout_ms=timeout_ms,
                cache_dir=cache_dir,
                workers=workers or default_workers(),
            )
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        _fail(f"{where}: {first['msg']}")


@main.command()
@click.option("--nodes", "count", type=click.IntRange(1, 64), default=3, show_default=True)
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--detach", is_flag=True, help="Return once every node is Ready")
@click.option("--plugin", "plugins", multiple=True, help=PLUGIN_HELP + " on every node")
def up(count: int, directory: Path, detach: bool, plugins: tuple[str, ...]) -> None:
    """Start a local swarm of COUNT nodes on 127.0.0.1, with a pctl context each."""
    from pollen.cli.swarm import SwarmError, down
    from pollen.cli.swarm import up as start_swarm

    try:
        nodes = start_swarm(count, directory, plugins=plugins)
    except SwarmError as exc:
        _fail(str(exc))
        return
    for swarm_node in nodes:
        click.echo(
            f"{swarm_node.name}  api {swarm_node.api}  gateway {swarm_node.gateway}  "
            f"mesh {swarm_node.listen}"
        )
    click.echo(f'{len(nodes)} nodes Ready; pctl context "{nodes[0].context}" is current.')
    if detach:
        click.echo(f"Stop them with: pollen down --dir {directory}")
        return
    click.echo("Press Ctrl-C to stop the swarm.")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    down(directory)


@main.command("down")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False, path_type=Path))
def down_command(directory: Path) -> None:
    """Stop a swarm started with 'pollen up --detach' and remove its contexts."""
    from pollen.cli.swarm import SwarmError, down

    try:
        names = down(directory)
    except SwarmError as exc:
        _fail(str(exc))
        return
    click.echo(f"stopped {', '.join(names)}")


@main.command()
def demo() -> None:
    """Start a node, apply manifests/examples/, and show what pctl sees."""
    from pollen.cli.demo import run_demo

    sys.exit(run_demo())


if __name__ == "__main__":
    main()
