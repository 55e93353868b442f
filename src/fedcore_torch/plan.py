"""TorchTrainingPlan: federated training of a ``torch.nn.Module``."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from fedcore.data import Dataset, Subset
from fedcore.data.array import ArrayDataset
from fedcore.errors import ConfigurationError
from fedcore.params import ParameterSet
from fedcore.plan import TrainingPlan
from fedcore_torch import convert
from fedcore_torch.privacy import TorchPrivateTraining

#: Training arrays up to this size are kept with a reused plan between rounds.
_KEEP_BYTES = 1 << 20


class TorchTrainingPlan(TrainingPlan):
    """A plan around a PyTorch model.

    Override:

    - :meth:`init_model` (required): build the ``nn.Module`` from ``self.model_args``;
    - :meth:`training_step` (required): ``(data, target) -> loss`` for one batch;
    - :meth:`init_optimizer`: default SGD with ``training_args["lr"]`` (0.01);
    - :meth:`training_data`: default ``(X, y)`` arrays of the dataset; may also return any
      map-style dataset (``len`` and ``[i] -> (x, y)``, not a tuple), such as a
      ``torch.utils.data.Dataset`` or ``dataset.items(...)``, which is batched by a
      ``DataLoader`` (``x`` may be a tuple or dict of arrays: batches keep its structure);
    - :meth:`testing_step`: ``(data, target) -> (y_true, y_pred)``; default argmax of the
      output for classification, the output itself for regression.

    training_args (:class:`~fedcore.plan.LocalTraining`): ``epochs`` (1), ``batch_size``
    (32), ``lr`` (0.01), ``num_updates`` (stop after this many steps), ``use_gpu`` (True:
    CUDA when available and the node allows it), ``test_batch_size`` (1024).

    FedProx and SCAFFOLD work with any model and optimizer: the proximal gradient
    ``mu * (w - w_global)`` and SCAFFOLD's correction are added to each trained parameter's
    ``grad`` after ``backward()`` and before ``optimizer.step()``.

    DP-SGD (``privacy`` mechanism ``"dp-sgd"``) is run by the node's installed
    :class:`~fedcore_torch.privacy.TorchPrivateTraining` around :meth:`init_optimizer`,
    :meth:`training_data` and :meth:`training_step`; a plan that overrides :meth:`fit`,
    :meth:`get_parameters` or :meth:`set_parameters` is refused DP-SGD.
    """

    backend = "torch"
    supports = frozenset({"proximal", "gradient_correction"})
    #: DP-SGD through Opacus, run by the node around the plan (not by :meth:`fit`).
    private_training = TorchPrivateTraining
    #: The state_dict is the whole state of a standard module, so nodes keep the built
    #: model between rounds. Set False for a model that keeps state outside it.
    reusable = True
    training_keys = {"test_batch_size": int}
    training_defaults = {"test_batch_size": 1024}
    model: torch.nn.Module

    def init_model(self) -> torch.nn.Module:
        """Build the model."""
        raise ConfigurationError(f"{type(self).__name__} must define init_model().")

    @classmethod
    def warm_up(cls) -> None:
        """Import ``torch._dynamo`` now: torch imports it with a process's first optimizer.

        That is ~840 modules and 120k objects, ~1 s of CPU.
        """
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)

    def init_optimizer(self) -> torch.optim.Optimizer:
        """Build the optimizer for one round of local training."""
        return torch.optim.SGD(self.model.parameters(), lr=self.training.lr)

    def training_step(self, data: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of one batch."""
        raise ConfigurationError(f"{type(self).__name__} must define training_step().")

    def testing_step(self, data: torch.Tensor, target: torch.Tensor) -> tuple[Any, Any]:
        """``(y_true, y_pred)`` of one batch."""
        output = self.model(data)
        if self.task == "classification":
            output = output.argmax(dim=1)
        return target, output

    # --- TrainingPlan -----------------------------------------------------------------------

    def build(self, seed: int) -> None:  # noqa: D102 - inherits the doc
        self._device = self._choose_device()
        self._manual_seed(seed)
        model = self.init_model()
        if not isinstance(model, torch.nn.Module):
            raise ConfigurationError(
                f"init_model() must return a torch.nn.Module. Received: {type(model).__name__}"
            )
        self.model = model.to(self._device)

    def _manual_seed(self, seed: int) -> None:
        # torch.manual_seed also queues the seed for every accelerator backend that is not
        # initialised, formatting the caller's stack each time (0.1 to 1 ms a call, twice
        # per round). A plan running on the CPU draws only from the CPU generator, and
        # seeding that one alone gives the same random streams.
        if self._device.type == "cpu":
            torch.default_generator.manual_seed(seed)
        else:
            torch.manual_seed(seed)

    def _choose_device(self) -> torch.device:
        allowed = bool(self.node_settings.get("allow_gpu", True))
        wanted = self.training.use_gpu
        if allowed and wanted and torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")

    def device(self) -> str:  # noqa: D102
        return str(getattr(self, "_device", "cpu"))

    def get_parameters(self) -> ParameterSet:  # noqa: D102
        return convert.get_parameters(self.model)

    def set_parameters(self, params: ParameterSet) -> None:  # noqa: D102
        convert.set_parameters(self.model, params)

    def _batches(self, data: Any, batch_size: int, generator: torch.Generator | None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not isinstance(data, tuple) and hasattr(data, "__len__") and hasattr(
                data, "__getitem__"):
            loader = torch.utils.data.DataLoader(
                data, batch_size=batch_size, shuffle=generator is not None,
                generator=generator)
            for batch in loader:
                yield (convert.to_device(batch[0], self._device),
                       convert.to_device(batch[1], self._device))
            return
        X, y = data
        device = self._device
        X, y = convert.to_tensor(X), convert.to_tensor(y)
        if X.device != device:  # kept data is on the device already
            X = X.to(device)
        if y.device != device:
            y = y.to(device)
        if X.dtype == torch.float64:
            X = X.float()
        n = len(X)
        if generator is None:
            for start in range(0, n, batch_size):
                yield X[start : start + batch_size], y[start : start + batch_size]
            return
        order = torch.randperm(n, generator=generator)
        if order.device != device:
            order = order.to(device)
        # index_select gathers the rows X[idx] does, without the indexing's argument
        # parsing (a few microseconds a batch); a node's one batch is the whole order.
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size] if n > batch_size else order
            yield X.index_select(0, idx), y.index_select(0, idx)

    def fit(self, dataset: Dataset, seed: int) -> dict[str, Any]:  # noqa: D102
        data = self._round_data(dataset)
        batch_size = self._batch_size()
        generator = torch.Generator().manual_seed(seed)
        self._manual_seed(seed)
        optimizer = self._round_optimizer()
        # The kept default SGD's zero_grad(set_to_none=True) only sets each gradient to None
        # (under a profiler label, a few microseconds a step): done here directly. A plan's
        # own optimizer keeps its zero_grad.
        trained = ([p for group in optimizer.param_groups for p in group["params"]]
                   if optimizer is getattr(self, "_default_optimizer", None)
                   and type(optimizer) is torch.optim.SGD else None)
        self.model.train()
        adjust = self._gradient_terms()
        # The learning rates of the steps matter to SCAFFOLD's correction only.
        lr_sums = ([0.0] * len(optimizer.param_groups)
                   if self.gradient_correction is not None else None)
        loop = self.local_loop(math.ceil(len(data[1]) / batch_size)
                               if isinstance(data, tuple) else None)
        for _ in loop.epochs():
            for X, y in loop.batches(self._batches(data, batch_size, generator)):
                if trained is None:
                    optimizer.zero_grad(set_to_none=True)
                else:
                    for p in trained:
                        p.grad = None
                loss = self.training_step(X, y)
                loss.backward()
                if adjust:
                    _adjust_gradients(adjust)
                if lr_sums is not None:
                    for i, group in enumerate(optimizer.param_groups):
                        lr_sums[i] += float(group.get("lr", 0.0))
                optimizer.step()
                loop.step(len(y), loss=loss.detach())  # read when needed, not every step
        # A kept model holds no gradient between rounds: the next round's first step
        # would drop it, and meanwhile it is a model's worth of memory per node (what
        # zero_grad(set_to_none=True) does, without its profiling hooks).
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        if lr_sums is not None:
            self.local_steps = loop.local_steps(self._mean_lr(optimizer, loop.steps, lr_sums))
        return loop.stats(loop.mean_loss)

    def _round_data(self, dataset: Dataset) -> Any:
        """:meth:`training_data` of ``dataset``, as tensors kept from the round before.

        A node keeps a built plan and its opened dataset (and the split of it) between
        rounds, so a small node would convert the same samples again every round. The
        default :meth:`training_data` of the same in-memory dataset object (an
        :class:`~fedcore.data.ArrayDataset` or a subset of one) gives the same arrays:
        up to ``_KEEP_BYTES`` they are kept, on the plan's device, for the next round.
        """
        kept: tuple[Dataset, Any] | None = getattr(self, "_kept_data", None)
        if kept is not None and kept[0] is dataset:
            return kept[1]
        data = self.training_data(dataset)
        base = dataset.parent if isinstance(dataset, Subset) else dataset
        if (type(self).training_data is TorchTrainingPlan.training_data
                and isinstance(base, ArrayDataset) and isinstance(data, tuple)
                and data[0].nbytes + data[1].nbytes <= _KEEP_BYTES):
            data = (convert.to_tensor(data[0]).to(self._device),
                    convert.to_tensor(data[1]).to(self._device))
            kept = (dataset, data)
        else:
            kept = None
        self._kept_data = kept
        return data

    def _round_optimizer(self) -> torch.optim.Optimizer:
        """Return this round's optimizer: :meth:`init_optimizer`'s, or the default one kept.

        A node keeps a built plan for the rounds of its experiment (:attr:`reusable`).
        The default optimizer is plain SGD, which keeps no state between steps: the one
        built in an earlier round, its state cleared and its learning rate set again, is
        what a new one would be, without building it again for every node and round. A
        plan's own :meth:`init_optimizer` is called every round.
        """
        if type(self).init_optimizer is not TorchTrainingPlan.init_optimizer:
            return self.init_optimizer()
        params = list(self.model.parameters())
        kept: torch.optim.Optimizer | None = getattr(self, "_default_optimizer", None)
        group = kept.param_groups[0] if kept is not None and len(kept.param_groups) == 1 \
            else None
        if (kept is not None and group is not None and len(group["params"]) == len(params)
                and all(a is b for a, b in zip(group["params"], params, strict=True))):
            kept.state.clear()
            group["lr"] = self.training.lr
            return kept
        self._default_optimizer = self.init_optimizer()
        return self._default_optimizer

    def _batch_size(self) -> int:
        return self.training.batch_size or 32

    def _gradient_terms(self) -> list[tuple[torch.Tensor, float, torch.Tensor | None,
                                            torch.Tensor | None]]:
        """Per trained parameter: ``(param, mu, w_global, correction)`` for this round."""
        mu, anchor = self.proximal if self.proximal is not None else (0.0, None)
        correction = self.gradient_correction
        if not mu and correction is None:
            return []
        terms: list[tuple[torch.Tensor, float, torch.Tensor | None, torch.Tensor | None]] = []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            g = c = None
            if mu and anchor is not None:
                g = self._tensor_like(anchor, name, p, "the global model")
            if correction is not None:
                c = self._tensor_like(correction, name, p, "SCAFFOLD's correction")
            terms.append((p, float(mu), g, c))
        return terms

    def _tensor_like(self, params: ParameterSet, name: str, like: torch.Tensor,
                     what: str) -> torch.Tensor:
        if name not in params:
            raise ConfigurationError(
                f"{what} has no parameter {name!r}. Expected the names of the model's "
                f"state_dict. Received: {list(params)[:8]}")
        return convert.to_tensor(params[name]).to(device=like.device, dtype=like.dtype)

    def _mean_lr(self, optimizer: torch.optim.Optimizer, steps: int,
                 lr_sums: list[float]) -> dict[str, float]:
        """Each trained parameter's mean learning rate over the round, for SCAFFOLD."""
        names = {id(p): n for n, p in self.model.named_parameters() if p.requires_grad}
        lr: dict[str, float] = {}
        for i, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if id(p) in names and steps:
                    lr[names[id(p)]] = lr_sums[i] / steps
        return lr

    def training_data(self, dataset: Dataset) -> Any:
        """``(X, y)`` with float32 features.

        Integer targets stay integer (class indices); text labels (class names) become
        indices into the federation's classes (:meth:`classes`), the same on every node.
        """
        return self._labelled_arrays(dataset, np.int64)

    def predict(self, dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:  # noqa: D102
        data = self.training_data(dataset)
        batch_size = int(self.training.extra["test_batch_size"])
        self.model.eval()
        trues, preds = [], []
        with torch.no_grad():
            for X, y in self._batches(data, batch_size, None):
                t, p = self.testing_step(X, y)
                trues.append(torch.as_tensor(t).cpu().numpy())
                preds.append(torch.as_tensor(p).cpu().numpy())
        if not trues:
            return np.empty(0), np.empty(0)
        return np.concatenate(trues), np.concatenate(preds)


def _adjust_gradients(terms: list[tuple[torch.Tensor, float, torch.Tensor | None,
                                        torch.Tensor | None]]) -> None:
    """Add FedProx's ``mu * (w - w_global)`` and SCAFFOLD's ``c - c_i`` to the gradients."""
    with torch.no_grad():
        for p, mu, anchor, correction in terms:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if anchor is not None:
                p.grad.add_(p - anchor, alpha=mu)
            if correction is not None:
                p.grad.add_(correction)

