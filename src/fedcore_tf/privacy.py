"""DP-SGD for Keras plans, through tensorflow-privacy's ``DPKerasSGDOptimizer``.

Per-example clipping to ``clip`` and Gaussian noise ``noise_multiplier * clip`` at every
step, by tensorflow-privacy's Keras optimizer (Keras 2). The round's cost is recorded as one
accountant event ``(noise_multiplier, batch_size / n, steps)``, composed across rounds by
fedcore's accountant; tensorflow-privacy's own ``compute_dp_sgd_privacy_lib`` gives the same
epsilon for the same settings (tested).

Isolation. tensorflow-privacy 0.9.0 does not import on TF 2.21 as a package
(``import tensorflow_privacy`` fails): this module sets ``sys.skip_tf_privacy_import = True``
and imports the optimizer's submodule directly. Its optimizers subclass Keras 2 optimizers,
so the process must run ``tf-keras`` (``TF_USE_LEGACY_KERAS=1`` set before TensorFlow is
first imported, which is process-wide). fedcore never sets it: this module is imported only
by a round that asks for DP-SGD (:meth:`KerasTrainingPlan.fit`), and that round fails with
a :class:`~fedcore.errors.ConfigurationError` saying what to do when the variable is
missing. A node serving TF DP-SGD runs in its own environment (``fedcore[tfdp]``: numpy 1.26)
started with ``TF_USE_LEGACY_KERAS=1``.

Sampling: batches are drawn by shuffling each epoch (fixed size ``batch_size``, the last
partial batch dropped, so an epoch is ``n // batch_size`` steps); the accounting is that of
Poisson sampling at rate ``batch_size / n``, as tensorflow-privacy's own analysis assumes,
for the number of steps the optimizer really took. tensorflow-privacy's
``compute_dp_sgd_privacy`` counts ``ceil(epochs * n / batch_size)`` steps, the same number
when ``batch_size`` divides ``n`` (and more otherwise), and searches its own Renyi orders:
given those orders, fedcore's accountant returns its epsilon exactly (tested). With
fedcore's default orders (Opacus's) the two differ by up to about 1% either way, both
valid bounds: the minimum over two different grids of the same RDP curve. The noise comes from
TensorFlow's generator seeded from the operating system (never the experiment's seed).

On a node, :class:`KerasPrivateTraining` (``KerasTrainingPlan.private_training``) runs the
round around the plan's model, loss and data: the node's code, not the plan's (see
:mod:`fedcore.privacy.dpsgd`); the node charges the steps the DP optimizer took at the rate
of its own data size.
"""

from __future__ import annotations

import math
import os
import secrets
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedcore.errors import ConfigurationError, MissingDependencyError
from fedcore.params import ParameterSet
from fedcore.plan import LocalTraining
from fedcore.privacy import Accountant, Event, PrivacySpec
from fedcore.privacy.dpsgd import PrivateTraining

__all__ = ["DPKerasSGD", "KerasPrivateTraining", "tf_privacy"]


def tf_privacy() -> Any:
    """tensorflow-privacy's Keras DP optimizers module (imported with the workaround)."""
    sys.skip_tf_privacy_import = True  # type: ignore[attr-defined]
    try:
        from tensorflow_privacy.privacy.optimizers import dp_optimizer_keras
    except ImportError as exc:
        raise MissingDependencyError(
            f"TF DP-SGD needs tensorflow-privacy and tf-keras ({exc}). Install "
            '"fedcore[tfdp]" in its own environment and start with TF_USE_LEGACY_KERAS=1.'
        ) from exc
    return dp_optimizer_keras


class DPKerasSGD:
    """One round of DP-SGD for a Keras plan: :meth:`train`, then :meth:`events`."""

    def __init__(self, noise_multiplier: float, clip: float, delta: float):
        self.noise_multiplier = float(noise_multiplier)
        self.clip = float(clip)
        self.delta = float(delta)
        self._events: list[Event] = []

    @classmethod
    def from_spec(cls, spec: PrivacySpec | Mapping[str, Any]) -> DPKerasSGD:
        """The DP-SGD of a training request's ``privacy`` (mechanism ``"dp-sgd"``)."""
        parsed = PrivacySpec.parse(spec)
        if parsed is None or parsed.mechanism != "dp-sgd":
            raise ConfigurationError("DPKerasSGD runs the 'dp-sgd' mechanism. Received: "
                                     f"{None if parsed is None else parsed.mechanism!r}")
        return cls(parsed.noise_multiplier, parsed.clip, parsed.delta)

    def train(self, plan: Any, data: Any, *, epochs: int, batch_size: int, lr: float,
              num_updates: int | None = None) -> dict[str, Any]:
        """Train ``plan.model`` on ``(X, y)`` with the DP optimizer; training statistics.

        ``epochs`` passes over the data in batches of ``batch_size`` (the last partial batch
        of an epoch dropped), stopping after ``num_updates`` steps when given. The steps
        recorded (:meth:`events`) are those the optimizer took.
        """
        import tensorflow as tf

        if not (isinstance(data, tuple) and len(data) == 2):
            raise ConfigurationError("TF DP-SGD trains on (X, y) arrays. Received: "
                                     f"{type(data).__name__}")
        X, y = (np.asarray(a) for a in data)
        n = len(X)
        if n < batch_size:
            raise ConfigurationError(
                f"DP-SGD needs at least batch_size={batch_size} samples. Received: {n}")
        tf.random.set_seed(secrets.randbits(31))  # noise the researcher cannot predict
        optimizer = tf_privacy().DPKerasSGDOptimizer(
            l2_norm_clip=self.clip, noise_multiplier=self.noise_multiplier,
            num_microbatches=None, learning_rate=lr)
        loss = plan.init_loss()
        if isinstance(loss, tf.keras.losses.Loss):  # per-example losses: the DP optimizer
            loss = type(loss).from_config({**loss.get_config(), "reduction": "none"})
        model = plan.model
        model.compile(optimizer=optimizer, loss=loss)
        data_set = (tf.data.Dataset.from_tensor_slices((X, y))
                    .shuffle(n, seed=secrets.randbits(31), reshuffle_each_iteration=True)
                    .batch(batch_size, drop_remainder=True))
        per_epoch, passes = n // batch_size, epochs
        if num_updates is not None and int(num_updates) < epochs * per_epoch:
            # Stop after num_updates steps (the budget check counted no more).
            if int(num_updates) <= 0:
                self._events = []
                return {"loss": math.nan, "steps": 0, "epochs": 0}
            data_set, passes = data_set.repeat(epochs).take(int(num_updates)), 1
        history = model.fit(data_set, epochs=passes, verbose=0)
        # The steps that really ran (the optimizer is new: it counts from 0).
        steps = int(optimizer.iterations.numpy())
        self._events = [Event(self.noise_multiplier, batch_size / n, steps)]
        losses = history.history.get("loss") or [math.nan]
        return {"loss": float(losses[-1]), "steps": steps, "epochs": epochs}

    def events(self) -> list[Event]:
        """The round's accountant events: ``[(noise_multiplier, batch_size / n, steps)]``."""
        return list(self._events)

    def epsilon(self, delta: float | None = None) -> float:
        """The round's epsilon at ``delta`` (default: the spec's), by fedcore's accountant."""
        return Accountant(self._events).epsilon(self.delta if delta is None else delta)


class KerasPrivateTraining(PrivateTraining):
    """DP-SGD around a Keras plan, run by the node (``KerasTrainingPlan.private_training``).

    :class:`DPKerasSGD` trains the plan's model on the ``(X, y)`` of its ``training_data``
    (one example per record of the node's dataset) with the loss of its ``init_loss``. The
    node charges ``(noise_multiplier, batch_size / n, steps)`` with ``n`` its own training
    records and ``steps`` the DP optimizer's iterations; the update is read from the model
    that was trained.
    """

    relies_on = ("get_parameters", "set_parameters")

    def __init__(self, spec: PrivacySpec):
        super().__init__(spec)
        self._model: Any = None

    def train(self, plan: Any, dataset: Any, seed: int,
              training: LocalTraining) -> dict[str, Any]:  # noqa: D102 - inherits the doc
        self._refuse_corrections(plan)
        if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
            raise ConfigurationError(
                "TF DP-SGD runs tensorflow-privacy's Keras 2 optimizers: start the node with "
                "TF_USE_LEGACY_KERAS=1 and install fedcore[tfdp] (see fedcore_tf.privacy).")
        data = plan.training_data(dataset)
        if isinstance(data, tuple) and len(data) == 2 and len(data[0]) != len(dataset):
            raise ConfigurationError(
                "Under DP-SGD one record of the node's dataset is one training example: "
                f"training_data() returned {len(data[0])} examples for {len(dataset)} "
                "records. Return one example per record, or ask for update-level DP.")
        batch_size = training.batch_size or 32
        self._model = plan.model
        self._charge(batch_size / max(len(dataset), 1))
        dp = DPKerasSGD(self.spec.noise_multiplier, self.spec.clip, self.spec.delta)
        stats = dp.train(plan, data, epochs=training.epochs, batch_size=batch_size,
                         lr=plan.training.lr, num_updates=training.num_updates)
        self.steps = sum(e.steps for e in dp.events())
        return stats

    def parameters(self, plan: Any) -> ParameterSet:  # noqa: D102
        from fedcore_tf import convert

        if self._model is None:
            raise ConfigurationError("KerasPrivateTraining.parameters() before train().")
        return convert.get_parameters(self._model)
