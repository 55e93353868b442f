"""SklearnTrainingPlan: federated training of estimators with ``partial_fit``."""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, is_classifier

from fedcore.data import Dataset
from fedcore.errors import ConfigurationError
from fedcore.params import ParameterSet
from fedcore.plan import TrainingPlan
from fedcore_sklearn import convert

_RESERVED = ("features", "target", "task")
_SCHEDULES = frozenset({"constant", "optimal", "invscaling", "adaptive"})


def _step_sizes(model: Any, t: float, n: int) -> np.ndarray:
    """The learning rates an SGD estimator used for its samples number t .. t + n - 1.

    The schedules of scikit-learn's ``_sgd_fast`` (partial_fit never lowers an adaptive
    rate, so it stays eta0). For ``optimal``, ``t0 = 1 / (typw * alpha)`` with
    ``typw = alpha ** -0.25``, the initial step scikit-learn derives for its losses.
    """
    steps = t + np.arange(n, dtype=np.float64)
    schedule = model.learning_rate
    if schedule == "optimal":
        alpha = float(model.alpha)
        t0 = 1.0 / (alpha ** -0.25 * alpha)
        return 1.0 / (alpha * (t0 + steps - 1.0))
    if schedule == "invscaling":
        return float(model.eta0) / np.power(steps, float(model.power_t))
    return np.full(n, float(model.eta0))


class SklearnTrainingPlan(TrainingPlan):
    """A plan around one scikit-learn estimator with ``partial_fit``.

    Set ``estimator`` to the class (model_args other than ``features``/``target``/``task``
    and the names listed in ``plan_args`` become its constructor arguments), or override
    :meth:`init_model`. A value the plan reads itself (a threshold, a notebook constant passed
    through model_args) is named in ``plan_args = {"threshold"}``, so the estimator does not
    receive it. Classes and the number of
    features come from the datasets' metadata, so no boilerplate is needed::

        class Plan(SklearnTrainingPlan):
            estimator = SGDClassifier

        Experiment(Plan, model_args={"loss": "log_loss", "target": "diagnosis"}, ...)

    training_args (:class:`~fedcore.plan.LocalTraining`): ``epochs`` (default 1),
    ``batch_size`` (default: the whole dataset per ``partial_fit`` call). The other common
    keys (``lr``, ``num_updates``, ``use_gpu``) are accepted and not used: the estimator's
    own ``model_args`` set its learning rate.

    FedProx works with the SGD family (``SGDClassifier``, ``SGDRegressor``, ``Perceptron``;
    learning rates ``constant``, ``optimal``, ``invscaling``, ``adaptive``): scikit-learn
    exposes no gradients, so after each ``partial_fit`` call the weights take the proximal
    step of the samples it saw, ``w <- w_g + (w - w_g) * prod_t 1 / (1 + eta_t * mu)``
    (``eta_t`` the estimator's learning rate at each sample). SCAFFOLD is not supported.
    """

    backend = "sklearn"
    supports = frozenset({"proximal"})
    estimator: ClassVar[type[BaseEstimator] | None] = None
    plan_args: ClassVar[frozenset[str] | set[str]] = frozenset()
    training_defaults = {"batch_size": None}

    model: Any = None

    def init_model(self) -> BaseEstimator:
        """Build the estimator; default: ``estimator(**model_args)``."""
        if self.estimator is None:
            raise ConfigurationError(
                f"{type(self).__name__} needs an estimator: set `estimator = SGDClassifier` "
                "(or another class with partial_fit), or override init_model()."
            )
        own = set(_RESERVED) | set(self.plan_args)
        kwargs = {k: v for k, v in self.model_args.items() if k not in own}
        accepted = inspect.signature(self.estimator).parameters
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ConfigurationError(
                f"{self.estimator.__name__} does not accept {unknown}. Accepted: "
                f"{sorted(accepted)}. If the plan reads {unknown[0]!r} itself, name it in "
                f"the plan: plan_args = {set(unknown)!r}."
            )
        return self.estimator(**kwargs)

    # --- TrainingPlan -----------------------------------------------------------------------

    @property
    def task(self) -> str:  # noqa: D102 - inherits the doc
        if "task" in self.model_args:
            return str(self.model_args["task"])
        return "classification" if is_classifier(self.model) else "regression"

    def build(self, seed: int) -> None:  # noqa: D102
        model = self.init_model()
        if not hasattr(model, "partial_fit"):
            raise ConfigurationError(
                f"{type(model).__name__} has no partial_fit, so it cannot be trained "
                "round after round. Use SGDClassifier, SGDRegressor, Perceptron, "
                "MLPClassifier, MLPRegressor, GaussianNB..."
            )
        if "random_state" in model.get_params() and model.get_params()["random_state"] is None:
            model.set_params(random_state=seed)
        self.model = model
        self._prime()

    def _prime(self) -> None:
        """Give the estimator its learned attributes without training on real data."""
        n_features = self._n_features()
        model = self.model
        rows = len(self.classes()) if is_classifier(model) else 1
        # MLPs warn when their batch_size exceeds the rows of a partial_fit call (and clip
        # it): these few priming rows are ours, so the warning would only be noise.
        batch_size = getattr(model, "batch_size", None)
        if isinstance(batch_size, int) and batch_size > rows:
            model.batch_size = rows
        try:
            if is_classifier(model):
                classes = np.asarray(self.classes())
                model.partial_fit(np.zeros((rows, n_features)), classes, classes=classes)
            else:
                model.partial_fit(np.zeros((1, n_features)), np.zeros(1))
        finally:
            if isinstance(batch_size, int):
                model.batch_size = batch_size
        fam = convert.family(model)[0]
        if fam == "linear":
            model.coef_ = np.zeros_like(model.coef_)
            model.intercept_ = np.zeros_like(model.intercept_)
        self._reset_optimizer()

    def _reset_optimizer(self) -> None:
        # Each round starts local training afresh, as FedAvg prescribes: drop the solver
        # state the priming step (or an earlier round) left behind.
        model = self.model
        if hasattr(model, "_optimizer"):
            del model._optimizer
        if hasattr(model, "t_"):
            model.t_ = 1.0 if not hasattr(model, "coefs_") else 0

    def _n_features(self) -> int:
        info = self.data_info
        if info.get("feature_shape") is not None and not self.model_args.get("features"):
            return int(math.prod(info["feature_shape"]))
        if self.model_args.get("features") is not None:
            return len(self.model_args["features"])
        columns = info.get("columns")
        if not columns:
            raise ConfigurationError(
                "No dataset metadata to size the model: run a search first (the Experiment "
                "does) or pass data_info."
            )
        return len(columns) - (1 if self.model_args.get("target") in columns else 0)

    def get_parameters(self) -> ParameterSet:  # noqa: D102
        return convert.get_parameters(self.model)

    def set_parameters(self, params: ParameterSet) -> None:  # noqa: D102
        convert.set_parameters(self.model, params)
        self._reset_optimizer()

    def training_data(self, dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
        """``(X, y)`` with ``X`` flattened to 2-D; override to transform features."""
        X, y = super().training_data(dataset)
        if y is None:
            raise ConfigurationError("Training needs a target: set model_args['target'].")
        # float64 throughout: the model is primed in float64, and sklearn's SGD refuses a
        # float64 model with float32 samples ("expected SequentialDataset64").
        return np.asarray(X, dtype=np.float64).reshape(len(X), -1), np.asarray(y)

    def fit(self, dataset: Dataset, seed: int) -> dict[str, Any]:  # noqa: D102
        X, y = self.training_data(dataset)
        epochs = self.training.epochs
        batch_size = self.training.batch_size or len(X) or 1
        rng = np.random.default_rng(seed)
        kwargs = {"classes": np.asarray(self.classes())} if is_classifier(self.model) else {}
        anchor = self._proximal_anchor()
        batches = 0
        planned = epochs * -(-len(X) // batch_size)
        for epoch in range(epochs):
            order = rng.permutation(len(X))
            for start in range(0, len(X), batch_size):
                idx = order[start : start + batch_size]
                t = float(getattr(self.model, "t_", 1.0))
                self.model.partial_fit(X[idx], y[idx], **kwargs)
                if anchor is not None:
                    self._proximal_step(anchor, t, len(idx))
                batches += 1
                loss = getattr(self.model, "loss_", None)  # MLPs keep their training loss
                self.report(step=batches, epoch=epoch + 1, samples=min(start + len(idx),
                            len(X)) + epoch * len(X), fraction=batches / planned,
                            loss=None if loss is None else float(loss))
        stats: dict[str, Any] = {"epochs": epochs, "batches": batches}
        if hasattr(self.model, "loss_") and self.model.loss_ is not None:
            stats["loss"] = float(self.model.loss_)
        return stats

    def _proximal_anchor(self) -> tuple[float, dict[str, np.ndarray]] | None:
        """``(mu, global weights)`` when FedProx is on, after checking the estimator."""
        if self.proximal is None or not self.proximal[0] > 0:
            return None
        mu, global_params = self.proximal
        model = self.model
        name = type(model).__name__
        if (convert.family(model)[0] != "linear" or not hasattr(model, "t_")
                or getattr(model, "learning_rate", None) not in _SCHEDULES):
            raise ConfigurationError(
                f"FedProx needs an SGD-type linear estimator whose learning rate is one of "
                f"{sorted(_SCHEDULES)} (SGDClassifier, SGDRegressor, Perceptron). Received: "
                f"{name} (learning_rate={getattr(model, 'learning_rate', None)!r}). Use "
                "FedAvg, or one of those estimators.")
        if getattr(model, "average", False):
            raise ConfigurationError(
                f"FedProx cannot pull an averaged SGD model toward the global one. Expected "
                f"{name}(average=False). Received: average={model.average!r}")
        return float(mu), {k: np.asarray(global_params[k], np.float64)
                           for k in ("coef_", "intercept_")}

    def _proximal_step(self, anchor: tuple[float, dict[str, np.ndarray]], t: float,
                       n: int) -> None:
        """Pull coef_ and intercept_ toward the global model for ``n`` samples from step t."""
        mu, global_weights = anchor
        factor = float(np.exp(-np.log1p(mu * _step_sizes(self.model, t, n)).sum()))
        for k, g in global_weights.items():
            w = getattr(self.model, k)
            setattr(self.model, k, (g + (w - g) * factor).astype(w.dtype, copy=False))

    def predict(self, dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:  # noqa: D102
        X, y = self.training_data(dataset)
        return y, self.model.predict(X)
