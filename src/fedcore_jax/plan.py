"""JaxTrainingPlan: federated training of a functional JAX model with optax."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedcore.data import Dataset
from fedcore.errors import ConfigurationError
from fedcore.params import ParameterSet
from fedcore.plan import TrainingPlan, batch_indices, collect_predictions
from fedcore_jax import convert


class JaxTrainingPlan(TrainingPlan):
    """A plan around a functional JAX model: ``apply_fn(params, x)`` and a params pytree.

    Override:

    - :meth:`init_model` (required): return ``(apply_fn, params)``; draw random
      initial values from ``self.key`` (a ``jax.random`` key derived from the seed).
      :func:`fedcore_jax.mlp` builds a ReLU MLP;
    - :meth:`init_optimizer`: an ``optax.GradientTransformation``; default
      ``optax.sgd(training_args["lr"])`` (0.01), or ``training_args["optimizer"]``
      naming any optax optimizer (``"adam"``...);
    - :meth:`training_step`: ``(params, data, target) -> loss``, pure and jit-compatible
      (it takes the parameters: JAX is functional); default cross-entropy on the
      logits for classification, mean squared error for regression;
    - :meth:`testing_step`: ``(data, target) -> (y_true, y_pred)``;
    - :meth:`training_data`: default ``(X, y)`` arrays (float32 features).

    training_args (:class:`~fedcore.plan.LocalTraining`): ``epochs`` (1), ``batch_size``
    (32), ``lr`` (0.01), ``num_updates`` (stop after this many steps), ``optimizer``
    (``"sgd"``: any optax optimizer's name), ``test_batch_size`` (1024).

    Parameters are named by their pytree paths (``layers/0/w``). Each batch runs one
    jitted step (compiled once per batch shape and plan). FedProx and SCAFFOLD add
    ``mu * (w - w_global)`` and the correction to the gradient pytree before the optax
    update, inside the jitted step.
    """

    backend = "jax"
    supports = frozenset({"proximal", "gradient_correction"})
    #: The params pytree is the model's whole state: nodes keep the built plan.
    reusable = True
    training_keys = {"optimizer": str, "test_batch_size": int}
    training_defaults = {"optimizer": "sgd", "test_batch_size": 1024}
    apply_fn: Callable[[Any, Any], Any]
    params: Any

    def init_model(self) -> tuple[Callable[[Any, Any], Any], Any]:
        """Build ``(apply_fn, params)``; random values from ``self.key``."""
        raise ConfigurationError(f"{type(self).__name__} must define init_model().")

    def init_optimizer(self) -> optax.GradientTransformation:
        """Build the optax optimizer for one round of local training."""
        name = str(self.training.extra["optimizer"])
        factory = getattr(optax, name, None)
        if not callable(factory):
            raise ConfigurationError(f"optax has no optimizer {name!r}. Use 'sgd', 'adam'...")
        return factory(self.training.lr)

    def training_step(self, params: Any, data: Any, target: Any) -> Any:
        """The loss of one batch (pure: it runs under ``jax.jit``)."""
        output = self.apply_fn(params, data)
        if self.task == "classification":
            return optax.softmax_cross_entropy_with_integer_labels(output, target).mean()
        return jnp.mean((output.reshape(target.shape) - target) ** 2)

    def testing_step(self, data: Any, target: Any) -> tuple[Any, Any]:
        """``(y_true, y_pred)`` of one batch."""
        output = self._apply(self.params, data)
        if self.task == "classification":
            output = jnp.argmax(output, axis=1)
        return target, output

    # --- TrainingPlan -----------------------------------------------------------------------

    def build(self, seed: int) -> None:
        self.key = jax.random.PRNGKey(seed)
        built = self.init_model()
        if not (isinstance(built, tuple) and len(built) == 2 and callable(built[0])):
            raise ConfigurationError(
                "init_model() must return (apply_fn, params). Received: "
                f"{type(built).__name__}")
        self.apply_fn, self.params = built
        self._apply = jax.jit(self.apply_fn)
        self._steps: dict[tuple[bool, bool], Callable[..., Any]] = {}
        self._optimizer: optax.GradientTransformation | None = None

    def get_parameters(self) -> ParameterSet:
        return convert.get_parameters(self.params)

    def set_parameters(self, params: ParameterSet) -> None:
        self.params = convert.set_parameters(self.params, params)

    def training_data(self, dataset: Dataset) -> Any:
        """``(X, y)`` with float32 features; labels as int32 class indices (or float32)."""
        return self._labelled_arrays(dataset, np.int32)

    def _batches(self, data: Any, batch_size: int, rng: np.random.Generator | None
                 ) -> Iterator[tuple[Any, Any]]:
        X, y = data
        for idx in batch_indices(len(X), batch_size, rng):
            yield X[idx], y[idx]

    def _step(self, proximal: bool, correction: bool) -> Callable[..., Any]:
        """The jitted step for this combination of FedProx and SCAFFOLD terms (cached)."""
        key = (proximal, correction)
        if key in self._steps:
            return self._steps[key]
        if self._optimizer is None:
            self._optimizer = self.init_optimizer()
        tx = self._optimizer
        loss_fn = self.training_step

        def step(params: Any, opt_state: Any, loss_sum: Any, X: Any, y: Any, mu: Any,
                 anchor: Any, corr: Any) -> tuple[Any, Any, Any]:
            loss, grads = jax.value_and_grad(loss_fn)(params, X, y)
            if proximal:
                grads = jax.tree_util.tree_map(lambda g, w, a: g + mu * (w - a),
                                               grads, params, anchor)
            if correction:
                grads = jax.tree_util.tree_map(jnp.add, grads, corr)
            updates, opt_state = tx.update(grads, opt_state, params)
            # The epoch's loss is summed on the device: reading each step's loss back
            # would cost a transfer per step.
            loss_sum = loss_sum + loss.astype(jnp.float32) * y.shape[0]
            return optax.apply_updates(params, updates), opt_state, loss_sum

        self._steps[key] = jax.jit(step)
        return self._steps[key]

    def fit(self, dataset: Dataset, seed: int) -> dict[str, Any]:
        data = self.training_data(dataset)
        batch_size = self.training.batch_size or 32
        rng = np.random.default_rng(seed)
        mu, anchor = self.proximal if self.proximal is not None else (0.0, None)
        proximal = bool(mu) and anchor is not None
        anchor_tree = (convert.set_parameters(self.params, anchor)
                       if proximal and anchor is not None else None)
        corr_tree = (convert.set_parameters(self.params, self.gradient_correction)
                     if self.gradient_correction is not None else None)
        step = self._step(proximal, corr_tree is not None)
        assert self._optimizer is not None
        params = self.params
        opt_state = self._optimizer.init(params)
        # A numpy scalar: jit moves it with the batch (jnp.float32 would dispatch an op).
        mu_arr = np.float32(mu)
        zero = np.float32(0.0)
        total = 0.0
        loop = self.local_loop(-(-len(data[1]) // batch_size))
        for _ in loop.epochs():
            loss_sum: Any = zero
            for X, y in loop.batches(self._batches(data, batch_size, rng)):
                params, opt_state, loss_sum = step(params, opt_state, loss_sum, X, y, mu_arr,
                                                   anchor_tree, corr_tree)
                # No loss here: reading it would wait for the device at every step.
                loop.step(len(y))
            total += float(loss_sum)  # one read (and wait) per epoch
        self.params = params
        lr = self.training.lr
        self.local_steps = loop.local_steps({name: lr for name in convert.leaf_names(params)})
        return loop.stats(total / max(loop.samples, 1))

    def predict(self, dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
        data = self.training_data(dataset)
        batch_size = int(self.training.extra["test_batch_size"])
        return collect_predictions(self.testing_step(X, y)
                                   for X, y in self._batches(data, batch_size, None))
