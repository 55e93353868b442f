"""FedProx and SCAFFOLD: the researcher's aggregators and the node side of local training."""

from __future__ import annotations

import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from sklearn.datasets import load_digits  # noqa: E402
from sklearn.linear_model import SGDClassifier  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.naive_bayes import GaussianNB  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from fedcore import Experiment, simulate  # noqa: E402
from fedcore.aggregators._local import LocalState  # noqa: E402
from fedcore.aggregators.fedprox import FedProx  # noqa: E402
from fedcore.aggregators.scaffold import Scaffold  # noqa: E402
from fedcore.data import ArrayDataset  # noqa: E402
from fedcore.errors import ConfigurationError  # noqa: E402
from fedcore.node import Node  # noqa: E402
from fedcore.node.executor import run_round  # noqa: E402
from fedcore.params import ParameterSet  # noqa: E402
from fedcore.plan import PlanBundle  # noqa: E402
from fedcore.wire import codec  # noqa: E402
from fedcore.wire.messages import ErrorReply, Ping, Pong, TrainReply, TrainRequest  # noqa: E402
from fedcore_sklearn import SklearnTrainingPlan  # noqa: E402
from fedcore_torch import TorchTrainingPlan  # noqa: E402
from tests._support.raw import talk  # noqa: E402


class MLP(TorchTrainingPlan):
    def init_model(self):
        torch.set_num_threads(1)  # small model: one thread is faster and reproducible
        hidden = int(self.model_args.get("hidden", 32))
        return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def training_step(self, data, target):
        return F.cross_entropy(self.model(data), target)


class FlatLossMLP(MLP):
    """A loss with zero gradient: whatever moves the weights is FedProx or SCAFFOLD."""

    def training_step(self, data, target):
        return (self.model(data) * 0.0).sum()


class SGDPlan(SklearnTrainingPlan):
    estimator = SGDClassifier


class NaiveBayesPlan(SklearnTrainingPlan):
    estimator = GaussianNB


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return train_test_split(X / 16.0, y, test_size=0.3, random_state=0, stratify=y)


def _info(ds):
    return {**ds.metadata(), "categories": {"target": list(range(10))}}


def _distance(a, b):
    return float(np.sqrt(sum(np.sum((np.asarray(a[k], np.float64) - b[k]) ** 2) for k in a)))


def _run(plan, fed, aggregator, rounds, **kwargs):
    exp = Experiment(plan, tags=["digits"], federation=fed.url, aggregator=aggregator,
                     progress=False, round_limit=rounds, test_ratio=0.0,
                     evaluate_global=False, evaluate_local=False, **kwargs)
    exp.run()
    exp.close()
    return exp


# --- the three against each other -----------------------------------------------------------

# Settings where client drift hurts FedAvg, identical for the three runs: 10 hospitals whose
# labels follow Dirichlet(0.1) (each sees 3 to 7 of the ten digits, in very unequal numbers),
# 5 local epochs of plain SGD at lr 0.1 with batches of 32 (15 to 30 steps per node and round:
# enough for a node's model to unlearn the digits it does not see), a 64-256-10 MLP, and 10
# rounds, so the drift shows in the final accuracy instead of being averaged away over many
# more rounds. Same split, seeds, rounds and local epochs for all three. Measured on other
# Dirichlet draws (partition seeds 1-3) SCAFFOLD gained 2.8 to 7.2 points over FedAvg here.
ROUNDS = 10
DRIFT_ARGS = {"training_args": {"epochs": 5, "lr": 0.1, "batch_size": 32},
              "model_args": {"hidden": 256}}


def _accuracy(exp, X, y):
    model = exp.trained_plan().model
    model.eval()
    with torch.no_grad():
        predicted = model(torch.as_tensor(X, dtype=torch.float32)).argmax(1).numpy()
    return float((predicted == y).mean())


@pytest.mark.slow
def test_scaffold_and_fedprox_against_fedavg_on_label_skewed_digits(digits):
    Xtr, Xte, ytr, yte = digits  # Xte, yte: a centralized test set no node holds
    accuracy = {}
    with simulate.from_arrays(Xtr, ytr, n_nodes=10, tags=["digits"], scheme="dirichlet",
                              alpha=0.1, seed=0) as fed:
        for name, aggregator in [("FedAvg", "fedavg"), ("FedProx(mu=0.01)", FedProx(0.01)),
                                 ("SCAFFOLD", Scaffold())]:
            exp = _run(MLP, fed, aggregator, ROUNDS, seed=0, **DRIFT_ARGS)
            assert set(exp.history["status"]) == {"ok"}
            accuracy[name] = _accuracy(exp, Xte, yte)
    scores = ", ".join(f"{k} {v:.4f}" for k, v in accuracy.items())
    report = f"test accuracy after {ROUNDS} rounds: {scores}"
    assert accuracy["SCAFFOLD"] > accuracy["FedAvg"] + 0.02, report
    # FedProx does not beat FedAvg on this task at any mu we tried (0.001 to 0.3, with 5 to
    # 50 local epochs and lr 0.05 to 0.3): small mu ties, larger mu loses, as label-skew
    # benchmarks have found before. What holds is that its default mu costs nothing.
    assert accuracy["FedProx(mu=0.01)"] > accuracy["FedAvg"] - 0.01, report


# Where FedProx does help: systems heterogeneity, i.e. sites doing very unequal amounts of
# local work. The researcher asks for 20 epochs at lr 0.3, but 8 of the 10 nodes cap local
# training at one epoch (`node.set_policy(max_epochs=1)`: the node applies the cap and
# reports it as an override); only node-01 and node-06 train all 20. Those two run far more
# local steps than the rest, so each round they travel much further toward their own local
# optima (on the few digits they hold) and pull FedAvg's average with them; the proximal
# term limits how far they go. Same Dirichlet(0.1) label skew, model and training seed as
# above, over four partition seeds. FedProx does not win on every split: on partition seed
# 2 it lost (0.848 against FedAvg's 0.859 when measured), so what is asserted is the mean
# gain over the four seeds, with every seed's accuracies in the message.
UNEQUAL_ROUNDS = 10
UNEQUAL_ARGS = {"training_args": {"epochs": 20, "lr": 0.3, "batch_size": 32},
                "model_args": {"hidden": 256}}
FULL_WORK_NODES = {"node-01", "node-06"}


@pytest.mark.slow
def test_fedprox_beats_fedavg_when_sites_do_unequal_local_work(digits):
    Xtr, Xte, ytr, yte = digits
    accuracy: dict[str, list[float]] = {"FedAvg": [], "FedProx(mu=0.1)": []}
    for partition_seed in range(4):
        with simulate.from_arrays(Xtr, ytr, n_nodes=10, tags=["digits"], scheme="dirichlet",
                                  alpha=0.1, seed=partition_seed) as fed:
            capped = {node.node_id for node in fed.nodes} - FULL_WORK_NODES
            for node in fed.nodes:
                if node.node_id in capped:
                    node.set_policy(max_epochs=1)
            for name, aggregator in [("FedAvg", "fedavg"), ("FedProx(mu=0.1)", FedProx(0.1))]:
                exp = _run(MLP, fed, aggregator, UNEQUAL_ROUNDS, seed=0, **UNEQUAL_ARGS)
                history = exp.history
                assert set(history["status"]) == {"ok"}
                assert set(history.loc[history["overrides"].notna(), "node"]) == capped
                accuracy[name].append(_accuracy(exp, Xte, yte))
    mean = {name: float(np.mean(values)) for name, values in accuracy.items()}
    report = f"test accuracy after {UNEQUAL_ROUNDS} rounds, partition seeds 0-3: " + "; ".join(
        f"{name} {' '.join(f'{a:.4f}' for a in values)} (mean {mean[name]:.4f})"
        for name, values in accuracy.items())
    assert mean["FedProx(mu=0.1)"] >= mean["FedAvg"] + 0.01, report


# --- FedProx --------------------------------------------------------------------------------


def test_fedprox_with_mu_zero_is_fedavg_bit_for_bit(digits):
    Xtr, _, ytr, _ = digits
    args = {"training_args": {"epochs": 2, "lr": 0.1, "batch_size": 32}}
    with simulate.from_arrays(Xtr[:400], ytr[:400], n_nodes=3, tags=["digits"]) as fed:
        avg = _run(MLP, fed, "fedavg", 2, **args)
        prox0 = _run(MLP, fed, FedProx(mu=0.0), 2, **args)
        prox = _run(MLP, fed, FedProx(mu=0.5), 2, **args)
    assert prox0.parameters.equal(avg.parameters)
    assert not prox.parameters.allclose(avg.parameters)  # the term does something
    assert FedProx(0.5).round_options() == {"name": "fedprox", "mu": 0.5}


@pytest.mark.parametrize("plan_class", [MLP, SGDPlan], ids=["torch", "sklearn"])
def test_the_proximal_term_pulls_local_training_toward_the_global_model(digits, plan_class):
    Xtr, _, ytr, _ = digits
    ds = ArrayDataset(Xtr[:300], ytr[:300])
    distances = {}
    for mu in (0.0, 0.1, 1.0):
        plan = plan_class({}, {"epochs": 2, "lr": 0.1, "batch_size": 50}, _info(ds))
        plan.build(seed=0)
        start = plan.get_parameters().copy()
        plan.proximal = (mu, start)
        plan.fit(ds, seed=1)
        distances[mu] = _distance(plan.get_parameters(), start)
    assert distances[0.0] > distances[0.1] > distances[1.0] > 0, distances


def test_sklearn_fedprox_refuses_an_estimator_without_a_learning_rate(digits):
    Xtr, _, ytr, _ = digits
    ds = ArrayDataset(Xtr[:100], ytr[:100])
    plan = NaiveBayesPlan({}, {}, _info(ds))
    plan.build(seed=0)
    plan.proximal = (0.1, plan.get_parameters().copy())
    with pytest.raises(ConfigurationError, match="FedProx needs an SGD-type linear estimator"
                       r".*Received: GaussianNB"):
        plan.fit(ds, seed=0)


def test_fedprox_refuses_a_bad_mu():
    with pytest.raises(ConfigurationError, match="mu to be a finite number >= 0"):
        FedProx(mu=-1)


# --- SCAFFOLD, researcher side --------------------------------------------------------------


def test_scaffold_server_update_matches_the_paper():
    rng = np.random.default_rng(0)
    x = ParameterSet({"w": rng.normal(size=(3, 2)).astype(np.float32),
                      "b": rng.normal(size=2).astype(np.float32)})
    agg = Scaffold(server_lr=0.5, n_nodes=5)  # 3 of 5 nodes take part in each round
    c = {k: np.zeros(v.shape) for k, v in x.items()}
    for rnd in (1, 2):
        agg.start(x, rnd)
        np.testing.assert_array_equal(agg.round_options()["c"]["w"], c["w"].astype(np.float32))
        ys = [{k: v + rng.normal(size=v.shape) for k, v in x.items()} for _ in range(3)]
        dcs = [{k: rng.normal(size=v.shape) for k, v in x.items()} for _ in range(3)]
        weights = [10.0, 30.0, 60.0]
        for i in range(3):
            agg.add(ParameterSet({k: v.astype(np.float32) for k, v in ys[i].items()}),
                    weights[i], f"n{i}",
                    {"delta_c": ParameterSet({k: v.astype(np.float32)
                                              for k, v in dcs[i].items()})})
        out = agg.result()
        for k, xk in x.items():
            # x <- x + server_lr * weighted mean(y_i - x); c <- c + |S|/N * mean(delta_c_i)
            yk = [y[k].astype(np.float32).astype(np.float64) for y in ys]
            dk = [d[k].astype(np.float32).astype(np.float64) for d in dcs]
            step = sum(w * (y - xk) for w, y in zip(weights, yk, strict=True)) / sum(weights)
            np.testing.assert_allclose(out[k], xk + 0.5 * step, rtol=1e-5, atol=1e-6)
            c[k] = c[k] + 3 / 5 * np.mean(dk, axis=0)
            np.testing.assert_allclose(agg.control_variate[k], c[k], rtol=1e-5, atol=1e-6)
            assert out[k].dtype == np.float32
        x = out
    assert Scaffold.sum_only and Scaffold.name == "scaffold"


def test_scaffold_refuses_an_update_without_its_control_variate_delta():
    x = ParameterSet({"w": np.zeros(3, np.float32)})
    agg = Scaffold()
    agg.start(x, 1)
    with pytest.raises(ConfigurationError, match="sent no SCAFFOLD control-variate delta"):
        agg.add(x, 1.0, "old-node", {})
    with pytest.raises(ConfigurationError, match="before any update"):
        agg.result()


# --- SCAFFOLD, node side --------------------------------------------------------------------


def _request(plan_class, params, ds, algorithm, training_args):
    return TrainRequest(plan=PlanBundle.from_class(plan_class).to_wire(), params=params,
                        dataset_id="d", training_args=training_args, data_info=_info(ds),
                        algorithm=algorithm)


def test_the_node_corrects_each_step_and_updates_its_control_variate(tmp_path, digits):
    Xtr, _, ytr, _ = digits
    ds = ArrayDataset(Xtr[:100], ytr[:100])
    args = {"epochs": 2, "lr": 0.05, "batch_size": 25, "use_gpu": False}  # K = 8 steps
    plan = FlatLossMLP({}, args, _info(ds))
    plan.build(seed=0)
    w_g = plan.get_parameters().copy()
    rng = np.random.default_rng(0)
    c = ParameterSet({k: rng.normal(size=v.shape).astype(np.float32) for k, v in w_g.items()})
    state = LocalState(tmp_path, "exp", "d", 1)

    # With a flat loss, K plain SGD steps corrected by c - c_i (c_i = 0 at first) move the
    # weights by exactly -K * lr * c; the node's new c_i is then c_i - c + (w_g - w)/(K lr),
    # i.e. zero, so the delta sent back is zero too.
    reply, _ = run_round(FlatLossMLP, _request(FlatLossMLP, w_g, ds, {"name": "scaffold",
                                                                        "c": c}, args),
                         ds, "n", 1, {}, None, state)
    assert reply.train_stats["steps"] == 8
    for k in w_g:
        np.testing.assert_allclose(reply.params[k], w_g[k] - 8 * 0.05 * c[k], atol=1e-5)
        np.testing.assert_allclose(reply.extras["delta_c"][k], 0.0, atol=1e-4)

    # A real loss: c_i+ = c_i - c + (w_g - w_local) / (K lr), delta = c_i+ - c_i.
    state2 = LocalState(tmp_path, "exp", "d", 2)
    c_i = state2.load("scaffold")["c_i"]  # what round 1 kept, read by round 2
    reply2, _ = run_round(MLP, _request(MLP, w_g, ds, {"name": "scaffold", "c": c}, args),
                          ds, "n", 2, {}, None, state2)
    new = state2.load("scaffold")  # still the round-1 value: state2 reads earlier rounds
    np.testing.assert_array_equal(new["c_i"]["0.weight"], c_i["0.weight"])
    saved = LocalState(tmp_path, "exp", "d", 3).load("scaffold")["c_i"]
    for k in w_g:
        expected = c_i[k] - c[k] + (w_g[k] - reply2.params[k]) / (8 * 0.05)
        np.testing.assert_allclose(saved[k], expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(reply2.extras["delta_c"][k], saved[k] - c_i[k], atol=1e-6)


def test_node_state_keeps_the_last_rounds_for_replays(tmp_path, caplog):
    for rnd in range(1, 7):
        LocalState(tmp_path, "exp", "d", rnd).save("scaffold", {"c_i": ParameterSet(
            {"w": np.full(2, float(rnd))})})
    assert len(list(tmp_path.glob("*/scaffold.*.fedcore"))) == 4  # rounds 3 to 6
    # Round 5 replayed (the researcher resumed from round 4) reads what round 4 left.
    assert LocalState(tmp_path, "exp", "d", 5).load("scaffold")["c_i"]["w"][0] == 4.0
    assert LocalState(tmp_path, "exp", "d", 9).load("scaffold")["c_i"]["w"][0] == 6.0
    assert LocalState(tmp_path, "other-exp", "d", 9).load("scaffold") is None
    with caplog.at_level(logging.WARNING, "fedcore"):
        assert LocalState(tmp_path, "exp", "d", 2).load("scaffold") is None  # too old
    assert "starting afresh" in caplog.text


def _sim(Xtr, ytr, root=None, name=None):
    return simulate.from_arrays(Xtr, ytr, n_nodes=3, tags=["digits"], scheme="dirichlet",
                                alpha=0.5, seed=0, root=root, name=name)


SCAFFOLD_ARGS = {"training_args": {"epochs": 2, "lr": 0.1, "batch_size": 32},
                 "model_args": {"hidden": 16}}


def test_a_resumed_scaffold_run_continues_identically(tmp_path, digits):
    Xtr, _, ytr, _ = digits
    with _sim(Xtr[:450], ytr[:450]) as fed:
        exp = _run(MLP, fed, Scaffold(), 3, checkpoint_dir=tmp_path / "ckpt", **SCAFFOLD_ARGS)
        c2 = Experiment.load(tmp_path / "ckpt" / "round_0002.fedcore").aggregator
        assert isinstance(c2, Scaffold) and c2.control_variate is not None
        assert any(np.abs(v).max() > 0 for v in c2.control_variate.values())
        # The researcher resumes from round 2 (say its machine crashed before saving round 3,
        # which the nodes had trained): round 3 again gives the same model and the same c.
        resumed = Experiment.load(tmp_path / "ckpt" / "round_0002.fedcore",
                                  federation=fed.url, progress=False)
        assert resumed.aggregator.control_variate.equal(c2.control_variate)
        resumed.run_once()
        resumed.close()
    assert resumed.round == 3
    assert resumed.parameters.equal(exp.parameters)
    assert resumed.aggregator.control_variate.equal(exp.aggregator.control_variate)


def test_node_control_variates_survive_a_node_restart(tmp_path, digits):
    Xtr, _, ytr, _ = digits
    X, y = Xtr[:450], ytr[:450]
    with _sim(X, y, root=tmp_path / "a") as fed:  # never restarted: the reference
        reference = _run(MLP, fed, Scaffold(), 2, **SCAFFOLD_ARGS)

    fed = _sim(X, y, root=tmp_path / "b", name="restarted")
    with fed:
        exp = _run(MLP, fed, Scaffold(), 1, **SCAFFOLD_ARGS)
    files = sorted((tmp_path / "b").glob("node-*/algorithms/*/scaffold.000001.fedcore"))
    assert len(files) == 3  # one c_i per node, in its home
    assert all(codec.decode(f.read_bytes()).body.state["algorithm"] == "scaffold"
               for f in files)  # fedcore's codec, never pickle
    again = simulate.SimulatedFederation(name="restarted", root=tmp_path / "b")
    with again:
        for _ in range(3):
            again.add_node()  # the same homes: datasets and c_i are read back
        exp.run_once()
        exp.close()
    assert exp.parameters.equal(reference.parameters)


# --- refusals -------------------------------------------------------------------------------


def test_an_experiment_refuses_scaffold_with_a_plan_that_cannot_correct_gradients():
    expected = ("SCAFFOLD needs gradient_correction, which SGDPlan (backend 'sklearn') does "
                "not support. Use a torch plan, or FedAvg/FedProx.")
    with pytest.raises(ConfigurationError) as err:
        Experiment(SGDPlan, tags=["x"], federation="inproc://unused", aggregator="scaffold")
    assert str(err.value) == expected
    exp = Experiment(SGDPlan, tags=["x"], federation="inproc://unused",
                     aggregator=FedProx(0.1))
    with pytest.raises(ConfigurationError, match="SCAFFOLD needs gradient_correction"):
        exp.aggregator = Scaffold()
    assert isinstance(exp.aggregator, FedProx)  # unchanged
    torch_exp = Experiment(MLP, tags=["x"], federation="inproc://unused", aggregator="scaffold")
    with pytest.raises(ConfigurationError, match="which SGDPlan .* does not support"):
        torch_exp.plan = SGDPlan
    assert torch_exp.plan is MLP


def test_a_node_refuses_an_unknown_algorithm_and_keeps_serving(tmp_path, digits, caplog):
    Xtr, _, ytr, _ = digits
    node = Node(tmp_path / "home", node_id="hospital-a", approval_required=False)
    ds = ArrayDataset(Xtr[:60], ytr[:60])
    dataset_id = node.datasets.add_arrays("digits", ["digits"], ds.X, ds.y)["id"]
    plan = MLP({}, {}, _info(ds))
    plan.build(seed=0)
    sk = SGDPlan({}, {}, _info(ds))
    sk.build(seed=0)

    def train(plan_class, params, algorithm):
        return TrainRequest(plan=PlanBundle.from_class(plan_class).to_wire(), params=params,
                            dataset_id=dataset_id, data_info=_info(ds), algorithm=algorithm)

    url = "inproc://fedprox-scaffold-node"
    node.start(url)
    try:
        with caplog.at_level(logging.ERROR, "fedcore"):
            unknown, sklearn_scaffold, pong, ok = talk(url, "hospital-a", [
                train(MLP, plan.get_parameters(), {"name": "fedproxx", "mu": 0.1}),
                train(SGDPlan, sk.get_parameters(),
                      {"name": "scaffold", "c": sk.get_parameters()}),
                Ping(),
                train(MLP, plan.get_parameters(), {"name": "fedprox", "mu": 0.1}),
            ])
    finally:
        node.stop()
    assert isinstance(unknown, ErrorReply) and unknown.kind == "configuration"
    assert "No aggregator named 'fedproxx'. Did you mean 'fedprox'?" in unknown.message
    assert isinstance(sklearn_scaffold, ErrorReply)
    assert "SCAFFOLD needs gradient_correction, which SGDPlan" in sklearn_scaffold.message
    assert isinstance(pong, Pong)
    assert isinstance(ok, TrainReply) and ok.n_samples > 0
    assert any("fedproxx" in str(e.get("reason")) for e in node.audit_log())
