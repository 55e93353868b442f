"""training_args are a typed contract: checked once, against what the plan declares."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

from sklearn.linear_model import SGDClassifier  # noqa: E402

from fedcore import Experiment, simulate  # noqa: E402
from fedcore.data import ArrayDataset  # noqa: E402
from fedcore.errors import ConfigurationError  # noqa: E402
from fedcore.governance import Request, build_governance  # noqa: E402
from fedcore.governance.policies import effective_policy  # noqa: E402
from fedcore.plan import LocalLoop, LocalTraining, PlanBundle, check_training_args  # noqa: E402
from fedcore.privacy import PrivacySpec  # noqa: E402
from fedcore.wire.messages import ErrorReply, TrainReply, TrainRequest  # noqa: E402
from fedcore_sklearn import SklearnTrainingPlan  # noqa: E402
from tests._support.raw import talk  # noqa: E402

KNOWN = "Expected one of: batch_size, epochs, lr, num_updates, use_gpu."


class SGDPlan(SklearnTrainingPlan):
    estimator = SGDClassifier


class TunedPlan(SklearnTrainingPlan):
    """Declares its own training argument: the step size of a constant schedule."""

    training_keys = {"eta0": float}
    training_defaults = {"eta0": 0.01}

    def init_model(self):
        return SGDClassifier(loss="log_loss", learning_rate="constant",
                             eta0=self.training.extra["eta0"])


def _data(n=60):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, 3))
    return X, (X[:, 0] > 0).astype(int)


def test_a_misspelt_key_is_refused_when_the_experiment_is_built():
    X, y = _data()
    with simulate.from_arrays(X, y, n_nodes=1, tags=["t"]) as fed:
        with pytest.raises(ConfigurationError) as info:
            Experiment(SGDPlan, tags=["t"], federation=fed.url, training_args={"epoch": 2})
        message = str(info.value)
        assert "Unknown training argument 'epoch' for SGDPlan. Did you mean 'epochs'?" in message
        assert KNOWN in message and "Received: {'epoch': 2}" in message
        exp = Experiment(SGDPlan, tags=["t"], federation=fed.url, training_args={"epochs": 1},
                         progress=False)
        with pytest.raises(ConfigurationError, match="Did you mean 'batch_size'"):
            exp.training_args = {"batchsize": 8}  # between rounds too
        assert exp.training_args == {"epochs": 1}  # and the old ones stay
        exp.close()


def test_a_node_answers_a_misspelt_key_with_a_configuration_error_and_keeps_serving():
    """What a researcher who bypasses the Experiment's check (another client) sees."""
    X, y = _data()
    with simulate.from_arrays(X, y, n_nodes=1, tags=["t"]) as fed:
        (node,) = fed.nodes
        (entry,) = node.datasets.list()
        info = {**ArrayDataset(X, y).metadata(), "categories": {"target": [0, 1]}}
        plan = SGDPlan({"loss": "log_loss"}, {}, info)
        plan.build(seed=0)

        def train(training_args):
            return TrainRequest(plan=PlanBundle.from_class(SGDPlan).to_wire(),
                                params=plan.get_parameters(), dataset_id=entry["id"],
                                model_args={"loss": "log_loss"}, data_info=info,
                                training_args=training_args)

        bad, ok = talk(fed.url, node.node_id, [train({"epoch": 2}), train({"epochs": 2})])
        refused = [e for e in node.audit_log() if e["event"] == "train-refused"]
    assert isinstance(bad, ErrorReply) and bad.kind == "configuration", bad
    assert "Did you mean 'epochs'?" in bad.message and KNOWN in bad.message
    assert isinstance(ok, TrainReply) and ok.train_stats["epochs"] == 2
    assert len(refused) == 1 and "'epoch'" in refused[0]["reason"]


def test_a_key_the_plan_declares_is_accepted_and_read_typed():
    X, y = _data()
    with simulate.from_arrays(X, y, n_nodes=2, tags=["t"]) as fed:
        exp = Experiment(TunedPlan, tags=["t"], federation=fed.url, progress=False,
                         training_args={"epochs": 1, "eta0": 1})
        assert exp.run_once()["status"].tolist() == ["ok", "ok"]
        trained = exp.trained_plan()
        assert trained.model.eta0 == 1.0 and isinstance(trained.training.extra["eta0"], float)
        exp.close()
    # Undeclared, the same key is refused; a declared key is listed among the known ones.
    with pytest.raises(ConfigurationError, match="Unknown training argument 'eta0'"):
        check_training_args(SGDPlan, {"eta0": 1.0})
    with pytest.raises(ConfigurationError, match="eta0, lr, num_updates"):
        check_training_args(TunedPlan, {"eta": 1.0})
    assert check_training_args(TunedPlan, {}).extra["eta0"] == 0.01  # its default


def test_values_are_type_checked_with_what_was_expected_and_received():
    cases = [({"epochs": "3"}, "training_args['epochs'] must be a whole number >= 1. "
                               "Received: '3' (of type str)"),
             ({"batch_size": 0}, "'batch_size'] must be a whole number >= 1"),
             ({"num_updates": 2.5}, "'num_updates'] must be a whole number >= 1"),
             ({"lr": -0.1}, "'lr'] must be a finite number >= 0"),
             ({"use_gpu": "yes"}, "'use_gpu'] must be True or False"),
             ({"eta0": "fast"}, "'eta0'] must be of type float. Received: 'fast'")]
    for args, message in cases:
        with pytest.raises(ConfigurationError) as info:
            check_training_args(TunedPlan, args)
        assert message in str(info.value)
    t = check_training_args(SGDPlan, {"epochs": 2.0, "batch_size": np.int64(8)})
    assert (t.epochs, t.batch_size, t.lr, t.use_gpu, t.num_updates) == (2, 8, 0.01, True, None)
    assert check_training_args(SGDPlan, {}).batch_size is None  # sklearn: the whole dataset


class ListPlan(SklearnTrainingPlan):
    training_keys = {"layers": object}


def test_checking_the_same_arguments_again_gives_the_same_answer():
    # A node checks the same arguments every round (the answer is kept): values that
    # compare equal but differ in type still parse apart, and an error is raised every time.
    assert check_training_args(SGDPlan, {"epochs": 1}).epochs == 1
    for _ in range(2):
        with pytest.raises(ConfigurationError, match="'epochs'] must be a whole number"):
            check_training_args(SGDPlan, {"epochs": True})
    assert check_training_args(TunedPlan, {"eta0": 1}).extra["eta0"] == 1.0
    assert check_training_args(TunedPlan, {"eta0": 1.0}) == \
        check_training_args(TunedPlan, {"eta0": 1})
    # A value that may change (a list) is never kept: each check reads the one it is given.
    for _ in range(2):
        layers = [8, 4]
        assert check_training_args(ListPlan, {"layers": layers}).extra["layers"] is layers


def test_the_wire_carries_the_plain_mapping_the_researcher_gave():
    given = {"epochs": 3, "batch_size": 16, "eta0": 0.5}
    training = check_training_args(TunedPlan, given)
    assert training.to_dict() == given
    assert check_training_args(TunedPlan, training.to_dict()) == training


def test_node_policies_read_the_typed_values():
    policy = effective_policy({"approval_required": False, "max_epochs": 3})
    governance = build_governance(policy, plans=None)
    decision = governance.review(Request(kind="train", training_args={"epochs": 4.0}))
    assert decision.overrides == {"epochs": 3}
    assert "epochs 4 clamped to this node's maximum 3" in decision.reason


def test_the_privacy_accountant_reads_the_typed_values():
    spec = PrivacySpec.parse({"mechanism": "dp-sgd", "noise_multiplier": 1.2, "clip": 1.0})
    training = LocalTraining.parse({"epochs": 3, "batch_size": 32, "num_updates": 5})
    # ceil(100 / 32) = 4 batches an epoch, 12 steps, capped at num_updates.
    assert spec.events(n_train=100, training_args=training) == [(1.2, 0.25, 5)]
    with pytest.raises(ConfigurationError, match="'epochs'] must be a whole number"):
        spec.events(n_train=100, training_args={"epochs": "3"})


def test_the_shared_loop_stops_at_num_updates_without_drawing_another_batch():
    drawn, reports = [], []

    def batches():
        for i in range(4):
            drawn.append(i)
            yield i

    loop = LocalLoop(LocalTraining.parse({"epochs": 3, "num_updates": 6}),
                     report=lambda **r: reports.append(r), batches_per_epoch=4)
    for _ in loop.epochs():
        for _batch in loop.batches(batches()):
            loop.step(10, loss=1.0)
    assert drawn == [0, 1, 2, 3, 0, 1] and loop.steps == 6 and loop.epoch == 2
    assert reports[-1] == {"step": 6, "epoch": 2, "samples": 60, "loss": 1.0,
                           "fraction": 1.0}
    assert loop.stats(loop.mean_loss) == {"loss": 1.0, "steps": 6, "epochs": 3}


class _DeviceLoss:
    """A loss that stays on a device: reading it (``float``) waits for the device."""

    reads = 0

    def __init__(self, value: float):
        self.value = value

    def __float__(self) -> float:
        _DeviceLoss.reads += 1
        return self.value


def test_the_shared_loop_reads_the_loss_only_for_a_report_due_and_the_round_mean():
    reports: list[dict] = []
    _DeviceLoss.reads = 0
    loop = LocalLoop(LocalTraining.parse({"epochs": 1}), report=lambda **r: reports.append(r),
                     batches_per_epoch=4, report_every_s=3600.0)
    for _ in loop.epochs():
        for i in loop.batches(range(4)):
            loop.step(10, loss=_DeviceLoss(0.1 * (i + 1)))
    assert reports == [] and _DeviceLoss.reads == 0  # no report due yet: nothing read
    stats = loop.stats(loop.mean_loss)
    mean = sum(0.1 * (i + 1) * 10 for i in range(4)) / 40  # summed in step order
    assert _DeviceLoss.reads == 4 and stats["loss"] == mean
    # The interval held every report back: the last step is reported at the end.
    assert reports == [{"step": 4, "epoch": 1, "samples": 40, "loss": mean, "fraction": 1.0}]
