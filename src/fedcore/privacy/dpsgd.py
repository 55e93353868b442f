"""DP-SGD run by the node's installed backend around a plan, and charged by the node.

A plan is the researcher's code: a plan that trains without the DP optimizer, or that
reports less than it spent, must not be able to make the node release an un-noised model
while its ledger stays at epsilon 0. So DP-SGD is not a method of the plan. A backend that
can run it names a :class:`PrivateTraining` in its base plan class's ``private_training``;
the node reaches that class through the plug-in registry (the backend installed on the node,
never an attribute of the researcher's class), checks with :func:`check_wrappable` that the
plan leaves alone what the wrapper relies on, and lets the wrapper run the round around the
plan's pieces (its model, optimizer, data and per-batch step). What the round spent is
:meth:`PrivateTraining.events`: the noise multiplier the wrapper enforced, the sampling rate
of the node's own data size and the noised optimizer steps the wrapper counted. Nothing the
plan reports is read.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

from fedcore.errors import ConfigurationError, GovernanceError
from fedcore.params import ParameterSet
from fedcore.plan.training import LocalTraining
from fedcore.privacy.accountant import Event
from fedcore.privacy.spec import PrivacySpec, dpsgd_schedule

__all__ = ["PrivateTraining", "check_wrappable"]

#: Names no plan may redefine when the node runs DP-SGD around it: the loop the wrapper
#: replaces, and the hook that names the wrapper.
_ALWAYS = ("fit", "private_training")
_HELP = ("Train through the backend's standard loop (override training_step, init_optimizer "
         "and training_data only), or ask for update-level DP instead: privacy={'mechanism': "
         "'update', ...} works with any plan.")


class PrivateTraining(abc.ABC):
    """One round of DP-SGD that a backend runs around a plan, and what it spent.

    A new instance per round, built from the DP parameters the node enforces. :meth:`train`
    runs the whole round (the plan's :meth:`~fedcore.plan.TrainingPlan.fit` is not called),
    :meth:`parameters` reads the trained model, :meth:`events` is the node's account.
    Subclasses set :attr:`relies_on`, call :meth:`_charge` with the sampling rate of the
    node's own data size before the first step, and count every noised optimizer step in
    :attr:`steps`.
    """

    #: Methods of the backend's base plan class the wrapper calls through, or replaces:
    #: a plan class that redefines one of them is refused (:func:`check_wrappable`).
    relies_on: ClassVar[tuple[str, ...]] = ("get_parameters",)

    def __init__(self, spec: PrivacySpec):
        if spec.mechanism != "dp-sgd":
            raise ConfigurationError(f"{type(self).__name__} runs the 'dp-sgd' mechanism. "
                                     f"Received: {spec.mechanism!r}")
        self.spec = spec
        #: Optimizer steps taken with clipping and noise (counted by the wrapper).
        self.steps = 0
        self._rate: float | None = None

    def __repr__(self) -> str:
        s = self.spec
        return (f"{type(self).__name__}(noise_multiplier={s.noise_multiplier!r}, "
                f"clip={s.clip!r}, delta={s.delta!r})")

    @abc.abstractmethod
    def train(self, plan: Any, dataset: Any, seed: int,
              training: LocalTraining) -> dict[str, Any]:
        """Train ``plan``'s model on ``dataset`` with DP-SGD; the training statistics.

        ``training`` holds the epochs, batch size and step cap as the node read them from
        the request (after its policies), not as the plan parses them. ``seed`` seeds the
        plan's own randomness (dropout, initialisation); sampling and noise come from the
        operating system's CSPRNG.
        """

    @abc.abstractmethod
    def parameters(self, plan: Any) -> ParameterSet:
        """The parameters of the model :meth:`train` trained, read by the backend."""

    @staticmethod
    def _refuse_corrections(plan: Any, reason: str = "") -> None:
        """Refuse FedProx's proximal term and SCAFFOLD's correction, which DP-SGD would skip.

        Both change the gradients after the wrapper clipped and noised them (or before a
        library recomputes them): the round would train something else than it accounts.
        """
        if (plan.proximal is not None and plan.proximal[0]) or \
                plan.gradient_correction is not None:
            why = f": {reason}" if reason else ""
            raise ConfigurationError(
                f"DP-SGD cannot be combined with FedProx or SCAFFOLD on a node{why}. Use "
                "FedAvg, or update-level DP (privacy={'mechanism': 'update', ...}).")

    def _charge(self, sample_rate: float) -> None:
        """Fix the rate the round is charged at (from the node's data size, not the plan's)."""
        self._rate = float(sample_rate)

    @staticmethod
    def poisson_rate(n_train: int, batch_size: int) -> float:
        """Opacus's Poisson rate for ``n_train`` records in batches of ``batch_size``."""
        return dpsgd_schedule(n_train, batch_size=batch_size)[0]

    @property
    def sample_rate(self) -> float:
        """The Poisson rate at which a record joins a batch (known once training started)."""
        if self._rate is None:
            raise ConfigurationError(f"{type(self).__name__}.sample_rate is known once "
                                     "train() has started.")
        return self._rate

    def events(self) -> list[Event]:
        """The round's cost: ``[(noise_multiplier, sample_rate, steps)]``, ``[]`` if no step."""
        if not self.steps:
            return []
        return [Event(self.spec.noise_multiplier, self.sample_rate, self.steps)]


def check_wrappable(plan_class: type, base: type, spec: PrivacySpec) -> PrivateTraining:
    """The backend's DP-SGD for one round of ``plan_class``, or why the node refuses it.

    ``base`` is the backend's plan class as the node installed it (from the plug-in
    registry). Refused (:class:`~fedcore.errors.GovernanceError`, with the reason): a backend
    without DP-SGD, a plan class that does not subclass ``base``, and a plan class that
    redefines a method the wrapper relies on (its MRO is compared with ``base``'s).
    """
    factory = getattr(base, "private_training", None)
    backend = getattr(base, "backend", "") or base.__name__
    if factory is None:
        raise GovernanceError(
            f"DP-SGD was asked for, which the {backend!r} backend installed on this node does "
            f"not support (plan {plan_class.__name__}). Use privacy={{'mechanism': 'update', "
            "...}} (update-level DP works with every backend), or a torch plan.")
    if not (isinstance(plan_class, type) and issubclass(plan_class, base)):
        raise GovernanceError(
            f"Plan {getattr(plan_class, '__name__', plan_class)!r} does not subclass "
            f"{base.__name__}, the {backend!r} backend's plan installed on this node, so the "
            "node cannot apply DP-SGD around it. Subclass it, or ask for update-level DP.")
    owned = set(base.__mro__)
    for name in (*_ALWAYS, *factory.relies_on):
        owner = next((k for k in plan_class.__mro__ if name in vars(k)), None)
        if owner is not None and owner not in owned:
            raise GovernanceError(
                f"Plan {plan_class.__name__!r} overrides `{name}` (in {owner.__name__}), so "
                f"the node cannot apply DP-SGD around it: the node's {base.__name__} runs the "
                f"training loop and reads the trained model itself. {_HELP}")
    training = factory(spec)
    if not isinstance(training, PrivateTraining):
        raise GovernanceError(f"The {backend!r} backend's private_training is not a "
                              "PrivateTraining: the node cannot account for it.")
    return training
