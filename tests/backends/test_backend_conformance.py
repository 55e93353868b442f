"""The backend conformance suite (fedcore.testing.backend) over sklearn, torch, TF and JAX.

One module for all four, so TensorFlow and JAX are imported by one test process only. A
backend whose framework is not installed is skipped as a whole (pytest.importorskip); its
known gaps are expected failures with a reason.
"""

from __future__ import annotations

import importlib.util

import pytest

from fedcore.testing.backend import FAILURE, BackendConformance, check_signature_parity

HAVE = {name: importlib.util.find_spec(module) is not None for name, module in
        [("sklearn", "sklearn"), ("torch", "torch"), ("tf", "tensorflow"), ("jax", "jax")]}


def _needs(backend: str):
    return pytest.mark.skipif(not HAVE[backend], reason=f"{backend} is not installed")


# --- scikit-learn -----------------------------------------------------------------------------

if HAVE["sklearn"]:
    from sklearn.linear_model import SGDClassifier

    from fedcore_sklearn import SklearnTrainingPlan

    class SkPlan(SklearnTrainingPlan):
        estimator = SGDClassifier

    class FailingSkPlan(SkPlan):
        def training_data(self, dataset):
            raise RuntimeError(FAILURE)


@_needs("sklearn")
class TestSklearnBackend(BackendConformance):
    plan_class = SkPlan if HAVE["sklearn"] else None  # type: ignore[assignment]
    failing_plan_class = FailingSkPlan if HAVE["sklearn"] else None  # type: ignore[assignment]
    model_args = {"loss": "log_loss"}


# --- torch ------------------------------------------------------------------------------------

if HAVE["torch"]:
    import torch
    from torch import nn
    from torch.nn import functional as F

    from fedcore_torch import TorchTrainingPlan

    class TorchPlan(TorchTrainingPlan):
        def init_model(self):
            return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

        def training_step(self, data, target):
            return F.cross_entropy(self.model(data), target)

    class TorchBNPlan(TorchPlan):
        """FedBN: the batch-norm layer (index 1) stays on each node, statistics included."""

        local_parameters = ("1.*",)

        def init_model(self):
            return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                 nn.Linear(16, 3))

    class FailingTorchPlan(TorchPlan):
        def training_step(self, data, target):
            raise RuntimeError(FAILURE)


@_needs("torch")
class TestTorchBackend(BackendConformance):
    plan_class = TorchPlan if HAVE["torch"] else None  # type: ignore[assignment]
    failing_plan_class = FailingTorchPlan if HAVE["torch"] else None  # type: ignore[assignment]

    @pytest.fixture(autouse=True)
    def one_thread(self):
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(before)


# --- TensorFlow / Keras -----------------------------------------------------------------------

if HAVE["tf"]:
    import tensorflow as tf

    from fedcore_tf import KerasTrainingPlan

    class KerasPlan(KerasTrainingPlan):
        def init_model(self):
            return tf.keras.Sequential([tf.keras.Input((8,)),
                                        tf.keras.layers.Dense(16, activation="relu"),
                                        tf.keras.layers.Dense(3)])

    class KerasBNPlan(KerasTrainingPlan):
        """FedBN: the batch-norm layer (index 1) stays on each node, statistics included."""

        local_parameters = ("1.*",)

        def init_model(self):
            return tf.keras.Sequential([tf.keras.Input((8,)),
                                        tf.keras.layers.Dense(16, activation="relu"),
                                        tf.keras.layers.BatchNormalization(),
                                        tf.keras.layers.Dense(3)])

    class FailingKerasPlan(KerasPlan):
        def training_step(self, data, target):
            raise RuntimeError(FAILURE)


@_needs("tf")
class TestKerasBackend(BackendConformance):
    plan_class = KerasPlan if HAVE["tf"] else None  # type: ignore[assignment]
    failing_plan_class = FailingKerasPlan if HAVE["tf"] else None  # type: ignore[assignment]


# --- JAX --------------------------------------------------------------------------------------

if HAVE["jax"]:
    from fedcore_jax import JaxTrainingPlan, mlp

    class JaxPlan(JaxTrainingPlan):
        def init_model(self):
            return mlp([8, 16, 3], self.key)

    class FailingJaxPlan(JaxPlan):
        def training_step(self, params, data, target):
            raise RuntimeError(FAILURE)


@_needs("jax")
class TestJaxBackend(BackendConformance):
    plan_class = JaxPlan if HAVE["jax"] else None  # type: ignore[assignment]
    failing_plan_class = FailingJaxPlan if HAVE["jax"] else None  # type: ignore[assignment]


# --- FedBN: batch-norm statistics stay local -------------------------------------------------

FEDBN = {"torch": ("TorchBNPlan", ["1.weight", "1.bias", "1.running_mean", "1.running_var",
                                   "1.num_batches_tracked"], "1.running_mean"),
         "tf": ("KerasBNPlan", ["1.gamma", "1.beta", "1.moving_mean", "1.moving_variance"],
                "1.moving_mean")}


@pytest.mark.parametrize("backend", sorted(FEDBN))
def test_fedbn_keeps_the_batch_norm_statistics_on_the_node(backend, tmp_path):
    """JAX plans are pure functions with no batch statistics: FedPer covers them (above)."""
    if not HAVE[backend]:
        pytest.skip(f"{backend} is not installed")
    import numpy as np

    from fedcore.aggregators._local import LocalState
    from fedcore.data import ArrayDataset
    from fedcore.node.executor import run_round
    from fedcore.plan.personal import STATE, shared
    from fedcore.wire.messages import TrainRequest

    name, local, stats = FEDBN[backend]
    plan_class = globals()[name]
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    data = ArrayDataset(rng.normal(size=(60, 8)) * 3 + 5 + y[:, None], y)
    info = dict(data.metadata())
    plan = plan_class({}, {"epochs": 1, "batch_size": 8, "lr": 0.05}, info)
    plan.build(seed=0)
    initial = plan.get_parameters().copy()
    sent = shared(plan_class, initial)
    assert [n for n in initial if n not in sent] == local
    for rnd in (1, 2):
        request = TrainRequest(plan={}, params=sent, dataset_id="d", data_info=info,
                               training_args={"epochs": 1, "batch_size": 8, "lr": 0.05},
                               test_ratio=0.25)
        reply, _ = run_round(plan_class, request, data, "node", rnd, {}, None,
                             LocalState(tmp_path, "e", "d", rnd))
        assert list(reply.params) == list(sent)
        sent = reply.params
    kept = LocalState(tmp_path, "e", "d", 3).load(STATE)
    assert kept is not None and list(kept["params"]) == local
    # The running statistics moved towards this node's data and stayed here.
    assert not np.allclose(kept["params"][stats], initial[stats])


# --- signature parity ---------------------------------------------------------------------

#: The hooks the backends document, beyond TrainingPlan's own API.
HOOKS = ["init_model", "init_optimizer", "training_step", "testing_step"]

#: Deliberate differences, with the reason.
DELIBERATE = {
    ("sklearn", "init_optimizer"): "a scikit-learn estimator owns its solver",
    ("sklearn", "training_step"): "partial_fit trains; scikit-learn exposes no loss",
    ("sklearn", "testing_step"): "the estimator's predict() evaluates",
    ("jax", "training_step"): "JAX is functional: the loss takes the params pytree, "
                              "(params, data, target)",
}


def test_every_backend_offers_the_same_public_methods_and_signatures():
    from fedcore.plugins import load

    classes = {}
    for backend in ["sklearn", "torch", "tf", "jax"]:
        if not HAVE[backend]:
            pytest.skip(f"{backend} is not installed: the parity test needs all four")
        classes[backend] = load("backends", backend)
    problems = check_signature_parity(classes, HOOKS, DELIBERATE)
    assert not problems, "\n".join(problems)
