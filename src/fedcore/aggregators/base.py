from __future__ import annotations

import abc
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from fedcore.errors import ConfigurationError
from fedcore.params import ParameterSet


class Aggregator(abc.ABC):
    """Folds node updates, one at a time, into the next global model.

    A round calls :meth:`start` with the current global parameters, :meth:`add` once per
    successful node (in a fixed node order, so results are reproducible), then
    :meth:`result`. Streaming aggregators keep memory O(model) whatever the number of nodes;
    those that need every update at once set ``streaming = False``.

    Configuration lives in the constructor (see :meth:`get_params`); state that must survive
    a checkpoint is returned by :meth:`state_dict`.
    """

    name: ClassVar[str] = ""
    streaming: ClassVar[bool] = True
    #: True when the aggregator only needs weighted sums of the updates (and of their
    #: ``extras``), so it works under secure aggregation, which reveals nothing but sums.
    sum_only: ClassVar[bool] = False

    @abc.abstractmethod
    def start(self, global_params: ParameterSet, round: int) -> None:
        """Begin a round from ``global_params``."""

    @abc.abstractmethod
    def add(self, update: ParameterSet, weight: float, node: str = "",
            extras: Mapping[str, Any] | None = None) -> None:
        """Fold one node's update, weighted by ``weight`` (usually its sample count).

        ``extras`` is what the node's side of the algorithm sent besides the parameters
        (``TrainReply.extras``: e.g. SCAFFOLD's control-variate delta).
        """

    def add_sum(self, sums: ParameterSet, total_weight: float, nodes: Sequence[str],
                extras: Mapping[str, ParameterSet] | None = None) -> None:
        """Fold the secure sum of several nodes' updates (secure aggregation reveals no more).

        ``sums`` is ``sum(weight_i * update_i)`` over ``nodes``, ``total_weight`` the sum of
        their weights and ``extras`` the same weighted sums of their ``extras``. Sum-only
        aggregators get this for free: it folds the weighted mean as one update of weight
        ``total_weight``; an aggregator whose extras combine otherwise overrides it.
        """
        if not self.sum_only:
            raise ConfigurationError(
                f"{type(self).__name__} needs each node's update in clear, which secure "
                "aggregation hides: use a sum-only aggregator (FedAvg, FedProx, SCAFFOLD, "
                "FedAdam...) or secagg=None.")
        if not total_weight > 0:
            raise ConfigurationError(f"Expected a positive total weight. Received "
                                     f"{total_weight!r}.")
        mean = ParameterSet((k, v / total_weight) for k, v in sums.items())
        extras_mean = {k: ParameterSet((n, v / total_weight) for n, v in ps.items())
                       for k, ps in (extras or {}).items()}
        self.add(mean, total_weight, f"secure sum of {len(nodes)} nodes", extras_mean)

    def round_options(self) -> dict[str, Any]:
        """Options shipped to every node with this round's training request.

        They reach the node's side of the algorithm (``TrainRequest.algorithm``), e.g.
        FedProx's ``mu`` or SCAFFOLD's server control variate. Default: none.
        """
        return {}

    @abc.abstractmethod
    def result(self) -> ParameterSet:
        """The aggregated parameters; raises if no update was added."""

    def get_params(self) -> dict[str, Any]:
        """Constructor arguments, for inspection, cloning and checkpoints."""
        sig = inspect.signature(type(self).__init__)
        return {
            name: getattr(self, name)
            for name in sig.parameters
            if name != "self" and hasattr(self, name)
        }

    def state_dict(self) -> dict[str, Any]:
        """Learned state carried across rounds (server momentum...); empty by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"
