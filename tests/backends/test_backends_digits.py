"""Acceptance: the same federated task reaches each framework's own centralized accuracy.

sklearn digits, 5 IID nodes (fedcore.simulate.from_arrays), a 64-32-10 MLP in every
framework, FedAvg. Each framework's centralized model trains on the pooled data with its own
idiomatic loop for as many epochs as each node trained in all (rounds x local epochs); the
federated model must come within 2 accuracy points of it.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

pytest.importorskip("sklearn")

from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from fedcore import Experiment, simulate  # noqa: E402
from fedcore.data import ArrayDataset  # noqa: E402

pytestmark = pytest.mark.slow

HAVE = {m: importlib.util.find_spec(m) is not None for m in ("torch", "tensorflow", "jax")}

# The plans: at module level (plans ship as source). The same 64-32-10 MLP everywhere.
from sklearn.neural_network import MLPClassifier  # noqa: E402

from fedcore_sklearn import SklearnTrainingPlan  # noqa: E402


class SklearnDigits(SklearnTrainingPlan):
    estimator = MLPClassifier


if HAVE["torch"]:
    import torch

    from fedcore_torch import TorchTrainingPlan

    class TorchDigits(TorchTrainingPlan):
        def init_model(self):
            return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                       torch.nn.Linear(32, 10))

        def training_step(self, data, target):
            return torch.nn.functional.cross_entropy(self.model(data), target)

if HAVE["tensorflow"]:
    import tensorflow as tf

    from fedcore_tf import KerasTrainingPlan

    class KerasDigits(KerasTrainingPlan):
        def init_model(self):
            return tf.keras.Sequential([tf.keras.Input((64,)),
                                        tf.keras.layers.Dense(32, activation="relu"),
                                        tf.keras.layers.Dense(10)])

if HAVE["jax"]:
    from fedcore_jax import JaxTrainingPlan, mlp

    class JaxDigits(JaxTrainingPlan):
        def init_model(self):
            return mlp([64, 32, 10], self.key)

ROUNDS, EPOCHS, BATCH, LR = 10, 4, 32, 0.3


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return train_test_split((X / 16.0).astype(np.float32), y, test_size=0.25, random_state=0,
                            stratify=y)


def _federated(plan_class, digits, training_args, model_args=None):
    Xtr, Xte, ytr, yte = digits
    with simulate.from_arrays(Xtr, ytr, n_nodes=5, tags=["digits"]) as fed:
        exp = Experiment(plan_class, tags=["digits"], federation=fed.url, progress=False,
                         model_args=model_args or {}, training_args=training_args,
                         round_limit=ROUNDS, test_ratio=0.0, evaluate_global=False,
                         evaluate_local=False)
        exp.run()
        assert set(exp.history["status"]) == {"ok"}
        y_true, y_pred = exp.trained_plan().predict(ArrayDataset(Xte, yte))
    return float(np.mean(y_true == y_pred))


# --- torch -------------------------------------------------------------------------------------

def test_torch(digits):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    federated = _federated(TorchDigits, digits, {"epochs": EPOCHS, "batch_size": BATCH,
                                                  "lr": LR})
    Xtr, Xte, ytr, yte = digits
    torch.manual_seed(0)
    model = TorchDigits().init_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    X, y = torch.as_tensor(Xtr), torch.as_tensor(ytr)
    for _ in range(ROUNDS * EPOCHS):
        order = torch.randperm(len(X))
        for start in range(0, len(X), BATCH):
            idx = order[start:start + BATCH]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            optimizer.step()
    with torch.no_grad():
        central = float((model(torch.as_tensor(Xte)).argmax(1).numpy() == yte).mean())
    assert central > 0.9
    assert abs(federated - central) <= 0.02, (federated, central)


def test_keras(digits):
    tf = pytest.importorskip("tensorflow")
    federated = _federated(KerasDigits, digits, {"epochs": EPOCHS, "batch_size": BATCH,
                                                  "lr": LR})
    Xtr, Xte, ytr, yte = digits
    tf.keras.utils.set_random_seed(0)
    model = KerasDigits().init_model()
    model.compile(optimizer=tf.keras.optimizers.SGD(LR),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(Xtr, ytr, batch_size=BATCH, epochs=ROUNDS * EPOCHS, shuffle=True, verbose=0)
    central = float((model.predict(Xte, verbose=0).argmax(1) == yte).mean())
    assert central > 0.9
    assert abs(federated - central) <= 0.02, (federated, central)


def test_jax(digits):
    jax = pytest.importorskip("jax")
    import optax

    federated = _federated(JaxDigits, digits, {"epochs": EPOCHS, "batch_size": BATCH,
                                                "lr": LR})
    Xtr, Xte, ytr, yte = digits
    apply_fn, params = mlp([64, 32, 10], jax.random.PRNGKey(0))
    tx = optax.sgd(LR)
    state = tx.init(params)

    @jax.jit
    def step(params, state, X, y):
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, X), y).mean()
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(0)
    for _ in range(ROUNDS * EPOCHS):
        order = rng.permutation(len(Xtr))
        for start in range(0, len(Xtr), BATCH):
            idx = order[start:start + BATCH]
            params, state = step(params, state, Xtr[idx], ytr[idx].astype(np.int32))
    central = float((np.asarray(apply_fn(params, Xte)).argmax(1) == yte).mean())
    assert central > 0.9
    assert abs(federated - central) <= 0.02, (federated, central)


def test_sklearn_mlp(digits):
    model_args = {"hidden_layer_sizes": [32], "learning_rate_init": 0.01, "batch_size": BATCH}
    federated = _federated(SklearnDigits, digits, {"epochs": EPOCHS, "batch_size": 10**6},
                           model_args)
    Xtr, Xte, ytr, yte = digits
    model = MLPClassifier(hidden_layer_sizes=(32,), learning_rate_init=0.01,
                          batch_size=BATCH, max_iter=ROUNDS * EPOCHS, random_state=0,
                          n_iter_no_change=10**6, tol=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "max_iter reached": the epoch budget is the point
        model.fit(Xtr, ytr)
    central = float(model.score(Xte, yte))
    assert central > 0.9
    assert abs(federated - central) <= 0.02, (federated, central)
