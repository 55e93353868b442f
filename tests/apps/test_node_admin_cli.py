"""``fedcore-node`` governance commands and bad input: clear messages, exit codes, no writes."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedcore.node import Node
from fedcore.plan import PlanBundle
from fedcore_node.cli import main

PW = "a long enough password"


@pytest.fixture
def home(tmp_path):
    assert main(["--home", str(tmp_path / "home"), "init", "--id", "hosp-a"]) == 0
    return tmp_path / "home"


def _run(capsys, home, *argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["--home", str(home), *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _state(home: Path) -> dict[str, bytes]:
    """Every file the node keeps (hidden temporaries too)."""
    return {p.name: p.read_bytes() for p in home.iterdir() if p.is_file()}


def _csv(path: Path, n: int = 30) -> Path:
    rng = np.random.default_rng(0)
    pd.DataFrame({"age": rng.integers(20, 90, n), "label": rng.integers(0, 2, n)}).to_csv(
        path, index=False)
    return path


# --- datasets -------------------------------------------------------------------------------


def test_dataset_add_from_a_description_file(tmp_path, home, capsys):
    exports = tmp_path / "exports"
    exports.mkdir()
    _csv(exports / "cohort.csv")
    (exports / "cohort.toml").write_text(
        'name = "cohort-2024"\ntags = ["diabetes", "2024"]\npath = "cohort.csv"\n'
        'description = "Adults seen in 2024"\n')
    code, out, _ = _run(capsys, home, "dataset", "add", "--file", exports / "cohort.toml")
    assert code == 0 and "Registered 'cohort-2024'" in out and "30 samples" in out
    (entry,) = Node(home).datasets.list()
    assert entry["path"] == str((exports / "cohort.csv").resolve())
    assert entry["description"] == "Adults seen in 2024"
    code, out, _ = _run(capsys, home, "dataset", "show", entry["id"])
    assert code == 0 and "name:" in out and "cohort-2024" in out
    code, out, _ = _run(capsys, home, "dataset", "show", entry["id"], "--json")
    assert json.loads(out)["tags"] == ["2024", "diabetes"]


def _bad_description(tmp_path, text, name="desc.toml"):
    folder = tmp_path / "exports"
    folder.mkdir(exist_ok=True)
    _csv(folder / "cohort.csv")
    (folder / name).write_text(text)
    return folder / name


BAD_INPUTS = {
    "missing data file": (["--name", "x", "--tags", "t", "--path", "{tmp}/missing.csv"],
                          "No file at"),
    "missing description file": (["--file", "{tmp}/nowhere.toml"],
                                 "Cannot read the description file"),
    "unreadable csv": (["--name", "x", "--tags", "t", "--path", "{tmp}/garbage.csv"],
                       "cannot be read"),
    "overlapping tags": (["--name", "y", "--tags", "diabetes", "--path", "{tmp}/other.csv"],
                         "overlap"),
    "../ path trick": (["--file", "{desc:../secret/cohort.csv}"],
                       "leaves the folder of the description file"),
    "missing key": (["--file", "{desc-missing-tags}"], "missing key 'tags'"),
    "misspelt key": (["--file", "{desc-typo}"], "unknown key 'tag' (did you mean 'tags'?)"),
    "not toml": (["--file", "{desc-broken}"], "is not valid TOML"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_dataset_input_is_explained_exits_1_and_writes_nothing(tmp_path, home, capsys,
                                                                   case):
    _run(capsys, home, "dataset", "add", "--name", "cohort", "--tags", "diabetes,2024",
         "--path", _csv(tmp_path / "first.csv"))
    (tmp_path / "garbage.csv").write_bytes(b"\x00\xff\xfe\x80 not a table\n\x00")
    _csv(tmp_path / "other.csv")
    (tmp_path / "secret").mkdir()
    _csv(tmp_path / "secret" / "cohort.csv")
    argv, expected = BAD_INPUTS[case]
    subst = {
        "{desc:../secret/cohort.csv}": _bad_description(
            tmp_path, 'name = "x"\ntags = ["t"]\npath = "../secret/cohort.csv"\n'),
        "{desc-missing-tags}": _bad_description(tmp_path, 'name = "x"\npath = "cohort.csv"\n',
                                                "nokey.toml"),
        "{desc-typo}": _bad_description(
            tmp_path, 'name = "x"\ntag = ["t"]\npath = "cohort.csv"\n', "typo.toml"),
        "{desc-broken}": _bad_description(tmp_path, 'name = "x\n', "broken.toml"),
    }
    argv = [str(subst.get(a, a)).replace("{tmp}", str(tmp_path)) for a in argv]
    before = _state(home)
    code, out, err = _run(capsys, home, "dataset", "add", *argv)
    assert code == 1, (out, err)
    assert err.startswith("fedcore-node: error: ") and expected in err, err
    assert _state(home) == before
    assert len(Node(home).datasets.list()) == 1


def test_file_and_name_options_do_not_mix(tmp_path, home, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--home", str(home), "dataset", "add", "--file", "d.toml", "--name", "x"])
    assert info.value.code == 2 and "--file replaces --name" in capsys.readouterr().err


# --- plans ----------------------------------------------------------------------------------


def _submit(node, version, submitter="researcher-1"):
    source = f"class Plan:\n    # version {version}\n    epochs = {version}\n"
    bundle = PlanBundle(files={"plan.py": source}, entry="Plan", backend="sklearn")
    return node.plans.submit(bundle, submitter=submitter)["sha256"]


def test_plan_review_commands(home, capsys):
    node = Node(home)
    code, out, _ = _run(capsys, home, "plan", "list")
    assert code == 0 and "No plans" in out
    first, second = _submit(node, 1), _submit(node, 2)
    code, out, _ = _run(capsys, home, "info")
    assert "id:    hosp-a" in out and "plans: approval required, 2 pending review" in out
    code, out, _ = _run(capsys, home, "plan", "list")
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["sha256", "plan", "backend", "status"]
    assert [ln.split()[0] for ln in lines[1:]] == [first[:16], second[:16]]
    assert all("pending" in ln for ln in lines[1:])

    code, out, _ = _run(capsys, home, "plan", "show", second[:8])
    assert code == 0 and f"sha256:     {second}" in out and "# version 2" in out
    assert f"previous:   {first}" in out
    code, out, _ = _run(capsys, home, "plan", "diff", second[:8])
    assert f"--- {first[:12]}/plan.py\n+++ {second[:12]}/plan.py\n" in out
    assert "-    # version 1\n-    epochs = 1\n+    # version 2\n+    epochs = 2\n" in out
    code, out, _ = _run(capsys, home, "plan", "diff", first[:8])
    assert code == 0 and "first submission" in out

    assert _run(capsys, home, "plan", "approve", first[:10], "--note", "ok")[0] == 0
    code, out, _ = _run(capsys, home, "plan", "reject", second, "--note", "reads files")
    assert code == 0 and "researchers see: reads files" in out
    code, out, _ = _run(capsys, home, "plan", "list", "--status", "approved", "--json")
    (approved,) = json.loads(out)
    assert approved["sha256"] == first and approved["note"] == "ok"
    assert approved["reviewed_by"].startswith("cli") and "files" not in approved
    assert Node(home).plans.status(second) == "rejected"
    events = [(r["event"], r.get("plan")) for r in Node(home).audit_log()]
    assert ("plan-approved", first) in events and ("plan-rejected", second) in events


def test_plan_commands_refuse_unknown_hashes(home, capsys):
    sha = _submit(Node(home), 1)
    before = _state(home)
    code, _, err = _run(capsys, home, "plan", "approve", "ffffffffffff")
    assert code == 1 and "No plan 'ffffffffffff'" in err and "plan list" in err
    code, _, err = _run(capsys, home, "plan", "approve", sha[:3])
    assert code == 1 and f"No plan {sha[:3]!r}" in err  # too short to be a prefix
    code, _, err = _run(capsys, home, "plan", "diff", sha, "--against", "0" * 64)
    assert code == 1 and "No plan '000000" in err
    with pytest.raises(SystemExit) as info:
        main(["--home", str(home), "plan", "reject", sha])  # a rejection needs a note
    assert info.value.code == 2 and "--note" in capsys.readouterr().err
    assert _state(home) == before


# --- policy ---------------------------------------------------------------------------------


def test_policy_show_and_set(home, capsys):
    code, out, _ = _run(capsys, home, "policy", "show")
    assert code == 0
    rows = {ln.split()[0]: ln for ln in out.splitlines()[1:]}
    assert rows["approval_required"].split()[1] == "true"
    assert rows["max_epochs"].split()[1] == "none"
    code, out, _ = _run(capsys, home, "policy", "set", "max_epochs=5", "on_excess=refuse",
                        "dataset_access.alice=ds-1,cohort", "allow_gpu=no")
    assert code == 0
    assert out.splitlines() == ["allow_gpu: true -> false",
                                'dataset_access: none -> {"alice": ["ds-1", "cohort"]}',
                                "max_epochs: none -> 5", "on_excess: clamp -> refuse"]
    code, out, _ = _run(capsys, home, "policy", "show", "--json")
    policy = json.loads(out)
    assert policy["max_epochs"] == 5 and policy["dataset_access"] == {
        "alice": ["ds-1", "cohort"]}
    assert "max_epochs = 5" in (home / "config.toml").read_text()
    code, out, _ = _run(capsys, home, "policy", "set", "max_epochs=none")
    assert out == "max_epochs: 5 -> none\n" and Node(home).policy["max_epochs"] is None
    assert _run(capsys, home, "policy", "set", "min_samples=0")[1] == "Nothing changed.\n"


@pytest.mark.parametrize("setting,expected", [
    ("max_epoch=5", "Did you mean 'max_epochs'?"),
    ("max_epochs=-1", "max_epochs must be a whole number >= 1"),
    ("on_excess=ignore", "on_excess must be one of ['clamp', 'refuse']"),
    ("approval_required=maybe", "approval_required must be true or false"),
    ("dataset_access=ds-1", "dataset_access is a table"),
    ("max_epochs", "Expected KEY=VALUE"),
])
def test_bad_policy_settings_are_refused_and_nothing_is_written(home, capsys, setting,
                                                                 expected):
    before = _state(home)
    code, _, err = _run(capsys, home, "policy", "set", "min_samples=10", setting)
    assert code == 1 and expected in err, err
    assert _state(home) == before


def test_secure_aggregation_floors_are_policy_keys_with_safe_defaults(home, capsys):
    code, out, _ = _run(capsys, home, "policy", "show")
    rows = {ln.split()[0]: ln.split()[1] for ln in out.splitlines()[1:] if ln.strip()}
    assert (rows["secagg_min_members"], rows["secagg_min_key_bits"],
            rows["secagg_jl_moduli"]) == ("3", "2048", "none")
    digest = "ab" * 32
    code, out, _ = _run(capsys, home, "policy", "set", "secagg_min_members=4",
                        f'secagg_jl_moduli=["{digest}"]')
    assert code == 0 and "secagg_min_members: 3 -> 4" in out
    assert Node(home).policy["secagg_jl_moduli"] == [digest]
    before = _state(home)
    for bad, expected in (("secagg_min_members=1", "secagg_min_members must be a whole "
                           "number >= 2"),
                          ("secagg_min_key_bits=128", ">= 256"),
                          ('secagg_jl_moduli=["not-a-digest"]', "64 hex digits")):
        code, _, err = _run(capsys, home, "policy", "set", bad)
        assert code == 1 and expected in err, err
    assert _state(home) == before


def test_peer_add_list_remove_are_audited_and_stored_in_config_toml(home, capsys, tmp_path):
    from fedcore.wire.identity import Identity

    other = Identity(tmp_path / "other.key")
    code, out, _ = _run(capsys, home, "peer", "list")
    assert code == 0 and "No peer list" in out and "making up members" in out
    code, out, _ = _run(capsys, home, "peer", "add", "hosp-b", other.public_key)
    assert code == 0 and f"Peer 'hosp-b' ({other.fingerprint})" in out
    assert Node(home).peers == {"hosp-b": other.public_bytes}
    assert "[peers]" in (home / "config.toml").read_text()
    code, out, _ = _run(capsys, home, "peer", "list")
    assert "hosp-b" in out and other.fingerprint in out
    code, _, err = _run(capsys, home, "peer", "add", "hosp-c", "not a key")
    assert code == 1 and "Expected an Ed25519 public key" in err
    code, _, err = _run(capsys, home, "peer", "add", "hosp-a", other.public_key)
    assert code == 1 and "this node itself" in err
    code, out, _ = _run(capsys, home, "peer", "remove", "hosp-b")
    assert code == 0 and "The peer list is empty" in out and Node(home).peers is None
    code, _, err = _run(capsys, home, "peer", "remove", "hosp-b")
    assert code == 1 and "No peer named 'hosp-b'" in err
    events = [e["event"] for e in Node(home).audit_log()]
    assert events.count("peer-added") == 1 and events.count("peer-removed") == 1


def test_secagg_jl_modulus_prints_a_2048_bit_modulus_and_the_digest_to_install(home, capsys):
    import hashlib

    code, out, _ = _run(capsys, home, "secagg", "jl-modulus")
    lines = dict(ln.split(":", 1) for ln in out.splitlines()[:2])
    modulus = int(lines["modulus"].strip(), 16)
    assert code == 0 and modulus.bit_length() == 2048 and modulus % 2 == 1
    digest = hashlib.sha256(modulus.to_bytes(256, "little")).hexdigest()
    assert lines["sha256"].strip() == digest and f"secagg_jl_moduli=[\"{digest}\"]" in out


def test_a_misspelt_key_in_config_toml_is_pointed_out(home, capsys):
    config = home / "config.toml"
    config.write_text(config.read_text() + "max_epoch = 3\n")
    code, out, _ = _run(capsys, home, "policy", "show")
    assert code == 0 and "'max_epoch' (did you mean 'max_epochs'?)" in out


# --- users ----------------------------------------------------------------------------------


def test_user_add_passwd_list(home, capsys, monkeypatch):
    code, out, _ = _run(capsys, home, "user", "list")
    assert code == 0 and "No users" in out  # no default account
    code, out, _ = _run(capsys, home, "user", "add", "alice", "--role", "admin",
                        "--password-stdin", stdin=PW + "\n", monkeypatch=monkeypatch)
    assert code == 0 and "User 'alice' added (admin)" in out
    _run(capsys, home, "user", "add", "bob", "--role", "read-only", "--password-stdin",
         stdin=PW + "!\n", monkeypatch=monkeypatch)
    users = Node(home).users
    assert users.verify("alice", PW) == "admin" and users.verify("bob", PW + "!") == "read-only"
    assert users.verify("alice", "wrong password") is None
    assert users.verify("nobody", PW) is None
    code, out, _ = _run(capsys, home, "user", "passwd", "alice", "--password-stdin",
                        stdin="another long password\n", monkeypatch=monkeypatch)
    assert code == 0 and Node(home).users.verify("alice", "another long password") == "admin"
    assert Node(home).users.verify("alice", PW) is None
    code, out, _ = _run(capsys, home, "user", "list", "--json")
    listed = json.loads(out)
    assert [(u["username"], u["role"]) for u in listed] == [("alice", "admin"),
                                                            ("bob", "read-only")]
    assert "argon2" not in out and "argon2id" in (home / "db.json").read_text()
    assert PW not in (home / "db.json").read_text()
    logins = [r for r in Node(home).audit_log() if r["event"] == "login"]
    assert [r["ok"] for r in logins][:4] == [True, True, False, False]


@pytest.mark.parametrize("argv,stdin,expected", [
    (["add", "alice", "--role", "admin", "--password-stdin"], "short\n",
     "at least 10 characters"),
    (["add", "../alice", "--role", "admin", "--password-stdin"], PW + "\n",
     "A username is 1 to 64 letters"),
    (["add", "taken", "--role", "admin", "--password-stdin"], PW + "\n", "already exists"),
    (["passwd", "nobody", "--password-stdin"], PW + "\n", "No user 'nobody'"),
    (["add", "carol", "--role", "admin"], PW + "\n", "No terminal to ask the password on"),
])
def test_bad_user_input_is_refused(home, capsys, monkeypatch, argv, stdin, expected):
    Node(home).users.add("taken", PW, "admin")
    before = _state(home)
    code, _, err = _run(capsys, home, "user", *argv, stdin=stdin, monkeypatch=monkeypatch)
    assert code == 1 and expected in err, err
    assert _state(home) == before


def test_an_unknown_role_is_a_usage_error(home, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--home", str(home), "user", "add", "eve", "--role", "root"])
    assert info.value.code == 2 and "invalid choice: 'root'" in capsys.readouterr().err


# --- the rest -------------------------------------------------------------------------------


def test_gui_without_the_gui_module_says_what_to_install(home, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "fedcore_node.gui", None)  # as if not installed
    code, _, err = _run(capsys, home, "gui", "--port", "0")
    assert code == 1 and 'pip install -c constraints.txt ".[gui]"' in err


@pytest.mark.parametrize("argv", [["plan", "list"], ["policy", "show"], ["audit", "verify"],
                                  ["user", "list"], ["gui"]])
def test_every_command_needs_a_node_home(tmp_path, capsys, argv):
    code, _, err = _run(capsys, tmp_path / "nowhere", *argv)
    assert code == 1 and "No node home" in err
    assert not (tmp_path / "nowhere").exists()


def test_the_installed_command_documents_every_command(tmp_path):
    exe = shutil.which("fedcore-node", path=str(Path(sys.executable).parent))
    assert exe
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60).stdout
    for command in ("dataset", "plan", "policy", "audit", "user", "gui"):
        assert command in out
    out = subprocess.run([exe, "dataset", "add", "--help"], capture_output=True, text=True,
                         timeout=60).stdout
    assert "description file (TOML)" in out and 'tags = ["diabetes", "2024"]' in out
    out = subprocess.run([exe, "policy", "set", "--help"], capture_output=True, text=True,
                         timeout=60).stdout
    assert "max_epochs" in out and "on_excess" in out
    done = subprocess.run([exe, "--home", str(tmp_path / "h"), "plan", "approve", "abcdef"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "No node home" in done.stderr
