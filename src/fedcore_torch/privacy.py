"""DP-SGD for torch plans, through Opacus: per-sample clipping and noise at every step.

:class:`DPSGD` wraps the model, optimizer and training data of one round with Opacus's
``PrivacyEngine.make_private`` (Poisson sampling, flat clipping to ``clip``, Gaussian noise
``noise_multiplier * clip``), and afterwards gives the round's accountant events (to
compose across rounds in fedcore's accountant) and its epsilon. A round::

    dp = DPSGD(noise_multiplier=1.1, clip=1.0, delta=1e-5)
    model, optimizer, loader = dp.make_private(plan.model, optimizer, (X, y), batch_size=32)
    for epoch in range(epochs):
        for X_batch, y_batch in loader:        # Poisson batches: their size varies
            optimizer.zero_grad()
            loss_fn(model(X_batch), y_batch).backward()
            optimizer.step()                   # clip each sample's gradient, add noise
    plan.model = dp.release()                  # the plain module again, hooks removed
    dp.events(), dp.epsilon()

On a node, :class:`TorchPrivateTraining` (``TorchTrainingPlan.private_training``) runs that
loop around a plan's model, optimizer, data and ``training_step``: the node's code, not the
plan's (see :mod:`fedcore.privacy.dpsgd`). It also checks that nothing but the DP optimizer
changes the model's state during the round.

Sampling and noise draw from torch generators seeded from the operating system's CSPRNG,
never from the experiment's seed (which the researcher knows). Opacus's ``secure_mode``
(torchcsprng) is not available for current torch, so the generators themselves are
torch's Mersenne Twister: fine against the honest-but-curious researcher fedcore assumes,
not against an attacker who can observe the node's floating-point state.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedcore.errors import ConfigurationError, MissingDependencyError, install_hint
from fedcore.params import ParameterSet
from fedcore.plan import LocalLoop, LocalTraining
from fedcore.privacy import Accountant, Event, PrivacySpec, dpsgd_schedule
from fedcore.privacy.dpsgd import PrivateTraining
from fedcore.privacy.spec import DEFAULT_DELTA
from fedcore_torch import convert

__all__ = ["DPSGD", "TorchPrivateTraining"]

_INSTALL = install_hint("torch")


def _opacus() -> Any:
    try:
        import opacus
    except ImportError as exc:
        raise MissingDependencyError(
            f"DP-SGD for torch plans needs Opacus ({exc}). {_INSTALL}."
        ) from exc
    return opacus


def _generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(
        seed if seed is not None else secrets.randbits(63))


def _device_of(model: torch.nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _as_dataset(data: Any) -> Any:
    """A map-style dataset of ``(x, y)`` pairs from ``(X, y)`` arrays or a dataset."""
    if isinstance(data, tuple) and len(data) == 2:
        X, y = (torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a
                for a in data)
        if X.dtype == torch.float64:
            X = X.float()
        return torch.utils.data.TensorDataset(X, y)
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        return data
    raise ConfigurationError(
        "DP-SGD trains on (X, y) arrays or a map-style dataset (len and [i] -> (x, y)). "
        f"Received: {type(data).__name__}")


class DPSGD:
    """One round of Opacus DP-SGD: wrap, train, :meth:`release`, read the cost.

    ``clip`` is Opacus's ``max_grad_norm``. ``seed`` makes sampling and noise reproducible
    and is for tests only. A new instance per round: its accountant holds that round only;
    the node composes rounds from :meth:`events`.
    """

    def __init__(self, noise_multiplier: float, clip: float, delta: float = DEFAULT_DELTA,
                 *, seed: int | None = None):
        spec = PrivacySpec.parse({"mechanism": "dp-sgd", "noise_multiplier": noise_multiplier,
                                  "clip": clip, "delta": delta})
        assert spec is not None
        self.spec = spec
        self.seed = seed
        self._engine: Any = None
        self._module: Any = None
        self._optimizer: Any = None
        self._dataset_size = 0
        self._batch = 1
        self._norms: list[torch.Tensor] = []
        #: Optimizer steps that clipped and noised (counted by this class's step hook).
        self.noised_steps = 0

    @classmethod
    def from_spec(cls, spec: PrivacySpec | Mapping[str, Any]) -> DPSGD:
        """The DP-SGD of a training request's ``privacy`` (mechanism ``"dp-sgd"``)."""
        parsed = PrivacySpec.parse(spec)
        if parsed is None or parsed.mechanism != "dp-sgd":
            raise ConfigurationError(
                "DPSGD runs the 'dp-sgd' mechanism. Received: "
                f"{None if parsed is None else parsed.mechanism!r}")
        return cls(parsed.noise_multiplier, parsed.clip, parsed.delta)

    def __repr__(self) -> str:
        s = self.spec
        return f"DPSGD(noise_multiplier={s.noise_multiplier!r}, clip={s.clip!r}, delta={s.delta!r})"

    # --- wrapping ---------------------------------------------------------------------------

    def make_private(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     data: Any, batch_size: int,
                     ) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
        """Opacus-wrapped ``(model, optimizer, loader)`` for this round's training.

        ``data`` is what the plan trains on: ``(X, y)`` arrays or a map-style dataset. The
        loader draws Poisson batches at rate ``1 / ceil(n / batch_size)``, ``ceil(n /
        batch_size)`` of them an epoch. The model must be Opacus-compatible (no BatchNorm:
        ``opacus.validators.ModuleValidator.fix`` swaps it for GroupNorm).
        """
        opacus = _opacus()
        if self._engine is not None:
            raise ConfigurationError("This DPSGD already wrapped a model: use one per round.")
        errors = opacus.validators.ModuleValidator.validate(model, strict=False)
        if errors:
            raise ConfigurationError(
                "The model cannot train with DP-SGD: " + "; ".join(map(str, errors)) + ". "
                "Build it with opacus.validators.ModuleValidator.fix(model) in init_model().")
        dataset = _as_dataset(data)
        self._dataset_size, self._batch = len(dataset), int(batch_size)
        if self._dataset_size == 0:
            raise ConfigurationError("DP-SGD needs at least one training sample.")
        loader = torch.utils.data.DataLoader(dataset, batch_size=int(batch_size),
                                             generator=_generator(self.seed))
        with warnings.catch_warnings():  # "secure RNG turned off": said in our docs
            warnings.simplefilter("ignore")
            self._engine = opacus.PrivacyEngine(accountant="rdp")
            module, dp_optimizer, dp_loader = self._engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader,
                noise_multiplier=self.spec.noise_multiplier, max_grad_norm=self.spec.clip,
                poisson_sampling=True,
                # Opacus draws the noise on the parameters' device, with this generator.
                noise_generator=_generator(None if self.seed is None else self.seed + 1,
                                           _device_of(model)))
        self._module, self._optimizer = module, dp_optimizer
        accountant_hook = dp_optimizer.step_hook

        def step_hook(optim: Any) -> None:  # keep Opacus's accounting, note the norms
            self.noised_steps += 1
            self._note_norms(optim)
            if accountant_hook is not None:
                accountant_hook(optim)

        dp_optimizer.step_hook = step_hook
        return module, dp_optimizer, dp_loader

    def _note_norms(self, optim: Any) -> None:
        samples = optim.grad_samples
        if samples and len(samples[0]):
            norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in samples],
                                dim=1).norm(2, dim=1)
            self._norms.append(norms.detach().cpu())

    def release(self) -> torch.nn.Module:
        """The original module, with Opacus's hooks and per-sample attributes removed."""
        if self._module is None:
            raise ConfigurationError("DPSGD.release() called before make_private().")
        self._module._close()
        return self._module._module

    # --- cost -------------------------------------------------------------------------------

    @property
    def sample_rate(self) -> float:
        """The Poisson sampling rate of the round's batches: ``1 / ceil(n / batch_size)``."""
        if self._dataset_size == 0:
            raise ConfigurationError("DPSGD.sample_rate is known once make_private() ran.")
        return dpsgd_schedule(self._dataset_size, batch_size=self._batch)[0]

    def events(self) -> list[Event]:
        """The round's accountant events as Opacus recorded them (one per step kind)."""
        history = self._engine.accountant.history if self._engine is not None else []
        return [Event(float(z), float(q), int(steps)) for z, q, steps in history]

    @property
    def steps(self) -> int:
        """Optimiser steps taken under DP so far."""
        return sum(e.steps for e in self.events())

    def epsilon(self, delta: float | None = None) -> float:
        """The round's epsilon at ``delta`` (default: the spec's), by fedcore's accountant."""
        return Accountant(self.events()).epsilon(self.spec.delta if delta is None else delta)

    def opacus_epsilon(self, delta: float | None = None) -> float:
        """The same from Opacus's own RDP accountant (it may differ, see the docs)."""
        if self._engine is None or not self._engine.accountant.history:
            return 0.0
        return float(self._engine.accountant.get_epsilon(
            self.spec.delta if delta is None else delta))

    def clipping(self) -> dict[str, float]:
        """Per-sample gradient norms seen before clipping.

        ``samples``, ``clipped_fraction`` and ``max_norm``. They depend on the data: for the
        node's log, never the reply.
        """
        if not self._norms:
            return {"samples": 0, "clipped_fraction": 0.0, "max_norm": 0.0}
        norms = torch.cat(self._norms)
        return {"samples": int(norms.numel()),
                "clipped_fraction": float((norms > self.spec.clip).float().mean()),
                "max_norm": float(norms.max())}

    def report(self) -> dict[str, Any]:
        """The round's DP parameters and cost, for ``TrainReply.privacy`` (no data in it)."""
        events = self.events()
        return {**self.spec.to_dict(), "sample_rate": events[0].sample_rate if events else None,
                "steps": sum(e.steps for e in events), "events": [list(e) for e in events],
                "epsilon": self.epsilon()}


class TorchPrivateTraining(PrivateTraining):
    """DP-SGD around a torch plan, run by the node (``TorchTrainingPlan.private_training``).

    The round's loop is this class's: Opacus wraps the plan's model, the optimizer of its
    ``init_optimizer`` (a ``torch.optim`` optimizer) and the data of its ``training_data``
    (one example per record of the node's dataset); the plan's ``training_step`` gives each
    batch's loss. Before every optimizer step the model's whole state (parameters and
    buffers) must be as the previous step left it: a plan whose code writes into the model
    other than through the noised gradients is stopped. The update is read from the module
    that was wrapped. No progress is reported during the round.
    """

    relies_on = ("get_parameters", "set_parameters")

    def __init__(self, spec: PrivacySpec):
        super().__init__(spec)
        self._module: torch.nn.Module | None = None

    def train(self, plan: Any, dataset: Any, seed: int,
              training: LocalTraining) -> dict[str, Any]:  # noqa: D102 - inherits the doc
        self._refuse_corrections(plan, "Opacus recomputes the gradients after clipping")
        device = getattr(plan, "_device", torch.device("cpu"))
        if device.type == "cpu":
            torch.default_generator.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        model = plan.model
        if not isinstance(model, torch.nn.Module):
            raise ConfigurationError("DP-SGD trains plan.model, a torch.nn.Module. Received: "
                                     f"{type(model).__name__}")
        optimizer = plan.init_optimizer()
        _check_optimizer(optimizer)
        data = plan.training_data(dataset)
        batch_size = training.batch_size or 32
        model.train()  # Opacus checks the mode (evaluation left it in eval mode)
        dp = DPSGD(self.spec.noise_multiplier, self.spec.clip, self.spec.delta)
        private, dp_optimizer, loader = dp.make_private(model, optimizer, data, batch_size)
        noised: Any = dp_optimizer  # an Opacus DPOptimizer
        self._module = model
        try:
            if dp._dataset_size != len(dataset):
                raise ConfigurationError(
                    "Under DP-SGD one record of the node's dataset is one training example: "
                    f"training_data() returned {dp._dataset_size} examples for "
                    f"{len(dataset)} records. Return one example per record, or ask for "
                    "update-level DP.")
            self._charge(self.poisson_rate(len(dataset), batch_size))
            plan.model = private
            stats = self._loop(plan, private, dp_optimizer, loader, training, device)
        finally:
            plan.model = dp.release()
        self.steps = dp.noised_steps
        if (noised.noise_multiplier, noised.max_grad_norm) != (
                self.spec.noise_multiplier, self.spec.clip):
            raise ConfigurationError("The DP optimizer's noise or clipping changed during the "
                                     "round: its update is withheld.")
        return stats

    def _loop(self, plan: Any, private: Any, optimizer: Any, loader: Any,
              training: LocalTraining, device: torch.device) -> dict[str, Any]:
        loop = LocalLoop(training)  # no progress: the loss would leave during the round
        state = _State(self._module)
        private.train()
        for _ in loop.epochs():
            for X, y in loop.batches(loader):
                X, y = convert.to_device(X, device), convert.to_device(y, device)
                optimizer.zero_grad(set_to_none=True)
                loss = None
                if len(y):
                    loss = plan.training_step(X, y)
                    loss.backward()
                else:  # an empty Poisson batch still takes a noised step
                    for p in optimizer.params:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype,
                                                    device=p.device)
                state.check()
                optimizer.step()
                state.snapshot()
                loop.step(len(y), loss=None if loss is None else loss.detach())
        state.check()
        return loop.stats(loop.mean_loss)

    def parameters(self, plan: Any) -> ParameterSet:  # noqa: D102
        if self._module is None:
            raise ConfigurationError("TorchPrivateTraining.parameters() before train().")
        return convert.get_parameters(self._module)


def _check_optimizer(optimizer: Any) -> None:
    """The optimizer must be torch's own: its step is the only code that moves the weights."""
    kind = type(optimizer)
    if not isinstance(optimizer, torch.optim.Optimizer) or \
            not kind.__module__.startswith("torch.optim."):
        raise ConfigurationError(
            "Under DP-SGD the node applies the noised gradients with one of torch.optim's "
            f"optimizers. init_optimizer() returned {kind.__module__}.{kind.__qualname__}. "
            "Return a torch.optim optimizer (SGD, Adam...), or ask for update-level DP.")


class _State:
    """The model's state between optimizer steps: nothing else may change it."""

    def __init__(self, module: Any):
        self.module = module
        self.snapshot()

    def snapshot(self) -> None:
        self.saved = {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def check(self) -> None:
        now = self.module.state_dict()
        changed = sorted(set(now) ^ set(self.saved)) or [
            k for k, v in now.items() if not torch.equal(v, self.saved[k])]
        if changed:
            raise ConfigurationError(
                f"The plan's code changed the model's {changed[:4]} outside the DP "
                "optimizer's step, so the node cannot vouch for DP-SGD: the round's update is "
                "withheld. Change the model only through training_step's loss.")

