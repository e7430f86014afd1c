"""``pollen``: create a cluster, run a node, run the demo."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

import click

from pollen.mesh.identity import IdentityError, default_node_name, init_data_dir

DEFAULT_API = "127.0.0.1:7070"


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
@click.option("--name", default=None, help="Node name [default: the one chosen at init]")
@click.option("--label", "labels", multiple=True, help="Node label k=v (repeatable)")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages")
def node(
    data_dir: Path, api: str, name: str | None, labels: tuple[str, ...], verbose: bool
) -> None:
    """Run a node until SIGTERM or Ctrl-C."""
    from pollen.node import NodeConfig, PollenNode

    host, port = parse_host_port(api, "--api")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config = NodeConfig(
        data_dir=data_dir, api_host=host, api_port=port, name=name, labels=parse_labels(labels)
    )
    try:
        pollen_node = PollenNode(config)
    except IdentityError as exc:
        _fail(str(exc))
        return
    try:
        asyncio.run(_run_node(pollen_node))
    except OSError as exc:
        _fail(f"cannot serve the API on {api}: {exc.strerror or exc}")


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
def demo() -> None:
    """Start a node, apply manifests/examples/, and show what pctl sees."""
    from pollen.cli.demo import run_demo

    sys.exit(run_demo())


if __name__ == "__main__":
    main()
