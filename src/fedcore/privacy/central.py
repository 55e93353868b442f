"""Central differential privacy: the researcher clips each node's update and noises the mean.

This is DP-FedAvg (McMahan et al., 2018) with node-level guarantees: whatever one node's
data, the released global model changes little. It **trusts the researcher**: the
aggregator sees every node's update in the clear before noising it, so it protects the
released models (what other researchers, a published model or later rounds reveal), not
the updates against the researcher. Nodes that do not trust the researcher want
update-level DP or DP-SGD on their own side (``TrainRequest.privacy``), or secure
aggregation. Because it needs each update on its own to clip it, it is not ``sum_only``
and cannot run under secure aggregation.

Neighbouring federations are *replace-one*: the same nodes take part (who answered a round
is public: the researcher names them), one node's data replaced by any other. Two means of
``n`` updates clipped to ``clip`` then differ by at most ``2 * clip / n``, the sensitivity
the noise is calibrated to.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedcore import plugins
from fedcore.aggregators.base import Aggregator
from fedcore.errors import ConfigurationError
from fedcore.params import ParameterSet
from fedcore.privacy.accountant import Accountant, check_delta, epsilon
from fedcore.privacy.mechanisms import _recombine, clip_update
from fedcore.privacy.spec import DEFAULT_DELTA, REPLACE_ONE, PrivacySpec

__all__ = ["CentralDP"]

_SAMPLING = "without-replacement"  # the Fraction strategy: a fixed-size uniform subset


class CentralDP(Aggregator):
    """Node-level central DP around a mean-based aggregator (registered as ``central-dp``).

    Every round: each node's update (its parameters minus the global ones, floating-point
    parameters jointly) is clipped to L2 norm ``clip``; the clipped updates are averaged
    with equal weights (sample counts would make the sensitivity depend on the data);
    Gaussian noise of standard deviation ``noise_multiplier * 2 * clip / n`` (``n`` nodes
    folded; ``2 * clip / n`` is the mean's sensitivity when one node's data is replaced by
    any other) is added to the mean, and the noised model goes to the ``aggregator``
    (FedAvg by default; a server optimiser such as FedAdam post-processes it, which keeps
    the guarantee). Integer parameters cannot be noised: the released model keeps the
    global model's values for them.

    Each round is one Gaussian mechanism on the nodes, a fixed-size subset drawn uniformly
    without replacement at ``sample_rate`` (set it to the ``Fraction`` strategy's
    fraction; 1.0, the default, claims no amplification). :attr:`epsilon` is the total at
    ``delta`` so far; :meth:`privacy_report` the last round's figures. ``seed`` makes the
    noise reproducible and is for tests only: by default it is drawn from the operating
    system's CSPRNG.

    Example::

        Experiment(Plan, ..., aggregator=CentralDP(clip=0.5, noise_multiplier=1.0,
                                                   sample_rate=0.5))
    """

    name = "central-dp"
    streaming = True
    sum_only = False  # it clips each update: the researcher sees them in the clear

    def __init__(self, clip: float, noise_multiplier: float, delta: float = DEFAULT_DELTA,
                 sample_rate: float = 1.0, aggregator: str = "fedavg",
                 aggregator_params: Mapping[str, Any] | None = None, seed: int | None = None):
        spec = PrivacySpec.parse({"mechanism": "update", "clip": clip,
                                  "noise_multiplier": noise_multiplier, "delta": delta})
        assert spec is not None
        self.clip, self.noise_multiplier, self.delta = spec.clip, spec.noise_multiplier, \
            check_delta(spec.delta)
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or (
                not 0 < sample_rate <= 1):
            raise ConfigurationError("sample_rate is the fraction of nodes selected per round, "
                                     f"in (0, 1]. Received: {sample_rate!r}")
        self.sample_rate = float(sample_rate)
        if not isinstance(aggregator, str):
            raise ConfigurationError(
                "CentralDP's aggregator is given by its registered name (e.g. 'fedavg', "
                "'fedadam') with aggregator_params, so checkpoints can rebuild it. "
                f"Received: {aggregator!r}")
        if aggregator == self.name:
            raise ConfigurationError("CentralDP cannot wrap itself. Expected the name of a "
                                     "mean-based aggregator such as 'fedavg'.")
        self.aggregator = aggregator
        self.aggregator_params = dict(aggregator_params or {})
        self.seed = seed
        self._inner: Aggregator = plugins.load("aggregators", aggregator)(
            **self.aggregator_params)
        if not self._inner.streaming:
            raise ConfigurationError(
                f"CentralDP noises the mean of the clipped updates; {aggregator!r} needs every "
                "update at once (a robust aggregator) and would see a single noised mean. "
                "Use a mean-based aggregator: 'fedavg', 'fedprox' or a server optimiser.")
        self.accountant_ = Accountant(sampling=_SAMPLING)
        self.rounds_: list[dict[str, Any]] = []
        self._reset(None, 0)

    def _reset(self, global_params: ParameterSet | None, round: int) -> None:
        self._global = global_params
        self._round = round
        self._sums: dict[str, np.ndarray] = {}
        self._n = 0
        self._clipped = 0
        self._result: ParameterSet | None = None

    # --- Aggregator -------------------------------------------------------------------------

    def start(self, global_params: ParameterSet, round: int) -> None:  # noqa: D102
        self._reset(global_params, round)

    def round_options(self) -> dict[str, Any]:  # noqa: D102 - the inner algorithm's
        return self._inner.round_options()

    def add(self, update: ParameterSet, weight: float, node: str = "",
            extras: Mapping[str, Any] | None = None) -> None:
        """Clip ``update - global`` and fold it in; ``weight`` is ignored (equal weights)."""
        if self._global is None:
            raise ConfigurationError("CentralDP.add() called before start().")
        if extras:
            raise ConfigurationError(
                f"Node {node!r} sent algorithm extras ({sorted(extras)}); central DP does not "
                "cover them (e.g. SCAFFOLD's control variates). Use FedAvg, FedProx or a "
                "server optimiser inside CentralDP.")
        delta, _, clipped = clip_update(self._global, update, self.clip)
        if not self._sums:
            self._sums = delta
        else:
            for k, d in delta.items():
                self._sums[k] += d
        self._n += 1
        self._clipped += int(clipped)
        self._result = None

    def result(self) -> ParameterSet:
        """The next global model: noised mean update, passed through the inner aggregator.

        The round's privacy is accounted once, however often this is called.
        """
        if self._result is not None:
            return self._result
        if self._global is None or self._n == 0:
            raise ConfigurationError("CentralDP.result() called before any update was added.")
        n = self._n
        sensitivity = REPLACE_ONE * self.clip / n
        sigma = self.noise_multiplier * sensitivity
        rng = (np.random.default_rng([self.seed, self._round]) if self.seed is not None
               else np.random.default_rng(secrets.randbits(128)))
        mean = {k: s / n + rng.normal(0.0, sigma, size=s.shape) for k, s in self._sums.items()}
        noised = _recombine(self._global, mean)
        self._inner.start(self._global, self._round)
        self._inner.add(noised, 1.0, "central-dp")
        self._result = self._inner.result()
        self.accountant_.add(self.noise_multiplier, self.sample_rate, 1)
        report = {"round": self._round, "mechanism": "central", "clip": self.clip,
                  "noise_multiplier": self.noise_multiplier, "relation": "replace-one",
                  "sensitivity": sensitivity, "sigma": sigma,
                  "sample_rate": self.sample_rate, "delta": self.delta, "nodes": n,
                  "clipped": self._clipped,
                  "epsilon": epsilon([(self.noise_multiplier, self.sample_rate, 1)],
                                     self.delta, sampling=_SAMPLING),
                  "epsilon_total": self.accountant_.epsilon(self.delta)}
        self.rounds_.append(report)
        return self._result

    # --- privacy ----------------------------------------------------------------------------

    @property
    def epsilon(self) -> float:
        """Total epsilon at ``delta`` of every round aggregated so far (0 before any)."""
        return self.accountant_.epsilon(self.delta)

    def privacy_report(self) -> dict[str, Any]:
        """The last round's figures (empty before the first round).

        ``epsilon`` (that round alone), ``epsilon_total``, ``sigma``, ``nodes``, ``clipped``
        (how many updates were clipped) and the parameters.
        """
        return dict(self.rounds_[-1]) if self.rounds_ else {}

    # --- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The accountant's events, the per-round reports and the inner aggregator's state."""
        return {"accountant": self.accountant_.state_dict(),
                "rounds": [dict(r) for r in self.rounds_],
                "inner": self._inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        self.accountant_ = Accountant.from_state(
            {"sampling": _SAMPLING, **(state.get("accountant") or {})})
        self.rounds_ = [dict(r) for r in state.get("rounds") or []]
        self._inner.load_state_dict(dict(state.get("inner") or {}))
