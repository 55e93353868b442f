"""``fedcore identity`` and ``fedcore enroll``: the researcher's side of enrollment, as a user
runs it, with the node's side (``fedcore-node identity``, ``trust add``) from its own CLI.
"""

from __future__ import annotations

import base64
import io
import json
import stat
import tomllib

import pytest

from fedcore.wire.identity import Identity, enrolled_nodes, fingerprint
from fedcore_node.cli import main as node_cli
from fedcore_researcher import cli


def fedcore(*argv: object) -> tuple[int, str]:
    """``fedcore ARGV`` in this process: (exit code, stdout)."""
    out = io.StringIO()
    code = cli.main([str(a) for a in argv], out=out)
    return code, out.getvalue()


@pytest.fixture
def keys(tmp_path, monkeypatch):
    """The researcher's default key and nodes.toml, in tmp_path (neither exists yet)."""
    monkeypatch.setenv("FEDCORE_IDENTITY", str(tmp_path / "me" / "researcher.key"))
    monkeypatch.setenv("FEDCORE_NODES", str(tmp_path / "me" / "nodes.toml"))
    return tmp_path / "me"


def test_identity_creates_the_key_once_and_prints_what_the_node_admin_needs(keys):
    code, out = fedcore("identity")
    assert code == 0
    me = Identity(keys / "researcher.key")
    assert stat.S_IMODE(me.path.stat().st_mode) == 0o600
    assert out.splitlines()[:3] == [f"public key:  {me.public_key}",
                                    f"fingerprint: {me.fingerprint}",
                                    f"key file:    {me.path} (created now)"]
    assert f"fedcore-node trust add NAME {me.public_key}" in out
    code, again = fedcore("identity")  # the same key, not a new one
    assert code == 0 and again.splitlines()[2] == f"key file:    {me.path}"
    assert again.splitlines()[0] == f"public key:  {me.public_key}"


def test_identity_with_a_key_file_and_json(tmp_path, keys):
    code, out = fedcore("identity", "--identity", tmp_path / "study.key", "--json")
    assert code == 0
    me = Identity(tmp_path / "study.key")
    assert json.loads(out) == {"public_key": me.public_key, "fingerprint": me.fingerprint,
                               "key_file": str(me.path), "created": True}
    assert not (keys / "researcher.key").exists()


def test_identity_refuses_a_key_other_users_can_read(tmp_path, keys, capsys):
    Identity(tmp_path / "open.key").path.chmod(0o644)
    code, out = fedcore("identity", "--identity", tmp_path / "open.key")
    assert code == 2 and out == ""
    assert "chmod 600" in capsys.readouterr().err


def test_enroll_writes_the_key_the_node_prints_to_nodes_toml(tmp_path, keys, capsys):
    home = tmp_path / "home"
    assert node_cli(["--home", str(home), "init", "--id", "site-a"]) == 0
    capsys.readouterr()
    assert node_cli(["--home", str(home), "identity"]) == 0
    shown = capsys.readouterr().out
    hint = next(line for line in shown.splitlines() if "fedcore enroll" in line)
    command = hint.split("with: ")[1].split()  # the node says what to run, word for word
    assert command[:3] == ["fedcore", "enroll", "site-a"]
    code, out = fedcore(*command[1:])
    assert code == 0
    node_key = Identity(home / "identity.key")
    assert out == (f"Enrolled node 'site-a' ({fingerprint(node_key.public_bytes)}) in "
                   f"{keys / 'nodes.toml'}\n")
    written = tomllib.loads((keys / "nodes.toml").read_text())
    assert written == {"site-a": node_key.public_key}
    assert enrolled_nodes() == {"site-a": node_key.public_bytes}


def test_enroll_into_a_given_file_adds_and_replaces(tmp_path, keys):
    file = tmp_path / "study" / "nodes.toml"
    first, second = (Identity(tmp_path / f"{n}.key") for n in ("a", "b"))
    assert fedcore("enroll", "site-a", first.public_key, "--enrolled", file)[0] == 0
    assert fedcore("enroll", "site-b", second.public_bytes.hex(), "--enrolled", file)[0] == 0
    assert fedcore("enroll", "site-a", second.public_key, "--enrolled", file)[0] == 0
    written = tomllib.loads(file.read_text())
    assert written == {"site-a": second.public_key,
                       "site-b": base64.b64encode(second.public_bytes).decode()}
    assert file.read_text().startswith("# Nodes this researcher accepts")
    assert not (keys / "nodes.toml").exists()


def test_enroll_a_malformed_key_is_a_usage_error(keys, capsys):
    code, out = fedcore("enroll", "site-a", "not-a-key")
    assert code == 2 and out == ""
    err = capsys.readouterr().err
    assert "fedcore: error: Expected an Ed25519 public key" in err
    assert "fedcore-node identity" in err
    assert not (keys / "nodes.toml").exists()


def test_the_help_describes_identity_and_enroll(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    top = capsys.readouterr().out
    assert "identity" in top and "enroll" in top and "fedcore enroll site-a KEY" in top
    with pytest.raises(SystemExit):
        cli.main(["identity", "--help"])
    text = capsys.readouterr().out
    assert "fedcore-node trust add NAME KEY" in text and "--identity" in text
    with pytest.raises(SystemExit):
        cli.main(["enroll", "--help"])
    text = capsys.readouterr().out
    assert "NODE_ID" in text and "KEY" in text and "fedcore-node identity" in text
    assert "--enrolled" in text
