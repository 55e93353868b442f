"""What leaves a node that trains under differential privacy: only what the noise covers.

A round under DP (update-level or DP-SGD) replies with the privatised parameters and what
the node computes from them alone. Everything else training produced is data the noise does
not cover, so the node keeps it:

- integer and boolean parameters (counters such as ``num_batches_tracked``) cannot carry
  noise: the reply holds the global model's values for them;
- a local algorithm's extras (SCAFFOLD's control-variate delta) are computed from the
  released parameters, never from the clean local model; an algorithm that cannot promise
  that (``LocalAlgorithm.private_extras``) is refused under DP before training;
- evaluation metrics, what training reported (loss, steps) and the loss of progress
  messages are withheld: the reply leaves them empty and ``TrainReply.privacy["withheld"]``
  names them; timings shrink to the round's total, which the researcher sees anyway.

:class:`PrivateRelease` is the layer the node's round executor runs around training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from fedcore.errors import ConfigurationError
from fedcore.params import ParameterSet
from fedcore.privacy.mechanisms import UpdateDP
from fedcore.privacy.spec import PrivacySpec

if TYPE_CHECKING:
    from fedcore.aggregators._local import LocalAlgorithm
    from fedcore.plan import TrainingPlan
    from fedcore.privacy.dpsgd import PrivateTraining
    from fedcore.wire.messages import TrainReply

__all__ = ["PrivateRelease", "keep_integers_local"]


def keep_integers_local(global_params: Mapping[str, np.ndarray],
                        local_params: Mapping[str, Any]) -> ParameterSet:
    """``local_params`` with every non-float parameter replaced by its global value."""
    return ParameterSet(
        (k, np.asarray(local_params[k]) if np.asarray(g).dtype.kind == "f"
         else np.array(g, copy=True)) for k, g in global_params.items())


class PrivateRelease:
    """The node's DP layer around one round: what goes in, what may come out.

    Example (what ``fedcore.node.executor.run_round`` does)::

        release = PrivateRelease.of(request.privacy)       # None without DP
        plan.progress_callback = release.progress(callback)  # no loss in progress
        release.check(algorithm)                           # extras must come from the release
        ...train...
        params, spent = release.apply(plan, request.params)  # noised; the plan holds them
        extras = algorithm.after_fit(plan, request.params, state)
        reply = release.reply(reply)                        # metrics withheld
    """

    def __init__(self, spec: PrivacySpec):
        self.spec = spec

    @classmethod
    def of(cls, privacy: PrivacySpec | Mapping[str, Any] | None) -> PrivateRelease | None:
        """The layer for a request's ``privacy`` (``None`` when it asks for no DP)."""
        spec = PrivacySpec.parse(privacy)
        return None if spec is None else cls(spec)

    def __repr__(self) -> str:
        return f"PrivateRelease({self.spec!r})"

    @staticmethod
    def progress(callback: Callable[..., None] | None) -> Callable[..., None] | None:
        """``callback`` without the training loss (steps and epochs carry no data)."""
        if callback is None:
            return None

        def report(**fields: Any) -> None:
            callback(**{**fields, "loss": None})

        return report

    def check(self, algorithm: LocalAlgorithm | None) -> None:
        """Refuse an algorithm whose extras would not derive from the released model."""
        if algorithm is None or algorithm.private_extras:
            return
        from fedcore.aggregators._local import LocalAlgorithm  # noqa: PLC0415 - same layer

        if type(algorithm).after_fit is LocalAlgorithm.after_fit:
            return  # it returns nothing
        title = algorithm.title or type(algorithm).__name__
        raise ConfigurationError(
            f"{title} returns values computed from local training that differential privacy "
            "does not cover, and does not declare that it computes them from the released "
            "(noised) model (LocalAlgorithm.private_extras). Refused under DP: use FedAvg, "
            "FedProx or SCAFFOLD, or train without DP.")

    def apply(self, plan: TrainingPlan, global_params: ParameterSet,
              private: PrivateTraining | None = None) -> tuple[ParameterSet, dict[str, Any]]:
        """The parameters that may leave, and what they cost (``TrainReply.privacy``).

        Update-level DP clips and noises the update; DP-SGD's model is released as the
        node's ``private`` training left it (read by the backend, charged at its own count:
        :mod:`fedcore.privacy.dpsgd`). Either way integer parameters keep their global
        values. The plan is set to the released parameters, so whatever is computed from it
        afterwards (a local algorithm's extras) is post-processing of the noised release.
        """
        if self.spec.mechanism == "update":
            # The update's norm and whether it was clipped depend on the data: not replied.
            dp = UpdateDP.from_spec(self.spec)
            params, _ = dp.apply(global_params, ParameterSet(plan.get_parameters()))
            events = [dp.event()]
        else:
            if private is None:
                raise ConfigurationError("DP-SGD is released only from the node's own "
                                         "PrivateTraining, which ran no round here.")
            params = keep_integers_local(global_params, private.parameters(plan))
            events = private.events()
        plan.set_parameters(params)
        return params, self.spec.reply(events)

    @staticmethod
    def reply(reply: TrainReply) -> TrainReply:
        """``reply`` without what the noise does not cover (see the module docstring)."""
        total = reply.timings.get("total_s")
        return dataclasses.replace(
            reply, metrics_global={}, metrics_local={}, train_stats={},
            timings={} if total is None else {"total_s": total})
