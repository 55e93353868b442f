"""The node side of an aggregation algorithm: hooks around a plan's local training.

An aggregator whose algorithm changes local training (FedProx's proximal term, SCAFFOLD's
gradient correction) names a :class:`LocalAlgorithm` subclass in its ``local_algorithm``
class attribute. The researcher ships ``Aggregator.round_options()`` in every training
request (``TrainRequest.algorithm``, with the registry ``name``); the node finds the
aggregator class through :func:`fedcore.plugins.load` and builds
``local_algorithm(options)``, so a plug-in aggregator ships its node side the same way.

A round on the node then runs::

    plan.reset_local_algorithm()
    algorithm.before_fit(plan, global_params, state)    # sets plan.proximal, ...
    plan.fit(train, seed)                                # the backend applies them
    extras = algorithm.after_fit(plan, global_params, state)   # -> TrainReply.extras

Under differential privacy the node sets the plan to the released (noised) parameters
between ``fit`` and ``after_fit`` (:mod:`fedcore.privacy.release`).

What a backend must do (torch and scikit-learn do it; TF and JAX backends will too): declare
in ``TrainingPlan.supports`` the features its ``fit`` implements, and implement them as
documented in :meth:`fedcore.plan.TrainingPlan.reset_local_algorithm`:

- ``"proximal"``: add ``mu * (w - w_global)`` to each trained parameter's gradient (or
  ``mu / 2 * ||w - w_global||^2`` to the loss) at every step, from ``plan.proximal``;
- ``"gradient_correction"``: add ``plan.gradient_correction[name]`` to each trained
  parameter's gradient after it is computed and before the optimizer steps, count the
  steps and set ``plan.local_steps`` (:class:`~fedcore.plan.LocalSteps`).

:class:`LocalState` keeps what the node side carries from round to round (SCAFFOLD's
control variate ``c_i``) in the node's home, per experiment and dataset.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fedcore import plugins
from fedcore._files import write_atomic
from fedcore.errors import ConfigurationError, ProtocolError
from fedcore.wire import codec
from fedcore.wire.messages import Checkpoint, Envelope

if TYPE_CHECKING:
    from fedcore.params import ParameterSet
    from fedcore.plan import TrainingPlan

__all__ = ["LocalAlgorithm", "LocalState", "check_supported", "local_algorithm"]

log = logging.getLogger("fedcore.node")

_KIND = "fedcore-node-algorithm-state"
_VERSIONS = 4  # rounds of state kept, so that a round replayed after a resume finds its own
_NAME = re.compile(r"[A-Za-z0-9_-]+")


class LocalAlgorithm:
    """Hooks an aggregation algorithm runs on the node around ``plan.fit``.

    Built once per round from the aggregator's ``round_options()``. Subclasses set
    ``title`` (for messages), ``requires`` (the plan features they need, see
    ``TrainingPlan.supports``) and ``hint`` (what to use instead when a plan lacks them).
    """

    title: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    hint: ClassVar[str] = "Use a plan whose backend supports it, or FedAvg."
    #: ``True`` when :meth:`after_fit` computes its extras only from the plan's parameters
    #: (and values the node saved or the researcher sent), never from training's internals.
    #: Under differential privacy the node sets the plan to the released, noised parameters
    #: before ``after_fit``, so such extras are post-processing of the release; an
    #: algorithm that returns extras without this promise is refused under DP.
    private_extras: ClassVar[bool] = False

    def __init__(self, options: Mapping[str, Any]):
        self.options = dict(options)

    def before_fit(self, plan: TrainingPlan, global_params: ParameterSet,
                   state: LocalState) -> None:
        """Prepare ``plan`` for this round's local training (set ``plan.proximal``...)."""

    def after_fit(self, plan: TrainingPlan, global_params: ParameterSet,
                  state: LocalState) -> dict[str, Any]:
        """After training: update the node's state; return the reply's ``extras``."""
        return {}

    @classmethod
    def check(cls, plan_class: type[TrainingPlan]) -> None:
        """Raise :class:`ConfigurationError` when ``plan_class`` lacks a required feature."""
        missing = sorted(cls.requires - plan_class.supports)
        if missing:
            title = cls.title or cls.__name__
            raise ConfigurationError(
                f"{title} needs {' and '.join(missing)}, which {plan_class.__name__} "
                f"(backend {plan_class.backend!r}) does not support. {cls.hint}"
            )


def _local_class(aggregator: Any) -> type[LocalAlgorithm] | None:
    local = getattr(aggregator, "local_algorithm", None)
    return local if isinstance(local, type) and issubclass(local, LocalAlgorithm) else None


def check_supported(aggregator: Any, plan_class: type[TrainingPlan]) -> None:
    """Refuse an aggregator (instance or class) whose node side ``plan_class`` cannot run."""
    local = _local_class(aggregator)
    if local is not None:
        local.check(plan_class)


def local_algorithm(options: Mapping[str, Any],
                    plan_class: type[TrainingPlan] | None = None) -> LocalAlgorithm | None:
    """The node side named by ``options["name"]`` (``None`` when there is nothing to do).

    Raises :class:`ConfigurationError` for an unknown name, and when ``plan_class`` lacks a
    feature the algorithm needs.
    """
    if not options:
        return None
    name = options.get("name") if isinstance(options, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ConfigurationError(
            "Expected the training request's algorithm options to name their aggregator, "
            f"e.g. {{'name': 'fedprox', 'mu': 0.01}}. Received: {dict(options)!r}")
    try:
        aggregator = plugins.load("aggregators", name)
    except ConfigurationError as exc:
        raise ConfigurationError(
            f"This node cannot run the node side of aggregator {name!r}: {exc} Install the "
            "package that provides it on the node, or choose another aggregator.") from exc
    local = _local_class(aggregator)
    if local is None:
        return None  # the aggregator changes nothing in local training
    if plan_class is not None:
        local.check(plan_class)
    return local(options)


class LocalState:
    """What a node keeps between rounds for one experiment and dataset (``c_i``...).

    Values live in the node home's ``algorithms/`` folder (``folder``), one subfolder per
    experiment and dataset and one file per algorithm and round, written atomically with
    fedcore's codec (never pickle), so they survive a node restart. :meth:`load` returns the
    value saved in the newest round before this one, so a round the researcher replays after
    resuming from an earlier checkpoint starts from the same state as the first time; the
    newest few rounds are kept.
    """

    def __init__(self, folder: str | Path, experiment: str, dataset: str, round: int):
        self.folder = Path(folder)
        self.experiment = str(experiment)
        self.dataset = str(dataset)
        self.round = int(round)
        # The experiment id comes from the researcher: hash it rather than trust it as a name.
        key = f"{self.experiment}\0{self.dataset}".encode()
        self.path = self.folder / hashlib.sha256(key).hexdigest()[:32]

    def _rounds(self, algorithm: str) -> dict[int, Path]:
        if not _NAME.fullmatch(algorithm):
            raise ConfigurationError(
                f"Expected an algorithm name of letters, digits, '-' and '_'. Received: "
                f"{algorithm!r}")
        found: dict[int, Path] = {}
        for path in self.path.glob(f"{algorithm}.*.fedcore"):
            number = path.name[len(algorithm) + 1 : -len(".fedcore")]
            if number.isdigit():
                found[int(number)] = path
        return found

    def load(self, algorithm: str) -> dict[str, Any] | None:
        """The value saved in the newest round before this one (``None``: none yet)."""
        rounds = self._rounds(algorithm)
        earlier = [r for r in rounds if r < self.round]
        if not earlier:
            if rounds:
                log.warning("No %s state from before round %d of experiment %s (the node "
                            "kept rounds %s): starting afresh.", algorithm, self.round,
                            self.experiment, sorted(rounds))
            return None
        path = rounds[max(earlier)]
        try:
            body = codec.decode(path.read_bytes()).body
        except (OSError, ProtocolError) as exc:
            log.error("Ignored the unreadable state file %s (%s); starting afresh.", path, exc)
            return None
        state = body.state if isinstance(body, Checkpoint) else {}
        if state.get("kind") != _KIND or not isinstance(state.get("value"), dict):
            log.error("Ignored %s: not a node algorithm state; starting afresh.", path)
            return None
        return dict(state["value"])

    def save(self, algorithm: str, value: Mapping[str, Any]) -> Path:
        """Keep ``value`` (numbers, strings, arrays, ParameterSets...) as this round's."""
        rounds = self._rounds(algorithm)
        self.path.mkdir(parents=True, exist_ok=True)
        state = {"kind": _KIND, "algorithm": algorithm, "experiment": self.experiment,
                 "dataset": self.dataset, "round": self.round, "value": dict(value)}
        written = write_atomic(self._file(algorithm, self.round),
                               codec.encode(Envelope(Checkpoint(state=state))))
        for old in sorted({*rounds, self.round})[:-_VERSIONS]:
            self._file(algorithm, old).unlink(missing_ok=True)
        return written

    def _file(self, algorithm: str, round: int) -> Path:
        return self.path / f"{algorithm}.{round:06d}.fedcore"
