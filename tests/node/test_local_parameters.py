"""Local parameters (FedPer's head, FedBN's batch-norm layer) never leave the node: not in a
reply, not in any frame the transport carries; they are kept in the node home and restored
the next round, whatever a request sends under their names. Fine-tuning after federation
keeps the tuned model on the node."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from fedcore import Experiment, simulate  # noqa: E402
from fedcore.aggregators._local import LocalState  # noqa: E402
from fedcore.data import ArrayDataset  # noqa: E402
from fedcore.errors import ConfigurationError  # noqa: E402
from fedcore.node.executor import run_round  # noqa: E402
from fedcore.params import ParameterSet  # noqa: E402
from fedcore.plan.personal import FINE_TUNED, STATE, LocalParameters  # noqa: E402
from fedcore.wire.messages import TrainRequest  # noqa: E402
from fedcore_torch import TorchTrainingPlan  # noqa: E402
from fedcore_transport.inprocess import InProcessTransport  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.norm = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.body(x)
        return self.head(F.relu(self.norm(h) if len(h) > 1 or not self.training else h))


class SharedPlan(TorchTrainingPlan):
    def init_model(self):
        torch.set_num_threads(1)
        return Net()

    def training_step(self, data, target):
        return F.cross_entropy(self.model(data), target)


class PersonalPlan(SharedPlan):
    local_parameters = ("head.*", "norm.*")


class TypoPlan(SharedPlan):
    local_parameters = ("haed.*",)


class AllLocalPlan(SharedPlan):
    local_parameters = ("*",)


LOCAL = ["norm.weight", "norm.bias", "norm.running_mean", "norm.running_var",
         "norm.num_batches_tracked", "head.weight", "head.bias"]
ARGS = {"epochs": 2, "batch_size": 8, "lr": 0.1}


def _arrays(n: int = 180):
    rng = np.random.default_rng(0)
    y = np.arange(n) % 3
    return (rng.normal(size=(n, 8)) + y[:, None] * 0.7).astype(np.float32), y


@pytest.fixture
def frames(monkeypatch):
    """Every frame the in-process transport carries, in either direction."""
    seen: list[bytes] = []
    send, send_parts = InProcessTransport.send, InProcessTransport.send_parts

    async def recording(self, peer, frame):
        seen.append(bytes(frame))
        await send(self, peer, frame)

    async def recording_parts(self, peer, parts):  # how the core sends every frame
        seen.append(b"".join(parts))
        await send_parts(self, peer, parts)

    monkeypatch.setattr(InProcessTransport, "send", recording)
    monkeypatch.setattr(InProcessTransport, "send_parts", recording_parts)
    return seen


def _state(node, exp, round):
    (entry,) = node.datasets.list()
    return LocalState(node.home / "algorithms", exp.id, entry["id"], round)


@pytest.mark.parametrize("isolation", ["none", "process"])
def test_local_parameters_stay_on_each_node_and_come_back_next_round(frames, isolation):
    """In the node's thread and in its plan worker process (as deployed nodes run plans)."""
    X, y = _arrays()
    with simulate.from_arrays(X, y, n_nodes=3, tags=["p"], scheme="dirichlet",
                              alpha=0.5) as fed:
        for node in fed.nodes:
            node.set_policy(plan_isolation=isolation)
        exp = Experiment(PersonalPlan, tags=["p"], federation=fed.url, training_args=ARGS,
                         progress=False)
        exp.run_once()
        after_one = exp.parameters.copy()
        exp.run_once()
        assert list(exp.parameters) == ["body.weight", "body.bias"]
        kept = {}
        for node in fed.nodes:
            first = _state(node, exp, 2).load(STATE)
            second = _state(node, exp, 3).load(STATE)
            assert first is not None and second is not None
            assert list(first["params"]) == list(second["params"]) == LOCAL
            assert not np.array_equal(first["params"]["head.weight"],
                                      second["params"]["head.weight"])  # trained on
            kept[node.node_id] = second["params"]
            # Round 2 started from the head and statistics this node kept in round 1.
            plan = PersonalPlan({}, ARGS, exp._data_info())
            plan.build(seed=0)
            start = LocalParameters(PersonalPlan, _state(node, exp, 2)).start(plan,
                                                                                after_one)
            assert ParameterSet((n, start[n]) for n in LOCAL).equal(first["params"])
            assert start["body.weight"].tobytes() == after_one["body.weight"].tobytes()
        assert {n.plan_isolation for n in fed.nodes} == {isolation}
        exp.close()
    heads = [p["head.weight"] for p in kept.values()]
    assert not np.array_equal(heads[0], heads[1])  # each node has its own
    blob = b"".join(frames)
    # A positive control: the shared model does travel, so the search would find arrays.
    assert after_one["body.weight"].tobytes() in blob
    for params in kept.values():
        for name, array in params.items():
            if array.nbytes >= 16:
                assert array.tobytes() not in blob, f"{name} left the node"
    for name in LOCAL:
        assert name.encode() not in blob


def test_a_request_cannot_set_or_fetch_the_local_parameters(tmp_path):
    """Values sent under local names are ignored; the reply never has those names."""
    X, y = _arrays(60)
    data = ArrayDataset(X, y)
    info = dict(data.metadata())
    plan = PersonalPlan({}, ARGS, info)
    plan.build(seed=0)
    full = plan.get_parameters().copy()
    state = LocalState(tmp_path, "exp", "ds", 1)
    request = TrainRequest(plan={}, params=full, dataset_id="ds", training_args=ARGS,
                           data_info=info, test_ratio=0.2)
    reply, _ = run_round(PersonalPlan, request, data, "n1", 1, {}, None, state)
    assert list(reply.params) == ["body.weight", "body.bias"]
    saved = state.load(STATE)
    assert saved is None  # nothing before round 1
    kept = LocalState(tmp_path, "exp", "ds", 2).load(STATE)
    assert kept is not None
    # A crafted round 2 sends zeros under the local names: the node starts from its own.
    zeros = ParameterSet((n, np.zeros_like(a)) for n, a in full.items())
    crafted = TrainRequest(plan={}, params=zeros, dataset_id="ds", training_args=ARGS,
                           data_info=info, test_ratio=0.2)
    fresh = PersonalPlan({}, ARGS, info)
    fresh.build(seed=0)
    start = LocalParameters(PersonalPlan, LocalState(tmp_path, "exp", "ds", 2)).start(
        fresh, zeros)
    assert ParameterSet((n, start[n]) for n in LOCAL).equal(kept["params"])
    reply, _ = run_round(PersonalPlan, crafted, data, "n1", 2, {}, None,
                         LocalState(tmp_path, "exp", "ds", 2))
    assert list(reply.params) == ["body.weight", "body.bias"]


def test_a_pattern_that_matches_nothing_or_everything_is_refused():
    X, y = _arrays(60)
    with simulate.from_arrays(X, y, n_nodes=2, tags=["p"]) as fed:
        for plan, message in [(TypoPlan, r"\['haed\.\*'\] match no parameter"),
                              (AllLocalPlan, "match every parameter")]:
            exp = Experiment(plan, tags=["p"], federation=fed.url, training_args=ARGS,
                             progress=False)
            with pytest.raises(ConfigurationError, match=message):
                exp.run_once()
            exp.close()


def test_fine_tuning_after_federation_keeps_the_tuned_model_on_the_node(frames):
    X, y = _arrays()
    with simulate.from_arrays(X, y, n_nodes=3, tags=["p"], scheme="dirichlet",
                              alpha=0.3) as fed:
        exp = Experiment(SharedPlan, tags=["p"], federation=fed.url, training_args=ARGS,
                         progress=False)
        with pytest.raises(ConfigurationError, match="Run at least one round"):
            exp.fine_tune(epochs=1)
        exp.run(2)
        before, history = exp.parameters.copy(), len(exp.history)
        del frames[:]
        tuned = exp.fine_tune(epochs=3)
        assert exp.parameters.equal(before) and exp.round == 2
        assert len(exp.history) == history
        assert sorted(tuned["node"]) == sorted(n.node_id for n in fed.nodes)
        assert (tuned["status"] == "ok").all() and (tuned["fine_tune_epochs"] == 3).all()
        assert tuned["local_accuracy"].notna().all() and tuned["global_accuracy"].notna().all()
        blob = b"".join(frames)
        for node in fed.nodes:
            kept = _state(node, exp, 4).load(FINE_TUNED)
            assert kept is not None and list(kept["params"]) == list(before)
            assert not kept["params"].equal(before)
            assert kept["params"]["head.weight"].tobytes() not in blob
            assert kept["params"]["body.weight"].tobytes() not in blob
        with pytest.raises(ConfigurationError, match="epochs >= 1"):
            exp.fine_tune(epochs=0)
        assert set(exp.run_once()["status"]) == {"ok"}  # federation goes on afterwards
        assert exp.round == 3
        exp.close()


def test_fedprox_works_with_local_parameters_and_scaffold_is_refused_early():
    X, y = _arrays(90)
    with simulate.from_arrays(X, y, n_nodes=2, tags=["p"]) as fed:
        with pytest.raises(ConfigurationError, match="SCAFFOLD's control variates cover"):
            Experiment(PersonalPlan, tags=["p"], federation=fed.url, training_args=ARGS,
                       aggregator="scaffold", progress=False)
        exp = Experiment(PersonalPlan, tags=["p"], federation=fed.url, training_args=ARGS,
                         aggregator="fedprox", progress=False)
        assert set(exp.run_once()["status"]) == {"ok"}
        assert list(exp.parameters) == ["body.weight", "body.bias"]
        exp.close()


def test_under_update_dp_the_node_keeps_its_local_parameters_unnoised(tmp_path):
    """The noise covers what leaves; what stays is the model the node trained."""
    X, y = _arrays(60)
    data = ArrayDataset(X, y)
    info = dict(data.metadata())
    plan = PersonalPlan({}, ARGS, info)
    plan.build(seed=0)
    from fedcore.plan.personal import shared

    sent = shared(PersonalPlan, plan.get_parameters()).copy()
    kept = {}
    for name, privacy in [("clear", {}), ("dp", {"mechanism": "update", "clip": 1.0,
                                                 "noise_multiplier": 1.0, "delta": 1e-5})]:
        request = TrainRequest(plan={}, params=sent, dataset_id="ds", training_args=ARGS,
                               data_info=info, test_ratio=0.2, privacy=privacy)
        reply, _ = run_round(PersonalPlan, request, data, "n1", 1, {}, None,
                             LocalState(tmp_path / name, "exp", "ds", 1))
        assert list(reply.params) == ["body.weight", "body.bias"]
        kept[name] = LocalState(tmp_path / name, "exp", "ds", 2).load(STATE)["params"]
    assert kept["dp"].equal(kept["clear"])
