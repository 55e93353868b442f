"""Differential privacy in running experiments: central DP checkpoints, node refusals."""

from __future__ import annotations

import pytest

pytest.importorskip("dp_accounting")
pytest.importorskip("sklearn")

from sklearn.linear_model import SGDClassifier  # noqa: E402

from fedcore import Experiment, simulate  # noqa: E402
from fedcore.errors import RoundError  # noqa: E402
from fedcore.privacy import CentralDP  # noqa: E402
from fedcore_sklearn import SklearnTrainingPlan  # noqa: E402


class Plan(SklearnTrainingPlan):
    estimator = SGDClassifier


def test_central_dp_survives_a_checkpoint_and_its_epsilon_grows(breast_cancer, tmp_path):
    Xtr, _, ytr, _ = breast_cancer
    with simulate.from_arrays(Xtr[:240], ytr[:240], n_nodes=3, tags=["dp"]) as fed:
        exp = Experiment(Plan, tags=["dp"], federation=fed.url,
                         model_args={"loss": "log_loss"}, training_args={"epochs": 1},
                         aggregator=CentralDP(clip=1.0, noise_multiplier=1.0, seed=0),
                         round_limit=3, progress=False)
        exp.run(2)
        after_two = exp.aggregator.epsilon
        exp.save(tmp_path / "exp.fedcore")
        exp.close()
        resumed = Experiment.load(tmp_path / "exp.fedcore", progress=False)
        agg = resumed.aggregator
        assert isinstance(agg, CentralDP) and agg.get_params()["noise_multiplier"] == 1.0
        assert agg.epsilon == after_two > 0
        assert [r["round"] for r in agg.rounds_] == [1, 2]
        resumed.run()
        assert resumed.round == 3
        assert agg.epsilon > after_two  # the third round was composed on top
        resumed.close()


def test_an_experiment_without_dp_is_refused_by_a_node_that_requires_it(breast_cancer):
    Xtr, _, ytr, _ = breast_cancer
    with simulate.from_arrays(Xtr[:100], ytr[:100], n_nodes=1, tags=["dp"]) as fed:
        fed.nodes[0].set_policy(dp_max_epsilon=5.0)
        exp = Experiment(Plan, tags=["dp"], federation=fed.url, progress=False,
                         model_args={"loss": "log_loss"}, training_args={"epochs": 1})
        with pytest.raises(RoundError, match="trains only with differential privacy"):
            exp.run_once()
        exp.close()
