"""pctl contexts: where a node's API is and the token to call it with, kubeconfig style.

The file is ``$POLLEN_CONFIG`` when that is set, else ``~/.config/pollen/config.yaml``::

    apiVersion: pollen.dev/v1alpha1
    kind: Config
    current-context: node-1
    contexts:
    - name: node-1
      server: http://127.0.0.1:7070
      token: <bearer token>

``pollen init`` and ``pollen up`` write contexts with :func:`save_context`; ``pctl`` reads them
with :func:`load_config`. The file holds bearer tokens, so it is written with mode 0600.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pollen import API_VERSION

CONFIG_ENV = "POLLEN_CONFIG"


class ConfigError(Exception):
    """The config file is unusable, or names no context that can be used."""


@dataclass(frozen=True)
class Context:
    """One node API that pctl can talk to."""

    name: str
    server: str
    token: str


@dataclass(frozen=True)
class ClientConfig:
    """The contexts in a config file, and which one is current."""

    current_context: str | None
    contexts: tuple[Context, ...]
    # Where this came from, so that errors can name the file; not part of equality.
    path: Path | None = field(default=None, compare=False, repr=False)

    def context(self, name: str | None = None) -> Context:
        """The context called ``name``, or the current context when ``name`` is None.

        Raises ``ConfigError`` when there is no current context or no context of that name.
        """
        where = f" in {self.path}" if self.path is not None else ""
        if name is None:
            name = self.current_context
            if name is None:
                raise ConfigError(
                    f"no current context{where}; run `pollen init` to create one, "
                    "or pass --context NAME"
                )
        for context in self.contexts:
            if context.name == name:
                return context
        known = ", ".join(c.name for c in self.contexts) or "none"
        raise ConfigError(f'context "{name}" not found{where}; known contexts: {known}')


def config_path() -> Path:
    """The config file pctl uses: ``$POLLEN_CONFIG``, else ``~/.config/pollen/config.yaml``."""
    override = os.environ.get(CONFIG_ENV)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".config" / "pollen" / "config.yaml"


def load_config(path: Path | None = None) -> ClientConfig:
    """Read the config file; a missing file is an empty config, a malformed one a ConfigError."""
    path = config_path() if path is None else path
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ClientConfig(current_context=None, contexts=(), path=path)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    return _parse(text, path)


def _parse(text: str, path: Path) -> ClientConfig:
    # Imported here: every pctl command reads the config, but yaml is only worth its import
    # time once there is a file to read.
    import yaml

    try:
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{at}") from exc

    def invalid(problem: str) -> ConfigError:
        return ConfigError(f"config file {path} is invalid: {problem}")

    if data is None:
        return ClientConfig(current_context=None, contexts=(), path=path)
    if not isinstance(data, dict):
        raise invalid("the top level must be a mapping")
    kind = data.get("kind", "Config")
    if kind != "Config":
        raise invalid(f'kind must be "Config", not {kind!r}')
    current = data.get("current-context")
    if current is not None and not isinstance(current, str):
        raise invalid("current-context must be a string")
    raw_contexts = data.get("contexts")
    if raw_contexts is None:
        raw_contexts = []
    if not isinstance(raw_contexts, list):
        raise invalid("contexts must be a list")
    contexts: list[Context] = []
    seen: set[str] = set()
    for index, entry in enumerate(raw_contexts):
        if not isinstance(entry, dict):
            raise invalid(f"contexts[{index}] must be a mapping with name, server and token")
        values: dict[str, str] = {}
        for key in ("name", "server", "token"):
            value = entry.get(key)
            if not isinstance(value, str) or not value:
                raise invalid(f"contexts[{index}].{key} must be a non-empty string")
            values[key] = value
        if not values["server"].startswith(("http://", "https://")):
            raise invalid(f"contexts[{index}].server must be an http:// or https:// URL")
        if values["name"] in seen:
            raise invalid(f'context "{values["name"]}" appears twice')
        seen.add(values["name"])
        contexts.append(Context(**values))
    return ClientConfig(current_context=current or None, contexts=tuple(contexts), path=path)


def _document(config: ClientConfig) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "Config",
        "current-context": config.current_context,
        "contexts": [
            {"name": c.name, "server": c.server, "token": c.token} for c in config.contexts
        ],
    }


def save_context(context: Context, *, make_current: bool, path: Path | None = None) -> None:
    """Add ``context`` to the config file, replacing one of the same name.

    Creates the directory if needed and replaces the file atomically (a reader never sees half
    a file), with mode 0600 because it holds tokens. A malformed existing file is left alone
    and reported as ``ConfigError`` rather than overwritten. Concurrent writers (several
    ``pollen init`` at once) are serialised with a lock so that no context is lost.
    """

    def change(config: ClientConfig) -> ClientConfig:
        contexts = [c for c in config.contexts if c.name != context.name]
        # Replace in place so that a re-initialised node keeps its position in the list.
        position = next(
            (i for i, c in enumerate(config.contexts) if c.name == context.name), len(contexts)
        )
        contexts.insert(position, context)
        current = context.name if make_current else config.current_context
        return ClientConfig(current_context=current, contexts=tuple(contexts))

    _update(change, path)


def remove_context(name: str, path: Path | None = None) -> None:
    """Remove the context ``name`` (as ``kind delete cluster`` removes its kubeconfig entry).

    If it was the current context, the first remaining one becomes current.
    """

    def change(config: ClientConfig) -> ClientConfig:
        contexts = tuple(c for c in config.contexts if c.name != name)
        current = config.current_context
        if current == name:
            current = contexts[0].name if contexts else None
        return ClientConfig(current_context=current, contexts=contexts)

    _update(change, path)


def _update(change: Callable[[ClientConfig], ClientConfig], path: Path | None) -> None:
    """Read, change and write the config file under a lock."""
    import fcntl

    import yaml

    path = config_path() if path is None else path
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # The lock is taken on the directory itself, so that no lock file is left lying around.
    lock_fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        updated = change(load_config(path))
        text = yaml.dump(
            _document(updated),
            Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper),
            sort_keys=False,
            default_flow_style=False,
        )
        _write_atomically(path, text)
    finally:
        os.close(lock_fd)  # closing the descriptor releases the lock


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        # O_CREAT's mode is filtered by the umask; make sure tokens are never group-readable.
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
