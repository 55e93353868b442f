"""Identities: one Ed25519 key pair per component, and who trusts whom.

A node keeps its key in its home (``identity.key``); a researcher's key lives at
``~/.fedcore/researcher.key``, or where ``FEDCORE_IDENTITY`` or an ``identity=`` argument
says. Keys are created on first use, written with 0600 permissions, and refused when other
users can read them.

Enrollment, researcher side: ``fedcore identity`` prints this researcher's public key (give it
to each node's administrator, who runs ``fedcore-node trust add NAME KEY``); ``fedcore enroll
NODE_ID KEY`` records a node's key (printed by ``fedcore-node identity``) in
``~/.fedcore/nodes.toml``. In Python: :func:`public_key` and :func:`enroll`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path

import tomli_w
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from fedcore._files import write_atomic
from fedcore.errors import ConfigurationError

__all__ = ["Identity", "enroll", "enrolled_nodes", "fingerprint", "parse_public_key",
           "public_key", "researcher_identity", "researcher_key_file"]

_DEFAULT_DIR = Path("~/.fedcore")


class Identity:
    """An Ed25519 key pair stored in a PEM file (created 0600 on first use)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self._key = _load_or_create(self.path)
        #: The raw 32-byte public key.
        self.public_bytes = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def public_key(self) -> str:
        """The public key as base64 text: what the other side enrolls or trusts."""
        return base64.b64encode(self.public_bytes).decode()

    @property
    def fingerprint(self) -> str:
        """A short digest of the public key, for comparing by eye or over the phone."""
        return fingerprint(self.public_bytes)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message``."""
        return self._key.sign(message)

    def __repr__(self) -> str:
        return f"Identity({str(self.path)!r}, fingerprint={self.fingerprint!r})"


def _load_or_create(path: Path) -> Ed25519PrivateKey:
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return key
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigurationError(
            f"The key file {path} can be read by other users (mode {mode:o}). Expected mode "
            f"600. Fix it with: chmod 600 {path}")
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"{path} is not a PEM private key: {exc}") from exc
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ConfigurationError(f"{path} holds a {type(loaded).__name__}; expected Ed25519.")
    return loaded


def fingerprint(public: bytes) -> str:
    """``SHA256:`` and the first 32 hex digits (128 bits) of the key's digest, by fours.

    Long enough that nobody can make a second key with the same fingerprint; short enough to
    compare by eye or read over the phone.
    """
    digest = hashlib.sha256(public).hexdigest()[:32]
    return "SHA256:" + ":".join(digest[i:i + 4] for i in range(0, 32, 4))


def full_fingerprint(public: bytes) -> str:
    """``SHA256:`` and the whole hex digest of the key: what the audit log records."""
    return "SHA256:" + hashlib.sha256(public).hexdigest()


def parse_public_key(text: str | bytes) -> bytes:
    """A raw 32-byte Ed25519 public key from base64 or hex text (or raw bytes)."""
    if isinstance(text, bytes) and len(text) == 32:
        return text
    value = text.decode() if isinstance(text, bytes) else str(text)
    value = value.strip()
    raw = b""
    try:
        raw = bytes.fromhex(value) if len(value) == 64 else base64.b64decode(value,
                                                                            validate=True)
    except (ValueError, binascii.Error):
        pass
    if len(raw) != 32:
        raise ConfigurationError(
            f"Expected an Ed25519 public key: 44 characters of base64 or 64 hex digits, as "
            f"printed by `fedcore-node identity` or `fedcore identity`. Received: "
            f"{value[:80]!r}")
    Ed25519PublicKey.from_public_bytes(raw)
    return raw


def researcher_key_file(identity: str | Path | None = None) -> Path:
    """Where the researcher's key is (it may not exist yet).

    ``identity``, else ``$FEDCORE_IDENTITY``, else ``~/.fedcore/researcher.key``.
    """
    return Path(identity or os.environ.get("FEDCORE_IDENTITY")
                or _DEFAULT_DIR / "researcher.key").expanduser()


def researcher_identity(identity: str | Path | Identity | None = None) -> Identity:
    """The researcher's key (:func:`researcher_key_file`), created on first use."""
    if isinstance(identity, Identity):
        return identity
    return Identity(researcher_key_file(identity))


def public_key(identity: str | Path | None = None) -> str:
    """The researcher's public key (base64), created on first use: give it to node admins."""
    return researcher_identity(identity).public_key


def _nodes_file(path: str | Path | None) -> Path:
    return Path(path or os.environ.get("FEDCORE_NODES") or _DEFAULT_DIR / "nodes.toml"
                ).expanduser()


def enrolled_nodes(enrolled: Mapping[str, str] | str | Path | None = None
                   ) -> dict[str, bytes]:
    """The nodes a researcher accepts: ``{node_id: public key}``.

    ``enrolled`` is a mapping, or the path of a ``nodes.toml`` (``node_id = "KEY"`` lines);
    by default ``$FEDCORE_NODES`` or ``~/.fedcore/nodes.toml`` (empty when missing).
    """
    if isinstance(enrolled, Mapping):
        return {str(k): parse_public_key(v) for k, v in enrolled.items()}
    path = _nodes_file(enrolled)
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path} is not valid TOML: {exc}") from exc
    return {str(k): parse_public_key(str(v)) for k, v in data.items()}


def enroll(node_id: str, key: str, path: str | Path | None = None) -> Path:
    """Record a node's public key in ``nodes.toml`` (the researcher's side of enrollment)."""
    raw = parse_public_key(key)
    file = _nodes_file(path)
    data = {} if not file.exists() else tomllib.loads(file.read_text())
    data[str(node_id)] = base64.b64encode(raw).decode()
    file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(file, "# Nodes this researcher accepts: node_id = public key.\n"
                 + tomli_w.dumps(data))
    return file

