"""``pollen key``: publisher keys that sign artifacts (``pctl push --sign-key``).

A key is an Ed25519 private key in a PKCS#8 PEM file, readable by its owner only. What names
it everywhere else (an Artifact's ``spec.signer``, a TrustPolicy's ``trustedSigners``) is its
public key, ``ed25519:<base64>``, which both commands print.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import click


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def write_new_secret(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file ``path``, mode 0600, whole or not at all; refuse to
    replace an existing file (``FileExistsError``): a key overwritten is a key lost."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        # A hard link fails if the name exists, where a rename would replace it.
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@click.group()
def key() -> None:
    """Publisher keys that sign artifacts."""


@key.command("create")
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="File to write the private key to (PEM, mode 0600); must not exist",
)
def key_create(out: Path) -> None:
    """Make a publisher key; print its public id for TrustPolicy trustedSigners."""
    from pollen.resources.signing import generate_key, private_key_pem, signer_id

    private_key = generate_key()
    try:
        write_new_secret(out, private_key_pem(private_key))
    except FileExistsError:
        _fail(f"{out}: already exists; choose another file or remove it first")
        return
    except OSError as exc:
        _fail(f"{out}: {(exc.strerror or str(exc)).lower()}")
        return
    click.echo(signer_id(private_key))


@key.command("show")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def key_show(file: Path) -> None:
    """Print the public id of a publisher key file."""
    from pollen.resources.signing import SignatureError, load_private_key, signer_id

    try:
        private_key = load_private_key(file.read_bytes())
    except OSError as exc:
        _fail(f"{file}: {(exc.strerror or str(exc)).lower()}")
        return
    except SignatureError as exc:
        _fail(f"{file}: {exc}")
        return
    click.echo(signer_id(private_key))
