"""Under DP only what the noise covers leaves a node: attacks by a signed researcher.

A trusted researcher sends hand-made training requests asking for update-level DP and
reads what comes back: SCAFFOLD's control-variate correction, integer buffers, metrics,
training statistics. It compares them with the same round asked in the clear (training is
deterministic for a fixed seed), which shows what each field would have leaked.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dp_accounting = pytest.importorskip("dp_accounting")

from fedcore import Experiment, plugins, simulate  # noqa: E402
from fedcore.aggregators._local import LocalAlgorithm, LocalState  # noqa: E402
from fedcore.aggregators.fedavg import FedAvg  # noqa: E402
from fedcore.data import ArrayDataset  # noqa: E402
from fedcore.errors import ConfigurationError  # noqa: E402
from fedcore.node.executor import run_round  # noqa: E402
from fedcore.params import ParameterSet  # noqa: E402
from fedcore.plan import PlanBundle  # noqa: E402
from fedcore.privacy import DEFAULT_ORDERS  # noqa: E402
from fedcore.wire.identity import Identity, full_fingerprint  # noqa: E402
from fedcore.wire.messages import ErrorReply, TrainReply, TrainRequest  # noqa: E402
from tests._support.attack import Attacker, serve  # noqa: E402
from tests._support.torch_plans import BatchNormMLP  # noqa: E402

N, TEST_RATIO, BATCH, LR = 64, 0.25, 16, 0.1
K = math.ceil(N * (1 - TEST_RATIO) / BATCH)  # local steps: 48 training samples, batches of 16
CLIP, Z = 50.0, 0.02  # an update of norm ~1 is never clipped: released - clean is the noise
PRIVACY = {"mechanism": "update", "clip": CLIP, "noise_multiplier": Z, "delta": 1e-5}
ARGS = {"epochs": 1, "batch_size": BATCH, "lr": LR, "use_gpu": False}


@pytest.fixture
def cohort():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, 4)).astype(np.float32)
    return X, (X[:, 0] + X[:, 1] > 0).astype(np.int64)


def _initial() -> ParameterSet:
    plan = BatchNormMLP({}, ARGS, {})
    plan.build(seed=0)
    return ParameterSet(plan.get_parameters()).copy()


def _train(dataset_id: str, params: ParameterSet, **fields) -> TrainRequest:
    zeros = {k: np.zeros(v.shape, np.float32) for k, v in params.items()}
    return TrainRequest(plan=PlanBundle.from_class(BatchNormMLP).to_wire(), params=params,
                        dataset_id=dataset_id, training_args=ARGS, test_ratio=TEST_RATIO,
                        seed=7, algorithm={"name": "scaffold", "c": zeros}, **fields)


def _float(params, keys):
    return np.concatenate([np.asarray(params[k], np.float64).ravel() for k in keys])


def test_under_update_dp_the_reply_reveals_only_the_noised_model(tmp_path, cohort):
    """The attacker asks the same SCAFFOLD round twice: in the clear (experiment "clear")
    and under update-level DP (experiment "dp"). In the clear, SCAFFOLD's correction gives
    back the local model exactly, the BatchNorm counter moved and metrics come back. Under
    DP the correction inverts to the *noised* model, the counter is the global one, the
    metrics, losses and training statistics are withheld, and what was added is noise of
    standard deviation noise_multiplier x 2 x clip (the replace-one sensitivity)."""
    url, node = serve(tmp_path / "site", "site", approval_required=False)
    entry = node.datasets.add_arrays("cohort", ["cohort"], *cohort)
    x = _initial()
    try:
        with Attacker(url, {"site": node.identity.public_bytes}) as attacker:
            clear = attacker.ask("site", _train(entry["id"], x), experiment="clear").body
            private = attacker.ask("site", _train(entry["id"], x, privacy=PRIVACY),
                                   experiment="dp").body
    finally:
        node.stop()
    assert isinstance(clear, TrainReply) and isinstance(private, TrainReply), private
    trained = [k for k, v in x.items() if np.any(clear.extras["delta_c"][k])]  # by SGD

    def inverted(reply):  # c_i = c = 0 at first: delta_c = (x - y) / (K lr)
        return {k: x[k] - np.asarray(reply.extras["delta_c"][k], np.float64) * K * LR
                for k in trained}

    # the attack works in the clear: the correction is the clean local model
    for k in trained:
        np.testing.assert_allclose(inverted(clear)[k], clear.params[k], atol=1e-4)
    # under DP it inverts to what was released, not to the clean model
    for k in trained:
        np.testing.assert_allclose(inverted(private)[k], private.params[k], atol=1e-3)
    away = _float(inverted(private), trained) - _float(clear.params, trained)
    assert np.abs(away).mean() > 1.0  # noise of std 2: nowhere near the clean model

    # the int64 counter: trained in the clear, the global value under DP
    assert int(clear.params["1.num_batches_tracked"]) == K
    assert int(private.params["1.num_batches_tracked"]) == int(x["1.num_batches_tracked"])

    # the noise: every float value, buffers included, moved by N(0, (Z * 2 * CLIP)^2)
    floats = [k for k, v in x.items() if v.dtype.kind == "f"]
    noise = _float(private.params, floats) - _float(clear.params, floats)
    assert noise.size > 600
    assert noise.std() == pytest.approx(Z * 2 * CLIP, rel=0.1) and abs(noise.mean()) < 0.3

    # loss, metrics and training statistics: there in the clear, withheld under DP
    assert clear.metrics_global and clear.metrics_local and "loss" in clear.train_stats
    assert private.metrics_global == {} and private.metrics_local == {}
    assert private.train_stats == {} and set(private.timings) == {"total_s"}
    assert private.privacy["withheld"] == ["metrics_global", "metrics_local", "train_stats",
                                           "progress_loss"]
    assert private.privacy["relation"] == "replace-one"
    assert private.privacy["sensitivity"] == 2 * CLIP

    # the epsilon reported is dp-accounting's for the noise measured over the sensitivity
    measured = noise.std() / private.privacy["sensitivity"]
    assert measured == pytest.approx(Z, rel=0.1)
    rdp = dp_accounting.rdp.RdpAccountant(orders=list(DEFAULT_ORDERS))
    rdp.compose(dp_accounting.GaussianDpEvent(Z))
    assert private.privacy["epsilon"] == pytest.approx(rdp.get_epsilon(1e-5), rel=1e-6)


def test_progress_under_dp_carries_no_loss(cohort):
    """The node's progress messages are built from what the plan reports: under DP the
    loss is dropped before it reaches them (steps and epochs stay)."""
    reports: list[dict] = []
    dataset = ArrayDataset(*cohort)
    request = _train("d", _initial(), privacy=PRIVACY)
    request = dataclasses.replace(request, algorithm={})
    run_round(BatchNormMLP, request, dataset, "site", 1,
              {"progress": lambda **fields: reports.append(fields)})
    assert reports and all(r["loss"] is None for r in reports)
    assert reports[-1]["step"] == K
    clear = dataclasses.replace(request, privacy={})
    reports.clear()
    run_round(BatchNormMLP, clear, dataset, "site", 1,
              {"progress": lambda **fields: reports.append(fields)})
    assert any(r["loss"] is not None for r in reports)  # what DP withholds


class _LeakyLocal(LocalAlgorithm):
    """A node side that returns the clean trained weights as extras."""

    title = "Leaky"

    def after_fit(self, plan, global_params, state):  # noqa: D102
        return {"weights": ParameterSet(plan.get_parameters()).copy()}


class _Leaky(FedAvg):
    name = "leaky"
    local_algorithm = _LeakyLocal

    def round_options(self):  # noqa: D102
        return {"name": self.name}


def test_an_algorithm_whose_extras_dp_does_not_cover_is_refused_under_dp(tmp_path, cohort):
    """An installed aggregator whose node side returns values from training (not declared
    as computed from the release) is refused under DP before training, audited under the
    name the node trusts the signing key as (alice, though the envelope claims bob); the
    same node trains it in the clear and keeps serving."""
    key = tmp_path / "alice.key"
    url, node = serve(tmp_path / "site", "site", trusted={"alice": key},
                      approval_required=False)
    entry = node.datasets.add_arrays("cohort", ["cohort"], *cohort)
    request = dataclasses.replace(_train(entry["id"], _initial()), algorithm={"name": "leaky"})
    try:
        with plugins.registered("aggregators", "leaky", _Leaky), \
                Attacker(url, {"site": node.identity.public_bytes}, key=key) as attacker:
            refused = attacker.ask("site", dataclasses.replace(request, privacy=PRIVACY),
                                   sender="bob").body
            clear = attacker.ask("site", request, sender="bob").body
    finally:
        node.stop()
    assert isinstance(refused, ErrorReply)
    assert "Leaky returns values computed from local training" in refused.message
    assert "private_extras" in refused.message
    assert isinstance(clear, TrainReply) and "weights" in clear.extras
    (failed,) = [r for r in node.audit_log() if r["event"] == "train-failed"]
    assert "Leaky returns values" in failed["error"]
    assert failed["researcher"] == "alice"
    assert failed["researcher_key"] == full_fingerprint(Identity(key).public_bytes)


def test_scaffold_state_on_the_node_follows_the_release(tmp_path, cohort):
    """The node's own control variate c_i is computed from the released model too, so the
    next round's correction stays a function of what the researcher already saw."""
    dataset = ArrayDataset(*cohort)
    x = _initial()
    request = _train("d", x, privacy=PRIVACY)
    reply, _ = run_round(BatchNormMLP, request, dataset, "site", 1, {}, None,
                         LocalState(tmp_path, "e", "d", 1))
    saved = LocalState(tmp_path, "e", "d", 2).load("scaffold")["c_i"]
    for k, d in reply.extras["delta_c"].items():
        np.testing.assert_array_equal(saved[k], d)  # c_i was 0: c_i+ is the delta sent


def test_the_researcher_sees_that_metrics_were_withheld(cohort):
    """An experiment under update-level DP: the history has no metric columns but says
    what was withheld, and asking for a curve explains why there is none."""
    with simulate.from_arrays(*cohort, n_nodes=2, tags=["c"], seed=0) as fed:
        exp = Experiment(BatchNormMLP, tags=["c"], federation=fed.url, progress=False,
                         training_args=ARGS, test_ratio=0.25,
                         privacy={"mechanism": "update", "clip": 1.0, "noise_multiplier": 1.0})
        exp.run(1)
        history = exp.history
    assert set(history["status"]) == {"ok"}
    assert not [c for c in history if c.startswith(("global_", "local_", "train_"))
                and not c.endswith("_s")]
    assert set(history["privacy_withheld"]) == {
        "metrics_global, metrics_local, train_stats, progress_loss"}
    with pytest.raises(ConfigurationError, match="withheld their metrics"):
        exp.plot("accuracy")
