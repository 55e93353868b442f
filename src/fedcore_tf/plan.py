"""KerasTrainingPlan: federated training of a Keras model on the TensorFlow backend."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from fedcore.data import Dataset
from fedcore.errors import ConfigurationError
from fedcore.params import ParameterSet
from fedcore.plan import TrainingPlan, batch_indices, collect_predictions
from fedcore_tf import convert
from fedcore_tf.privacy import KerasPrivateTraining

keras = tf.keras


class KerasTrainingPlan(TrainingPlan):
    """A plan around a Keras model (Keras 3, or Keras 2 with ``TF_USE_LEGACY_KERAS=1``).

    Override:

    - :meth:`init_model` (required): build the ``keras.Model`` from ``self.model_args``
      (give it an input shape, e.g. ``keras.Input((64,))``, so its weights exist);
    - :meth:`init_optimizer`: default ``training_args["optimizer"]`` (a Keras optimizer
      name, ``"sgd"``) with learning rate ``training_args["lr"]`` (0.01);
    - :meth:`init_loss`: default ``training_args["loss"]`` (a Keras loss name), else
      sparse categorical cross-entropy on logits (classification) or mean squared error;
    - :meth:`training_step`: ``(data, target) -> loss`` of one batch (default: the loss
      of the model's output);
    - :meth:`testing_step`: ``(data, target) -> (y_true, y_pred)``;
    - :meth:`training_data`: default ``(X, y)`` arrays, shuffled and batched by the plan;
      may return a ``tf.data.Dataset`` of ``(x, y)`` batches, used as it is each epoch.

    training_args (:class:`~fedcore.plan.LocalTraining`): ``epochs`` (1), ``batch_size``
    (32), ``lr`` (0.01), ``num_updates`` (stop after this many steps), ``optimizer``
    (``"sgd"``), ``loss`` (a Keras loss name or config), ``test_batch_size`` (1024).

    Training runs a ``tf.function`` step (``GradientTape``; traced once per plan), with
    ``keras.utils.set_random_seed`` and TensorFlow's op determinism, so a seed reproduces
    a round exactly. FedProx and SCAFFOLD add ``mu * (w - w_global)`` and the correction to
    each trained weight's gradient before ``apply_gradients``. DP-SGD (``privacy``
    mechanism ``"dp-sgd"``) is run by the node's installed
    :class:`~fedcore_tf.privacy.KerasPrivateTraining` through tensorflow-privacy's
    ``DPKerasSGDOptimizer`` (it needs ``TF_USE_LEGACY_KERAS=1``), around the plan's model,
    :meth:`init_loss` and :meth:`training_data`; a plan that overrides :meth:`fit` or
    :meth:`get_parameters` is refused DP-SGD.
    """

    backend = "tf"
    supports = frozenset({"proximal", "gradient_correction"})
    #: DP-SGD through tensorflow-privacy, run by the node around the plan (not by fit).
    private_training = KerasPrivateTraining
    #: The weights (trainable or not) are the whole state of a standard model.
    reusable = True
    training_keys = {"optimizer": (str, dict), "loss": (str, dict), "test_batch_size": int}
    training_defaults = {"optimizer": "sgd", "test_batch_size": 1024}
    model: Any

    def init_model(self) -> Any:
        """Build the Keras model."""
        raise ConfigurationError(f"{type(self).__name__} must define init_model().")

    def init_optimizer(self) -> Any:
        """Build the optimizer for local training."""
        cls = type(keras.optimizers.get(self.training.extra["optimizer"]))
        return cls(learning_rate=self.training.lr)

    def init_loss(self) -> Any:
        """The loss function ``(y_true, y_pred) -> loss``."""
        name = self.training.extra.get("loss")
        if name is not None:
            return keras.losses.get(name)
        if self.task == "classification":
            return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        return keras.losses.MeanSquaredError()

    def training_step(self, data: Any, target: Any) -> Any:
        """The loss of one batch (runs inside a ``tf.function``)."""
        output = self.model(data, training=True)
        return tf.reduce_mean(self.loss(target, output))

    def testing_step(self, data: Any, target: Any) -> tuple[Any, Any]:
        """``(y_true, y_pred)`` of one batch."""
        output = self.model(data, training=False)
        if self.task == "classification":
            output = tf.argmax(output, axis=1)
        return target, output

    # --- TrainingPlan -----------------------------------------------------------------------

    def build(self, seed: int) -> None:
        keras.utils.set_random_seed(seed)
        tf.config.experimental.enable_op_determinism()
        model = self.init_model()
        if not isinstance(model, keras.Model):
            raise ConfigurationError(
                f"init_model() must return a keras.Model. Received: {type(model).__name__}")
        if not model.built or not model.weights:
            raise ConfigurationError(
                "The Keras model has no weights yet: give it an input shape "
                "(keras.Input((n_features,)) first in a Sequential).")
        self.model = model
        self.loss = self.init_loss()
        self._named = convert.named_weights(model)
        self._optimizer: Any = None
        self._fresh: list[Any] = []
        self._steps: dict[tuple[bool, bool], Callable[..., Any]] = {}

    def get_parameters(self) -> ParameterSet:
        return convert.get_parameters(self.model)

    def set_parameters(self, params: ParameterSet) -> None:
        convert.set_parameters(self.model, params)

    def training_data(self, dataset: Dataset) -> Any:
        """``(X, y)`` with float32 features; labels as int64 class indices (or float32)."""
        return self._labelled_arrays(dataset, np.int64)

    def _batches(self, data: Any, batch_size: int, rng: np.random.Generator | None
                 ) -> Iterator[tuple[Any, Any]]:
        if isinstance(data, tf.data.Dataset):
            yield from data
            return
        X, y = data
        for idx in batch_indices(len(X), batch_size, rng):
            yield tf.convert_to_tensor(X[idx]), tf.convert_to_tensor(y[idx])

    def _trained(self) -> list[tuple[str, Any]]:
        return [(n, w) for n, w in self._named if w.trainable]

    def _reset_optimizer(self) -> Any:
        """The plan's optimizer, back in its initial state (a fresh one every round)."""
        if self._optimizer is None:
            self._optimizer = self.init_optimizer()
            self._optimizer.build([w for _, w in self._trained()])
            self._fresh = [v.numpy() for v in self._optimizer.variables]
        else:
            for v, value in zip(self._optimizer.variables, self._fresh, strict=True):
                v.assign(value)
        return self._optimizer

    def _step(self, proximal: bool, correction: bool) -> Callable[..., Any]:
        key = (proximal, correction)
        if key in self._steps:
            return self._steps[key]
        optimizer = self._optimizer
        weights = [w for _, w in self._trained()]

        def step(X: Any, y: Any, mu: Any, anchor: list[Any], corr: list[Any]) -> Any:
            with tf.GradientTape() as tape:
                loss = self.training_step(X, y)
            grads = tape.gradient(loss, weights)
            grads = [tf.zeros_like(w) if g is None else g for g, w in zip(grads, weights,
                                                                         strict=True)]
            if proximal:
                grads = [g + mu * (w - a) for g, w, a in zip(grads, weights, anchor,
                                                             strict=True)]
            if correction:
                grads = [g + c for g, c in zip(grads, corr, strict=True)]
            optimizer.apply_gradients(zip(grads, weights, strict=True))
            return loss

        self._steps[key] = tf.function(step, reduce_retracing=True)
        return self._steps[key]

    def _tensors(self, params: ParameterSet, what: str) -> list[Any]:
        out = []
        for name, w in self._trained():
            if name not in params:
                raise ConfigurationError(
                    f"{what} has no parameter {name!r}. Received: {list(params)[:8]}")
            out.append(tf.convert_to_tensor(np.asarray(params[name],
                                                       dtype=convert.numpy_dtype(w))))
        return out

    def fit(self, dataset: Dataset, seed: int) -> dict[str, Any]:
        data = self.training_data(dataset)
        batch_size = self.training.batch_size or 32
        keras.utils.set_random_seed(seed)
        rng = np.random.default_rng(seed)
        optimizer = self._reset_optimizer()
        mu, anchor = self.proximal if self.proximal is not None else (0.0, None)
        proximal = bool(mu) and anchor is not None
        anchor_t = self._tensors(anchor, "The global model") if proximal and anchor else []
        corr_t = (self._tensors(self.gradient_correction, "SCAFFOLD's correction")
                  if self.gradient_correction is not None else [])
        step = self._step(proximal, bool(corr_t))
        mu_t = tf.constant(float(mu), dtype=tf.float32)
        losses = []
        loop = self.local_loop(-(-len(data[1]) // batch_size)
                               if isinstance(data, (tuple, list)) else None)
        for _ in loop.epochs():
            for X, y in loop.batches(self._batches(data, batch_size, rng)):
                losses.append((step(X, y, mu_t, anchor_t, corr_t), int(tf.shape(y)[0])))
                # No loss here: reading it would wait for the device at every step.
                loop.step(losses[-1][1])
        total = sum(float(loss) * n for loss, n in losses)
        lr = float(np.asarray(optimizer.learning_rate))
        self.local_steps = loop.local_steps({n: lr for n, _ in self._trained()})
        return loop.stats(total / max(loop.samples, 1))

    def predict(self, dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
        data = self.training_data(dataset)
        batch_size = int(self.training.extra["test_batch_size"])
        return collect_predictions(self.testing_step(X, y)
                                   for X, y in self._batches(data, batch_size, None))
