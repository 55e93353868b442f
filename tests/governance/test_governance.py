"""Governance end to end: plan approval, training-argument caps, minimum samples, policies."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import uuid

import numpy as np
import pytest

from fedcore import Experiment, _runtime, simulate
from fedcore.errors import ConfigurationError, RoundError
from fedcore.governance import Decision, Governance, Policy, Request, build_governance
from fedcore.governance.policies import effective_policy
from fedcore.node import Node
from fedcore.plan import PlanBundle
from fedcore.transport import open_transport
from fedcore.wire import codec
from fedcore.wire.messages import Envelope, ErrorReply, TrainRequest
from fedcore_node.cli import main

pytest.importorskip("sklearn")

PLAN_SOURCE = '''\
from sklearn.linear_model import SGDClassifier

from fedcore_sklearn import SklearnTrainingPlan


class CohortPlan(SklearnTrainingPlan):
    # version 1
    estimator = SGDClassifier
'''


def _import_plan(folder, source):
    """Import CohortPlan from a file of its own, as a researcher's module would be."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cohort_plan.py"
    path.write_text(source)
    name = f"cohort_plan_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module.CohortPlan


def _data(n=120, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    return X, (X[:, 0] + 0.3 * X[:, 1] > 0).astype(int)


def _experiment(plan, url, **training_args):
    return Experiment(plan, tags=["cohort"], federation=url, progress=False,
                      model_args={"loss": "log_loss"},
                      training_args=training_args or {"epochs": 1})


def _cli(*argv):
    return main([str(a) for a in argv])


def test_a_plan_runs_only_once_approved_and_a_one_byte_change_is_refused(tmp_path, capsys):
    home = tmp_path / "hospital"
    node = Node(home, node_id="hospital-a")  # a deployed node: approval on by default
    assert node.policy["approval_required"] is True
    node.datasets.add_arrays("cohort-2024", ["cohort"], *_data())
    url = f"inproc://approval-{uuid.uuid4().hex[:6]}"
    node.start(url)
    try:
        plan_v1 = _import_plan(tmp_path / "v1", PLAN_SOURCE)
        exp = _experiment(plan_v1, url)
        sha = exp.plan_hash
        with pytest.raises(RoundError, match=f"Plan {sha} .*never submitted"):
            exp.run_once()
        row = exp.history.iloc[-1]
        assert row["status"] == "failed" and row["error_kind"] == "governance"
        assert sha in row["error"]
        assert exp.plan_status()["status"].tolist() == ["unknown"]

        status = exp.submit_plan("first version: logistic regression")
        assert status[["node", "status"]].values.tolist() == [["hospital-a", "pending"]]
        with pytest.raises(RoundError, match="awaiting review"):
            exp.run_once()

        assert _cli("--home", home, "plan", "approve", sha[:12], "--note", "reviewed") == 0
        assert f"Approved {sha}" in capsys.readouterr().out
        assert exp.plan_status()["status"].tolist() == ["approved"]
        rows = exp.run_once()  # the serving node sees the CLI's decision
        assert rows["status"].tolist() == ["ok"] and exp.round == 1

        plan_v2 = _import_plan(tmp_path / "v2", PLAN_SOURCE.replace("version 1", "version 2"))
        exp.plan = plan_v2
        assert exp.plan_hash != sha
        with pytest.raises(RoundError, match=f"Plan {exp.plan_hash} .*approved version of "
                                             f"CohortPlan exists, {sha[:12]}"):
            exp.run_once()
        exp.submit_plan("second version")
        assert _cli("--home", home, "plan", "diff", exp.plan_hash) == 0
        diff = capsys.readouterr().out
        assert "-    # version 1\n+    # version 2\n" in diff and sha[:12] in diff
        with pytest.raises(RoundError, match="awaiting review"):
            exp.run_once()
        exp.close()

        # Files changed after hashing, sent under the approved hash: refused as tampered.
        forged = {**PlanBundle.from_class(plan_v2).to_wire(), "sha256": sha}
        reply = _send(url, TrainRequest(plan=forged, params=exp.parameters,
                                        dataset_id=node.datasets.list()[0]["id"]))
        assert isinstance(reply, ErrorReply) and reply.kind == "governance"
        assert f"do not match its declared hash {sha}" in reply.message
    finally:
        node.stop()
    decisions = [r for r in node.audit_log() if r["event"] == "decision"]
    assert [d["allowed"] for d in decisions] == [False, False, True, False, False]
    assert all(d["plan"] for d in decisions) and node.verify_audit()


def _send(url, body):
    async def go():
        t = open_transport(url, role="researcher", identity="raw-researcher")
        await t.start()
        try:
            await t.send("hospital-a", codec.encode(Envelope(body, sender="raw-researcher")))
            _, frame = await asyncio.wait_for(t.receive(), 30)
            return codec.decode(frame).body
        finally:
            await t.close()

    return _runtime.run(go())


def test_an_epoch_cap_clamps_or_refuses_as_the_policy_says(tmp_path, capsys):
    X, y = _data(200)
    with simulate.from_arrays(X, y, n_nodes=2, tags=["cohort"]) as fed:
        capped = fed.nodes[0]
        assert capped.policy["approval_required"] is False  # a simulation
        capped.set_policy(max_epochs=1)
        exp = _experiment(_import_plan(tmp_path, PLAN_SOURCE), fed.url, epochs=5,
                          batch_size=10)
        rows = exp.run_once().set_index("node")
        assert rows.loc["node-01", "status"] == "ok"
        assert rows.loc["node-01", "overrides"] == {"epochs": 1}
        assert "epochs 5 clamped to this node's maximum 1" in rows.loc["node-01", "policy"]
        assert rows.loc["node-01", "train_epochs"] == 1
        assert rows.loc["node-02", "train_epochs"] == 5  # no cap there
        assert rows.loc["node-01", "train_batches"] * 5 == rows.loc["node-02", "train_batches"]

        assert _cli("--home", capped.home, "policy", "set", "on_excess=refuse") == 0
        assert "on_excess: clamp -> refuse" in capsys.readouterr().out
        rows = exp.run_once().set_index("node")
        assert rows.loc["node-01", "status"] == "failed"
        assert rows.loc["node-01", "error_kind"] == "governance"
        assert "epochs=5 is outside this node's maximum of 1" in rows.loc["node-01", "error"]
        assert rows.loc["node-02", "status"] == "ok"
        exp.training_args = {"epochs": 1, "batch_size": 10}
        assert set(exp.run_once()["status"]) == {"ok"}


def test_a_dataset_below_the_minimum_sample_count_is_never_trained_on(tmp_path):
    X, y = _data(200)
    with simulate.SimulatedFederation() as fed:
        big, small = fed.add_node(), fed.add_node()
        big.datasets.add_arrays("big", ["cohort"], X[:150], y[:150])
        small.datasets.add_arrays("small", ["cohort"], X[150:], y[150:])
        small.set_policy(min_samples=100)
        exp = _experiment(_import_plan(tmp_path, PLAN_SOURCE), fed.url)
        exp.run(2)
        h = exp.history
        refused = h[h["node"] == "node-02"]
        assert refused["status"].tolist() == ["failed", "failed"]
        assert set(refused["error_kind"]) == {"governance"}
        assert "has 50 samples; this node uses only datasets of at least 100" in (
            refused["error"].iloc[0])
        assert set(h[h["node"] == "node-01"]["status"]) == {"ok"}
        events = [r["event"] for r in small.audit_log()]
        assert "trained" not in events and events.count("decision") == 2


def _review(policy, request, **kwargs):
    node_policy = effective_policy({"approval_required": False, **policy})
    return build_governance(node_policy, plans=None, **kwargs).review(request)


def test_the_built_in_policies_decide_and_explain():
    ds = {"id": "ds-1", "name": "cohort-2024", "metadata": {"n_samples": 80}}
    train = Request(kind="train", researcher="alice", dataset=ds, n_samples=80,
                    training_args={"epochs": 2, "batch_size": 500, "use_gpu": True})
    d = _review({"batch_size_min": 8, "batch_size_max": 64, "allow_gpu": False}, train)
    assert d.allowed and d.overrides == {"batch_size": 64, "use_gpu": False}
    assert "batch_size 500 clamped to this node's maximum 64" in d.reason
    d = _review({"max_updates": 100}, train)  # imposed when not asked for
    assert d.overrides == {"num_updates": 100}
    d = _review({"batch_size_min": 1000, "on_excess": "refuse"}, train)
    assert not d and "minimum of 1000 (policy batch_size_min)" in d.reason
    d = _review({"max_epochs": 3}, Request(kind="train", training_args={"epochs": "many"}))
    assert not d and "must be a whole number" in d.reason
    access = {"dataset_access": {"bob": ["cohort-2024"], "*": ["ds-other"]}}
    assert not _review(access, train) and "may not use dataset 'cohort-2024'" in (
        _review(access, train).reason)
    assert _review({"dataset_access": {"alice": ["ds-1"]}}, train)
    assert _review({"dataset_access": {"*": ["*"]}}, train)
    assert "requires secure aggregation" in _review({"secagg_required": True}, train).reason
    stats = Request(kind="statistics", researcher="alice", dataset=ds, n_samples=80)
    assert not _review({"statistics": False}, stats)
    assert _review({"statistics": False}, train)
    assert "has 80 samples" in _review({"min_samples": 81}, stats).reason


class EpochsToOne(Policy):
    """A site policy that edits the decision an allow gave it (a pattern users write)."""

    name = "epochs-to-one"

    def review(self, request):
        decision = Decision.allow()
        decision.overrides["epochs"] = 1
        return decision


def test_an_allow_is_a_fresh_decision_that_no_policy_can_change_for_another():
    assert Decision.allow() == Decision(True) and Decision.allow() is not Decision.allow()
    edited = Governance([EpochsToOne()]).review(Request(kind="train"))
    assert edited.overrides == {"epochs": 1}
    # The next request, through the default chain, is not clamped by that edit.
    chain = build_governance(effective_policy({"approval_required": False}),
                             None)  # type: ignore[arg-type]  # no plan store needed
    later = chain.review(Request(kind="train", training_args={"epochs": 5}))
    assert later.allowed and later.overrides == {} and later.privacy == {}
    assert Decision.allow().overrides == {}


class NightsOnly(Policy):
    name = "nights-only"

    def review(self, request):
        return Decision.refuse("This hospital trains at night only.")


def test_a_site_policy_joins_the_chain_and_every_decision_is_audited(tmp_path):
    node = Node(tmp_path / "h", node_id="n1", approval_required=False,
                policies=[NightsOnly()])
    assert isinstance(node.governance, Governance)
    assert [p.name for p in node.governance.policies][-1] == "nights-only"
    decision = node.review(Request(kind="train", researcher="alice"))
    assert not decision and decision.policy == "nights-only"
    (record,) = [r for r in node.audit_log() if r["event"] == "decision"]
    assert record["allowed"] is False and record["policy"] == "nights-only"
    assert record["reason"] == "This hospital trains at night only."


def test_policy_changes_are_checked_written_and_followed(tmp_path):
    node = Node(tmp_path / "h", node_id="n1")
    config = tmp_path / "h" / "config.toml"
    before = config.read_bytes()
    with pytest.raises(ConfigurationError, match="Did you mean 'max_epochs'"):
        node.set_policy(max_epoch=3)
    with pytest.raises(ConfigurationError, match="on_excess must be one of"):
        node.set_policy(on_excess="ignore")
    with pytest.raises(ConfigurationError, match="batch_size_min .* is above batch_size_max"):
        node.set_policy(batch_size_min=64, batch_size_max=8)
    assert config.read_bytes() == before  # nothing written
    assert node.set_policy(max_epochs=3, by="tester") == {"max_epochs": [None, 3]}
    assert "max_epochs = 3" in node.policy_toml()

    # Another process (an editor) breaks the file: the node fails closed, then recovers.
    config.write_text(config.read_text().replace("max_epochs = 3", 'max_epochs = "three"'))
    refused = node.review(Request(kind="train", researcher="alice"))
    assert not refused and "policy configuration is invalid" in refused.reason
    node.set_policy(max_epochs=None)  # fixing the bad key is allowed
    assert node.review(Request(kind="train", researcher="alice", plan_hash="x")).policy == (
        "plan-approval")  # approval on: the chain is whole again
    node.set_policy_toml("approval_required = false\nmin_samples = 10\n", by="gui-user")
    assert node.policy["approval_required"] is False and node.policy["min_samples"] == 10
    assert node.policy["max_epochs"] is None
    changes = [r for r in node.audit_log() if r["event"] == "policy-changed"]
    assert changes[0]["by"] == "tester" and changes[-1]["by"] == "gui-user"
