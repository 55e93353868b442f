"""Node selection and quorum: which nodes train in a round, and when a round may close.

A :class:`Strategy` is configured by its constructor (inspectable with :meth:`get_params`,
like an aggregator) and answers two questions the :class:`~fedcore.Experiment` asks each
round: which of the nodes holding the data take part (:meth:`Strategy.select`), and how
many usable updates make the round valid (``min_nodes``). ``deadline`` closes a round after
that many seconds with the nodes that answered; the late ones are named in the history.
``weighting`` says how much each update counts in the aggregate: ``"samples"`` (its training
sample count, the default) or ``"uniform"`` (every node alike, e.g. when one site's size
should not dominate); a subclass may override :meth:`Strategy.weight` for anything else.

Example::

    Experiment(Plan, tags=["x"], federation=url,
               strategy=Fraction(0.5, seed=1, min_nodes=2, deadline=120))
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedcore.errors import ConfigurationError

_WEIGHTINGS = frozenset({"samples", "uniform"})

__all__ = ["AllNodes", "Fraction", "Strategy"]


class Strategy:
    """Chooses each round's nodes and says when the round counts.

    ``min_nodes``: the quorum, the fewest nodes whose updates make a round (default 1).
    ``deadline``: seconds after which the round closes with the nodes that answered
    (``None``: wait up to the experiment's ``timeout``). ``weighting``: ``"samples"`` or
    ``"uniform"`` (see :meth:`weight`). Subclasses override :meth:`select` and may override
    :meth:`weight`.
    """

    def __init__(self, *, min_nodes: int = 1, deadline: float | None = None,
                 weighting: str = "samples"):
        if int(min_nodes) < 1:
            raise ConfigurationError(f"min_nodes must be >= 1. Received: {min_nodes!r}")
        if deadline is not None and not float(deadline) > 0:
            raise ConfigurationError(f"deadline must be > 0 seconds. Received: {deadline!r}")
        if weighting not in _WEIGHTINGS:
            raise ConfigurationError(
                f"weighting must be one of {sorted(_WEIGHTINGS)}. Received: {weighting!r}")
        self.min_nodes = int(min_nodes)
        self.deadline = None if deadline is None else float(deadline)
        self.weighting = weighting

    def weight(self, node: str, n_samples: int) -> float:
        """How much ``node``'s update counts: its sample count, or 1 with ``"uniform"``."""
        return 1.0 if self.weighting == "uniform" else float(n_samples)

    def select(self, nodes: Sequence[str], round: int) -> list[str]:
        """The nodes of ``nodes`` (sorted ids holding the data) that train in ``round``."""
        return list(nodes)

    def get_params(self) -> dict[str, Any]:
        """The constructor arguments, as given (enough to rebuild an equal strategy)."""
        names = [p.name for cls in type(self).__mro__ if cls is not object
                 for p in list(inspect.signature(cls).parameters.values())
                 if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        return {n: getattr(self, n) for n in dict.fromkeys(names)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


class AllNodes(Strategy):
    """Every node holding the data trains in every round (the default)."""

    def __init__(self, *, min_nodes: int = 1, deadline: float | None = None,
                 weighting: str = "samples"):
        super().__init__(min_nodes=min_nodes, deadline=deadline, weighting=weighting)


class Fraction(Strategy):
    """A random ``fraction`` of the nodes each round (at least one, rounded up).

    The draw depends on ``seed`` and the round number only: the same experiment selects the
    same nodes again, and resuming from a checkpoint continues the same sequence.
    """

    def __init__(self, fraction: float, seed: int = 0, *, min_nodes: int = 1,
                 deadline: float | None = None, weighting: str = "samples"):
        if not 0.0 < float(fraction) <= 1.0:
            raise ConfigurationError(f"fraction must be in (0, 1]. Received: {fraction!r}")
        super().__init__(min_nodes=min_nodes, deadline=deadline, weighting=weighting)
        self.fraction = float(fraction)
        self.seed = int(seed)

    def select(self, nodes: Sequence[str], round: int) -> list[str]:  # noqa: D102
        ordered = sorted(nodes)
        k = min(len(ordered), max(1, math.ceil(self.fraction * len(ordered) - 1e-9)))
        rng = np.random.default_rng([self.seed, int(round)])
        chosen = set(rng.choice(len(ordered), size=k, replace=False).tolist())
        return [n for i, n in enumerate(ordered) if i in chosen]


def from_params(name: str, params: dict[str, Any]) -> Strategy:
    """Rebuild a strategy of this module from its class name and :meth:`Strategy.get_params`."""
    cls = {c.__name__: c for c in (Strategy, AllNodes, Fraction)}.get(name)
    if cls is None:
        raise ConfigurationError(
            f"The checkpoint's strategy {name!r} is not one of fedcore.researcher.strategies: pass "
            "strategy= to Experiment.load().")
    return cls(**params)
