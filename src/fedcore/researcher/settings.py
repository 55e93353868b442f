"""The settings of an Experiment: validated properties that may change between rounds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedcore import _runtime, plugins
from fedcore.aggregators import Aggregator
from fedcore.aggregators._local import check_supported
from fedcore.data.preprocessing import Preprocessing
from fedcore.errors import ConfigurationError
from fedcore.plan import PlanBundle, TrainingPlan, check_training_args
from fedcore.privacy.spec import PrivacySpec
from fedcore.researcher import monitoring
from fedcore.researcher.federation import Federation, Selection
from fedcore.researcher.strategies import AllNodes, Strategy
from fedcore.secagg import SecureAggregation, scheme_of

__all__ = ["ExperimentSettings", "session_of"]


class ExperimentSettings:
    """What an :class:`~fedcore.researcher.experiment.Experiment` is configured with.

    Every setting is a constructor argument of the experiment and a property here, checked
    when it is set (a wrong value is refused at once, not on every node in round 1).
    """

    _selection: Selection
    _session: Federation
    _owns_session: bool
    _secagg: SecureAggregation | None
    _strategy: Strategy
    _aggregator: Aggregator

    # --- configuration (validated setters) --------------------------------------------------

    @property
    def plan(self) -> type[TrainingPlan]:
        """The training plan class; setting it ships new source (nodes may re-approve)."""
        return self._plan

    @plan.setter
    def plan(self, plan: type[TrainingPlan]) -> None:
        bundle = PlanBundle.from_class(plan)
        # The aggregator's node side (FedProx, SCAFFOLD...) must be able to run on this plan.
        check_supported(getattr(self, "_aggregator", None), plan)
        self._bundle = bundle
        self._plan = plan

    @property
    def preprocessing(self) -> Preprocessing | None:
        """The fitted transform every node applies before training and evaluation.

        Made by ``FederatedStatistics.fit_preprocessing``; ``None``: none.
        """
        return self._preprocessing

    @preprocessing.setter
    def preprocessing(self, value: Preprocessing | Mapping[str, Any] | None) -> None:
        if value is not None and not isinstance(value, Preprocessing):
            if not isinstance(value, Mapping):
                raise ConfigurationError(
                    "Expected a Preprocessing (FederatedStatistics.fit_preprocessing()) or "
                    f"None. Received: {value!r}")
            value = Preprocessing.from_wire(value)
        self._preprocessing = value

    @property
    def plan_hash(self) -> str:
        """SHA-256 of the shipped plan, as node administrators see it."""
        return self._bundle.sha256

    @property
    def tags(self) -> list[str]:
        """Dataset tags to train on; changing them repeats the search."""
        return self._selection.tags

    @tags.setter
    def tags(self, tags: Sequence[str]) -> None:
        self._selection.tags = tags

    @property
    def nodes(self) -> list[str] | None:
        """Only these nodes take part (``None``: every node with matching data)."""
        return self._selection.nodes

    @nodes.setter
    def nodes(self, nodes: Sequence[str] | None) -> None:
        self._selection.nodes = nodes

    @property
    def federation(self) -> str:
        """The federation's URL; setting a URL or a :class:`Federation` reconnects there."""
        return self._session.url

    @federation.setter
    def federation(self, value: str | Federation) -> None:
        old = self._session
        if self._owns_session and old.connected:
            _runtime.submit(old.aclose())
        self._session = session_of(value, old.identity, old.enrolled, old.connect_timeout)
        self._owns_session = not isinstance(value, Federation)
        self._selection.targets = None

    @property
    def session(self) -> Federation:
        """The :class:`~fedcore.researcher.federation.Federation` this experiment talks over."""
        return self._session

    @property
    def identity(self) -> str | Path | None:
        """The researcher's key file (``None``: ``$FEDCORE_IDENTITY`` or the default)."""
        return self._session.identity

    @identity.setter
    def identity(self, value: str | Path | None) -> None:
        self._session.identity = value

    @property
    def enrolled(self) -> Mapping[str, str] | str | Path | None:
        """The nodes accepted on a network (``{node_id: key}`` or a ``nodes.toml`` path)."""
        return self._session.enrolled

    @enrolled.setter
    def enrolled(self, value: Mapping[str, str] | str | Path | None) -> None:
        self._session.enrolled = value

    @property
    def connect_timeout(self) -> float:
        """How long connecting and searching wait for the nodes, in seconds."""
        return self._session.connect_timeout

    @connect_timeout.setter
    def connect_timeout(self, value: float) -> None:
        self._session.connect_timeout = float(value)

    @property
    def model_args(self) -> dict[str, Any]:
        """Arguments that shape the model; may change between rounds."""
        return dict(self._model_args)

    @model_args.setter
    def model_args(self, value: Mapping[str, Any]) -> None:
        self._model_args = _as_dict(value, "model_args")

    @property
    def training_args(self) -> dict[str, Any]:
        """Arguments of local training (epochs, batch size, learning rate...)."""
        return dict(self._training_args)

    @training_args.setter
    def training_args(self, value: Mapping[str, Any]) -> None:
        value = _as_dict(value, "training_args")
        check_training_args(self.plan, value)  # a misspelt key fails here, not on the nodes
        self._training_args = value

    @property
    def aggregator(self) -> Aggregator:
        """How node updates become the next global model."""
        return self._aggregator

    @aggregator.setter
    def aggregator(self, value: str | Aggregator) -> None:
        if isinstance(value, str):
            value = plugins.load("aggregators", value)()
        if not isinstance(value, Aggregator):
            raise ConfigurationError(
                f"Expected an Aggregator or a registered aggregator name. Received: {value!r}"
            )
        check_supported(value, self.plan)  # refused now, not on every node in round 1
        _check_secure(value, self._secagg, self._strategy)
        self._aggregator = value

    @property
    def secagg(self) -> SecureAggregation | None:
        """Secure aggregation (:mod:`fedcore.secagg`): the researcher learns only the sum.

        ``"masking"`` (pairwise masking, survives nodes that drop out), ``"joye-libert"``
        (homomorphic encryption), a configured scheme object, or ``None`` (updates in
        clear). Needs a sum-only aggregator (FedAvg, FedProx, SCAFFOLD, FedAdam...).
        """
        return self._secagg

    @secagg.setter
    def secagg(self, value: str | SecureAggregation | None) -> None:
        value = scheme_of(value)
        _check_secure(self._aggregator, value, self._strategy)
        self._secagg = value

    @property
    def privacy(self) -> dict[str, Any]:
        """Differential privacy asked of every node (``{}``: none); see the DP docs.

        ``{"mechanism": "update", "clip": 1.0, "noise_multiplier": 1.1, "delta": 1e-5}``
        (update-level DP, any backend) or ``"mechanism": "dp-sgd"`` (torch, through
        Opacus). Each node reports what it spent in :attr:`history` (``privacy_epsilon``,
        ``privacy_epsilon_total``) and may refuse a round that would exceed its budget.
        """
        return dict(self._privacy)

    @privacy.setter
    def privacy(self, value: Mapping[str, Any] | None) -> None:
        spec = PrivacySpec.parse(value)
        self._privacy = {} if spec is None else spec.to_dict()

    @property
    def strategy(self) -> Strategy:
        """Which nodes train each round, the quorum and the deadline.

        See :mod:`fedcore.researcher.strategies`.

        Default :class:`~fedcore.researcher.strategies.AllNodes`: every node holding the data, no
        deadline beyond ``timeout``, and a round counts when at least one node answered.
        """
        return self._strategy

    @strategy.setter
    def strategy(self, value: Strategy | None) -> None:
        if value is None:
            value = AllNodes()
        if not isinstance(value, Strategy):
            raise ConfigurationError(
                f"Expected a fedcore.researcher.strategies.Strategy (e.g. AllNodes(), "
                f"Fraction(0.5)). "
                f"Received: {value!r}")
        _check_secure(self._aggregator, self._secagg, value)
        self._strategy = value

    @property
    def test_ratio(self) -> float:
        """Fraction of each node's samples held out for evaluation."""
        return self._test_ratio

    @test_ratio.setter
    def test_ratio(self, value: float) -> None:
        if not 0.0 <= float(value) < 1.0:
            raise ConfigurationError(f"test_ratio must be in [0, 1). Received: {value!r}")
        self._test_ratio = float(value)

    @property
    def round_limit(self) -> int | None:
        """Total number of rounds :meth:`run` goes up to."""
        return self._round_limit

    @round_limit.setter
    def round_limit(self, value: int | None) -> None:
        if value is not None and int(value) < 0:
            raise ConfigurationError(f"round_limit must be >= 0. Received: {value!r}")
        self._round_limit = None if value is None else int(value)

    @property
    def tensorboard(self) -> Path | None:
        """TensorBoard log folder: each completed round is appended (``docs/monitoring.md``)."""
        return None if self._tensorboard is None else self._tensorboard.logdir

    @tensorboard.setter
    def tensorboard(self, logdir: str | Path | None) -> None:
        self._tensorboard = None if logdir is None else monitoring.TensorBoardWriter(logdir)


def _check_secure(aggregator: Aggregator | None, secagg: SecureAggregation | None,
                  strategy: Strategy) -> None:
    if secagg is None:
        return
    if aggregator is not None and not aggregator.sum_only:
        raise ConfigurationError(
            f"{type(aggregator).__name__} needs each node's update in clear, which secure "
            f"aggregation ({secagg.name}) hides. Use a sum-only aggregator (FedAvg, FedProx, "
            "SCAFFOLD, FedAdam, FedYogi, FedAdagrad, FedAvgM) or secagg=None.")
    if type(strategy).weight is not Strategy.weight:
        # Under secure aggregation the node weights its update before protecting it; the
        # researcher only ever sees the sum, so it cannot apply another weight afterwards.
        raise ConfigurationError(
            f"{type(strategy).__name__} overrides weight(), which secure aggregation "
            f"({secagg.name}) cannot apply: each node weights its own update before "
            "protecting it, by its sample count or by 1, and the researcher sees only the "
            "sum. Use the strategy's weighting='samples' or 'uniform' instead of a custom "
            "weight(), or secagg=None.")


def _as_dict(value: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"{what} must be a dict. Received: {type(value).__name__}")
    return dict(value)



def session_of(federation: str | Federation, identity: str | Path | None,
                enrolled: Mapping[str, str] | str | Path | None,
                connect_timeout: float) -> Federation:
    """The experiment's session: the one given, or a new one for a URL."""
    if isinstance(federation, Federation):
        return federation
    return Federation(federation, identity=identity, enrolled=enrolled,
                      connect_timeout=connect_timeout)
