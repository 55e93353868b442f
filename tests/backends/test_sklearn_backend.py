from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

from sklearn.linear_model import Perceptron, SGDClassifier, SGDRegressor  # noqa: E402
from sklearn.neural_network import MLPClassifier, MLPRegressor  # noqa: E402

from fedcore import Experiment, simulate  # noqa: E402
from fedcore.errors import ConfigurationError  # noqa: E402
from fedcore_sklearn import SklearnTrainingPlan  # noqa: E402

ARRAY_INFO = {"kind": "array", "feature_shape": [4], "categories": {"target": [0, 1, 2]}}


class SGDPlan(SklearnTrainingPlan):
    estimator = SGDClassifier


class PerceptronPlan(SklearnTrainingPlan):
    estimator = Perceptron


class MLPCPlan(SklearnTrainingPlan):
    estimator = MLPClassifier


class SGDRPlan(SklearnTrainingPlan):
    estimator = SGDRegressor


class MLPRPlan(SklearnTrainingPlan):
    estimator = MLPRegressor


@pytest.mark.parametrize("plan_class, expected", [
    (SGDPlan, {"coef_": (3, 4), "intercept_": (3,)}),
    (PerceptronPlan, {"coef_": (3, 4), "intercept_": (3,)}),
    (MLPCPlan, {"coefs_.0": (4, 5), "coefs_.1": (5, 3), "intercepts_.0": (5,),
                "intercepts_.1": (3,)}),
    (SGDRPlan, {"coef_": (4,), "intercept_": (1,)}),
    (MLPRPlan, {"coefs_.0": (4, 5), "coefs_.1": (5, 1), "intercepts_.0": (5,),
                "intercepts_.1": (1,)}),
])
def test_models_are_sized_from_metadata_alone(plan_class, expected):
    model_args = {"hidden_layer_sizes": (5,)} if "MLP" in plan_class.__name__ else {}
    plan = plan_class(model_args, {}, ARRAY_INFO)
    plan.build(seed=0)
    params = plan.get_parameters()
    assert {k: v.shape for k, v in params.items()} == expected
    if "coef_" in params:  # linear models start from zero
        assert not params["coef_"].any() and not params["intercept_"].any()


@pytest.mark.parametrize("plan_class", [SGDPlan, PerceptronPlan, MLPCPlan])
def test_each_classifier_learns_in_a_federation(plan_class):
    rng = np.random.default_rng(0)
    centers = np.array([[3, 0, 0, 0], [0, 3, 0, 0], [0, 0, 3, 0]], dtype=float)
    y = rng.integers(0, 3, 600)
    X = centers[y] + rng.normal(size=(600, 4))
    model_args = ({"hidden_layer_sizes": (16,), "learning_rate_init": 0.01}
                  if plan_class is MLPCPlan else {})
    with simulate.from_arrays(X, y, n_nodes=3, tags=["blobs"]) as fed:
        exp = Experiment(plan_class, tags=["blobs"], federation=fed.url, progress=False,
                         model_args=model_args, training_args={"epochs": 2, "batch_size": 32})
        exp.run(3)
    assert exp.metrics()["accuracy"].iloc[-1] > 0.85


def test_round_trip_of_parameters_between_plans():
    a = MLPCPlan({"hidden_layer_sizes": (5,)}, {}, ARRAY_INFO)
    a.build(seed=1)
    b = MLPCPlan({"hidden_layer_sizes": (5,)}, {}, ARRAY_INFO)
    b.build(seed=2)
    assert not a.get_parameters().equal(b.get_parameters())
    b.set_parameters(a.get_parameters())
    assert a.get_parameters().equal(b.get_parameters())


def test_plan_errors_are_actionable():
    class Nothing(SklearnTrainingPlan):
        pass

    with pytest.raises(ConfigurationError, match="needs an estimator"):
        Nothing({}, {}, ARRAY_INFO).build(seed=0)
    with pytest.raises(ConfigurationError, match=r"does not accept \['colour'\]"):
        SGDPlan({"colour": "red"}, {}, ARRAY_INFO).build(seed=0)
    with pytest.raises(ConfigurationError, match=r"name it in the plan: plan_args"):
        SGDPlan({"colour": "red"}, {}, ARRAY_INFO).build(seed=0)
    with pytest.raises(ConfigurationError, match="lists no classes"):
        SGDPlan({}, {}, {"kind": "array", "feature_shape": [4], "categories": {}}).build(0)
    # A target that is no column of the datasets is named as such, with the columns there are.
    tabular = {"kind": "tabular", "columns": ["age", "sex", "label"],
               "categories": {"sex": ["f", "m"], "label": [0, 1]}}
    with pytest.raises(ConfigurationError,
                       match=r"no column 'diagnosis' to predict.*\['age', 'sex', 'label'\]"):
        SGDPlan({"target": "diagnosis"}, {}, tabular).build(seed=0)

    from sklearn.svm import SVC

    class NoPartialFit(SklearnTrainingPlan):
        estimator = SVC

    with pytest.raises(ConfigurationError, match="has no partial_fit"):
        NoPartialFit({}, {}, ARRAY_INFO).build(seed=0)


def test_a_key_the_plan_reads_itself_is_named_in_plan_args_and_not_given_to_the_estimator():
    class Thresholded(SGDPlan):
        plan_args = {"threshold"}

    plan = Thresholded({"threshold": 0.7, "alpha": 1e-3}, {}, ARRAY_INFO)
    plan.build(seed=0)
    assert plan.model.alpha == 1e-3 and plan.model_args["threshold"] == 0.7
