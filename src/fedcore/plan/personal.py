"""Local parameters: the part of a model that stays on each node (FedBN, FedPer).

A plan lists names or glob patterns in ``TrainingPlan.local_parameters`` (``("head.*",)``
for a personal head, ``("*bn*",)`` for batch-norm weights and statistics). The list is part
of the plan's source, so of the hash the nodes approve: a researcher cannot ask a node to
send them in a request. On the node (:class:`LocalParameters`, in
:func:`fedcore.node.executor.run_round`):

- the global model the researcher sends never sets them (values sent under those names are
  ignored); the node restores its own from the previous round, or keeps the freshly built
  model's values in the first round;
- after training they are saved in the node home (:class:`~fedcore.aggregators._local.LocalState`,
  per experiment and dataset, written atomically) and left out of the reply: they are in
  no frame the node sends.

The researcher's global model (:func:`shared`) never holds them, so the aggregators only
ever see the shared parameters.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from fedcore.errors import ConfigurationError
from fedcore.params import ParameterSet

if TYPE_CHECKING:
    from fedcore.aggregators._local import LocalState
    from fedcore.plan.base import TrainingPlan

__all__ = ["LocalParameters", "local_names", "patterns", "shared"]

#: The name under which a node keeps the local parameters in its :class:`LocalState`.
STATE = "local-parameters"
#: The name under which a node keeps the whole model it fine-tuned after federation.
FINE_TUNED = "fine-tuned"


def patterns(plan_class: type[TrainingPlan]) -> tuple[str, ...]:
    """The plan's local-parameter patterns, checked (a tuple of non-empty strings)."""
    value = getattr(plan_class, "local_parameters", ())
    if isinstance(value, str) or not all(isinstance(p, str) and p for p in value):
        raise ConfigurationError(
            f"Expected {plan_class.__name__}.local_parameters to be a tuple of parameter "
            f"names or glob patterns, e.g. ('head.*',) or ('*bn*',). Received: {value!r}")
    return tuple(value)


def local_names(names: Iterable[str], pats: Iterable[str]) -> list[str]:
    """The ``names`` that match one of the patterns ``pats`` (``fnmatch``, case-sensitive)."""
    pats = tuple(pats)
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]


def shared(plan_class: type[TrainingPlan], params: ParameterSet) -> ParameterSet:
    """``params`` without the plan's local parameters: the global model the federation shares.

    Raises :class:`ConfigurationError` when a pattern matches no parameter (a typo would
    otherwise share what was meant to stay), or when every parameter is local.
    """
    pats = patterns(plan_class)
    if not pats:
        return params
    unused = [p for p in pats if not local_names(params, [p])]
    if unused:
        raise ConfigurationError(
            f"{plan_class.__name__}.local_parameters: {unused} match no parameter of the "
            f"model. Its parameters are {list(params)[:20]}; fix the names or patterns.")
    local = set(local_names(params, pats))
    if len(local) == len(params):
        raise ConfigurationError(
            f"{plan_class.__name__}.local_parameters {list(pats)} match every parameter, so "
            "nothing would be federated. Keep only the personal part local (a head, the "
            "batch-norm layers).")
    return ParameterSet((n, a) for n, a in params.items() if n not in local)


class LocalParameters:
    """A node's handling of one round's local parameters (see the module docstring)."""

    def __init__(self, plan_class: type[TrainingPlan], state: LocalState | None):
        self.patterns = patterns(plan_class)
        if self.patterns and state is None:
            raise ConfigurationError(
                f"{plan_class.__name__} keeps local parameters on the node: pass run_round "
                "a LocalState (the node gives one in its home).")
        self.state = state

    @property
    def active(self) -> bool:
        """True when the plan has local parameters."""
        return bool(self.patterns)

    def start(self, plan: TrainingPlan, global_params: ParameterSet) -> ParameterSet:
        """The model this round starts from: the global shared part and the node's own.

        Sets ``plan`` to it and returns it (the reference of DP and of the local algorithm).
        """
        if not self.active:
            plan.set_parameters(global_params)
            return global_params
        assert self.state is not None
        current = plan.get_parameters()
        local = set(local_names(current, self.patterns))
        saved = _saved(self.state.load(STATE))
        merged = {}
        for name, array in current.items():
            if name in local:
                value = saved.get(name)
                ok = value is not None and value.shape == array.shape \
                    and value.dtype == array.dtype
                merged[name] = value if ok else array.copy()
            elif name in global_params:
                merged[name] = global_params[name]
            else:
                raise ConfigurationError(
                    f"The global model lacks the shared parameter {name!r} of this plan: "
                    "send the experiment's global model (it leaves out only the local "
                    "parameters).")
        start = ParameterSet(merged)
        plan.set_parameters(start)
        return start

    def keep(self, params: ParameterSet, trained: ParameterSet | None = None
             ) -> ParameterSet:
        """Save the local parameters; return the shared ones of ``params``.

        The local values come from ``trained`` when given (the model before a DP release
        noised it: they never leave, so they need no noise), else from ``params``.
        """
        if not self.active:
            return params
        assert self.state is not None
        local = set(local_names(params, self.patterns))
        source = params if trained is None else trained
        self.state.save(STATE, {"params": ParameterSet(
            (n, np.array(source[n], copy=True)) for n in params if n in local)})
        return ParameterSet((n, a) for n, a in params.items() if n not in local)

    def keep_fine_tuned(self, params: ParameterSet) -> None:
        """Save the whole fine-tuned model on the node (nothing of it is replied)."""
        if self.state is None:
            raise ConfigurationError("Fine-tuning keeps the model on the node: pass run_round "
                                     "a LocalState (the node gives one in its home).")
        self.state.save(FINE_TUNED, {"params": ParameterSet(
            (n, a.copy()) for n, a in params.items())})


def _saved(value: Mapping[str, Any] | None) -> dict[str, Any]:
    params = (value or {}).get("params")
    return dict(params.items()) if isinstance(params, Mapping) else {}
