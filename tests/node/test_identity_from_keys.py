"""A node knows a researcher by the key that signed the request, never by the name it writes.

Attack: a trusted researcher (alice) writes another trusted researcher's name (bob) in the
envelope to borrow bob's datasets. Deployment: two researchers with their own keys, one node
whose ``dataset_access`` grants each their own dataset.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from fedcore import FederatedStatistics
from fedcore.wire.identity import Identity, fingerprint, full_fingerprint
from fedcore.wire.messages import ErrorReply, SearchReply, SearchRequest, StatsReply, StatsRequest
from fedcore_node.cli import main as node_cli
from tests._support.attack import Attacker, serve


@pytest.fixture
def site(tmp_path):
    """A node trusting alice and bob, each allowed their own dataset only."""
    keys = {name: tmp_path / f"{name}.key" for name in ("alice", "bob")}
    url, node = serve(tmp_path / "site", "site", trusted=keys)
    rng = np.random.default_rng(0)
    ids = {}
    for name in ("alice", "bob"):
        path = tmp_path / f"{name}.csv"
        pd.DataFrame({"age": rng.normal(50, 10, 60)}).to_csv(path, index=False)
        ids[name] = node.datasets.add(f"{name}-data", ["cohort", name], path)["id"]
    node.set_policy(dataset_access={"alice": ["alice-data"], "bob": ["bob-data"]})
    try:
        yield url, node, keys, ids
    finally:
        node.stop()


def _stats(dataset: str) -> StatsRequest:
    return StatsRequest(dataset_id=dataset, queries=[
        {"variable": "age", "shift": 0.0, "min_max": False, "edges": None}])


def test_a_trusted_key_that_writes_another_name_gets_its_own_rights(site):
    url, node, keys, ids = site
    alice = Identity(keys["alice"])
    with Attacker(url, {"site": node.identity.public_bytes}, key=keys["alice"]) as attacker:
        found = attacker.ask("site", SearchRequest(tags=["cohort"]), sender="bob").body
        refused = attacker.ask("site", _stats(ids["bob"]), sender="bob").body
        own = attacker.ask("site", _stats(ids["alice"]), sender="bob").body
    assert isinstance(found, SearchReply)
    assert [d["name"] for d in found.datasets] == ["alice-data"]  # bob's is not even listed
    assert isinstance(refused, ErrorReply) and refused.kind == "governance"
    assert "'alice' may not use dataset 'bob-data'" in refused.message
    assert isinstance(own, StatsReply)
    decisions = [r for r in node.audit_log() if r["event"] == "decision"]
    assert [(d["researcher"], d["dataset"], d["allowed"]) for d in decisions] == [
        ("alice", ids["bob"], False), ("alice", ids["alice"], True)]
    requests = [r for r in node.audit_log() if r.get("researcher_key")]
    assert requests and {r["researcher_key"] for r in requests} == {
        full_fingerprint(alice.public_bytes)}
    assert not any(r.get("researcher") == "bob" for r in node.audit_log()
                   if r["event"] != "researcher-trusted")


def test_dataset_access_grants_alice_and_refuses_bob_by_their_keys(site):
    url, node, keys, ids = site
    enrolled = {"site": node.identity.public_key}
    with FederatedStatistics(url, ["cohort"], identity=keys["alice"],
                             enrolled=enrolled) as alice:
        assert list(alice.search()["name"]) == ["alice-data"]
        table = alice.describe("age")
    assert table.loc[("age", "site"), "count"] == 60
    with FederatedStatistics(url, ["cohort"], nodes=["site"], identity=keys["bob"],
                             enrolled=enrolled) as bob:
        assert list(bob.search()["name"]) == ["bob-data"]  # alice's dataset stays hidden
    # bob asks for alice's dataset by hand: refused under his own name.
    with Attacker(url, {"site": node.identity.public_bytes}, key=keys["bob"]) as attacker:
        refused = attacker.ask("site", _stats(ids["alice"]), sender="alice").body
    assert isinstance(refused, ErrorReply) and "'bob' may not use" in refused.message
    refusal = [r for r in node.audit_log() if r["event"] == "decision" and not r["allowed"]]
    assert [(r["researcher"], r["researcher_key"]) for r in refusal] == [
        ("bob", full_fingerprint(Identity(keys["bob"]).public_bytes))]


def test_fingerprints_shown_to_people_carry_128_bits(tmp_path, capsys):
    key = Identity(tmp_path / "k.key")
    node_cli(["--home", str(tmp_path / "site"), "init", "--name", "Site"])
    node_cli(["--home", str(tmp_path / "site"), "trust", "add", "carol", key.public_key])
    node_cli(["--home", str(tmp_path / "site"), "trust", "list"])
    shown = fingerprint(key.public_bytes)
    assert shown in capsys.readouterr().out
    digits = shown.removeprefix("SHA256:").replace(":", "")
    assert len(digits) * 4 == 128
    assert full_fingerprint(key.public_bytes) == "SHA256:" + hashlib.sha256(
        key.public_bytes).hexdigest()
    assert full_fingerprint(key.public_bytes).removeprefix("SHA256:").startswith(digits)
