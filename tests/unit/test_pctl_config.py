"""pctl contexts: reading, writing, and the errors users see for a bad config file."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from pollen.cli.config import (
    ClientConfig,
    ConfigError,
    Context,
    config_path,
    load_config,
    save_context,
)

ONE = Context(name="node-1", server="http://127.0.0.1:7070", token="secret-1")
TWO = Context(name="node-2", server="http://127.0.0.1:7071", token="secret-2")


def test_missing_file_is_an_empty_config(tmp_path: Path) -> None:
    config = load_config(tmp_path / "absent.yaml")
    assert config == ClientConfig(current_context=None, contexts=())


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    save_context(ONE, make_current=True, path=path)
    save_context(TWO, make_current=False, path=path)

    config = load_config(path)
    assert config.current_context == "node-1"
    assert config.contexts == (ONE, TWO)
    assert config.context(None) == ONE
    assert config.context("node-2") == TWO


def test_file_has_the_documented_shape(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    save_context(ONE, make_current=True, path=path)
    assert yaml.safe_load(path.read_text()) == {
        "apiVersion": "pollen.dev/v1alpha1",
        "kind": "Config",
        "current-context": "node-1",
        "contexts": [{"name": "node-1", "server": "http://127.0.0.1:7070", "token": "secret-1"}],
    }


def test_save_replaces_a_context_of_the_same_name_in_place(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    save_context(ONE, make_current=True, path=path)
    save_context(TWO, make_current=True, path=path)
    moved = Context(name="node-1", server="http://127.0.0.1:9999", token="new")
    save_context(moved, make_current=False, path=path)

    config = load_config(path)
    assert config.contexts == (moved, TWO)
    assert config.current_context == "node-2"


def test_make_current(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    save_context(ONE, make_current=True, path=path)
    save_context(TWO, make_current=True, path=path)
    assert load_config(path).current_context == "node-2"


def test_saved_file_is_private_and_directories_are_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "config.yaml"
    save_context(ONE, make_current=True, path=path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # No temporary files are left next to it.
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]


def test_mode_is_0600_even_when_the_file_was_readable(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("")
    path.chmod(0o644)
    save_context(ONE, make_current=True, path=path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_pollen_config_is_respected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "elsewhere.yaml"
    monkeypatch.setenv("POLLEN_CONFIG", str(path))
    assert config_path() == path
    save_context(ONE, make_current=True)
    assert path.exists()
    assert load_config().context(None) == ONE


def test_default_path_is_under_the_home_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("POLLEN_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert config_path() == tmp_path / ".config" / "pollen" / "config.yaml"


def test_no_current_context_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    with pytest.raises(
        ConfigError, match=r"no current context in .*config.yaml; run `pollen init`"
    ):
        load_config(path).context(None)


def test_unknown_context_names_the_known_ones(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    save_context(ONE, make_current=True, path=path)
    with pytest.raises(ConfigError, match=r'context "nope" not found .*known contexts: node-1'):
        load_config(path).context("nope")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("contexts: [unclosed", "is not valid YAML at line"),
        ("contexts:\n  - a: b\n - c\n", "is not valid YAML at line 3"),
        ("- a\n- b\n", "the top level must be a mapping"),
        ("kind: Pod\n", 'kind must be "Config"'),
        ("contexts: {}\n", "contexts must be a list"),
        ("contexts:\n- just-a-string\n", "contexts[0] must be a mapping"),
        ("contexts:\n- name: a\n  server: http://x\n", "contexts[0].token must be a non-empty"),
        ("contexts:\n- name: a\n  server: 7\n  token: t\n", "contexts[0].server must be"),
        ("contexts:\n- name: a\n  server: ftp://x\n  token: t\n", "http:// or https:// URL"),
        ("current-context: [a]\n", "current-context must be a string"),
        (
            "contexts:\n- {name: a, server: 'http://x', token: t}\n"
            "- {name: a, server: 'http://y', token: t}\n",
            'context "a" appears twice',
        ),
    ],
)
def test_malformed_file_is_one_sentence_naming_the_file(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert problem in message
    assert "\n" not in message


def test_binary_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="is not UTF-8"):
        load_config(path)


def test_save_refuses_to_overwrite_a_malformed_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("contexts: [unclosed")
    with pytest.raises(ConfigError):
        save_context(ONE, make_current=True, path=path)
    assert path.read_text() == "contexts: [unclosed"


def test_empty_file_is_an_empty_config(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("")
    assert load_config(path).contexts == ()


def test_concurrent_writers_lose_no_context(tmp_path: Path) -> None:
    import multiprocessing

    path = tmp_path / "config.yaml"
    contexts = [Context(f"node-{i}", f"http://127.0.0.1:{7000 + i}", f"t{i}") for i in range(8)]
    spawn = multiprocessing.get_context("spawn")
    workers = [
        spawn.Process(target=save_context, args=(c,), kwargs={"make_current": True, "path": path})
        for c in contexts
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert sorted(load_config(path).contexts, key=lambda c: c.name) == contexts
