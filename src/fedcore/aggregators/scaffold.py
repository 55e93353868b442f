"""SCAFFOLD (Karimireddy et al., 2020): control variates correct the drift of local training."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedcore.aggregators._local import LocalAlgorithm
from fedcore.aggregators.base import Aggregator
from fedcore.aggregators.fedavg import FedAvg
from fedcore.errors import ConfigurationError
from fedcore.params import ParameterSet

if TYPE_CHECKING:
    from fedcore.aggregators._local import LocalState
    from fedcore.plan import TrainingPlan

__all__ = ["Scaffold", "ScaffoldLocal"]

log = logging.getLogger("fedcore.aggregators")


def _zeros_like(params: Mapping[str, np.ndarray]) -> ParameterSet:
    """A control variate for a model: zeros, float (the model's float dtype, else float32)."""
    return ParameterSet((k, np.zeros(np.shape(a), a.dtype if a.dtype.kind == "f"
                                     else np.float32)) for k, a in params.items())


def _fits(variate: Any, params: Mapping[str, np.ndarray]) -> bool:
    return (isinstance(variate, Mapping) and list(variate) == list(params)
            and all(np.shape(variate[k]) == np.shape(a) for k, a in params.items()))


class ScaffoldLocal(LocalAlgorithm):
    """Node side of SCAFFOLD: corrects every gradient step by ``c - c_i``, updates ``c_i``.

    ``c_i`` is the node's own control variate, kept in its home (never sent); the reply's
    ``extras["delta_c"]`` carries only its change. Option II of the paper:
    ``c_i+ = c_i - c + (w_global - w_local) / (K * lr)`` over the K local steps.

    Under differential privacy ``w_local`` is the released, noised model (the node sets the
    plan to it before :meth:`after_fit`), so ``delta_c`` reveals nothing the update does not:
    the researcher who inverts it finds the noised model, never the clean one. ``K`` and the
    learning rates are the plan's configuration (a learning rate that follows the loss, such
    as a plateau scheduler, would be data and is not covered).
    """

    title = "SCAFFOLD"
    requires = frozenset({"gradient_correction"})
    private_extras = True
    hint = "Use a torch plan, or FedAvg/FedProx."

    @classmethod
    def check(cls, plan_class: type[TrainingPlan]) -> None:
        """Also refuse a plan with local parameters: the variates cover the whole model."""
        super().check(plan_class)
        if getattr(plan_class, "local_parameters", ()):
            raise ConfigurationError(
                f"SCAFFOLD's control variates cover the whole model, but "
                f"{plan_class.__name__} keeps local_parameters "
                f"{list(plan_class.local_parameters)} on each node. Use FedAvg, FedProx or "
                "a FedOpt aggregator with local parameters.")

    def before_fit(self, plan: TrainingPlan, global_params: ParameterSet,
                   state: LocalState) -> None:
        """Load ``c_i`` (zeros the first time) and set ``plan.gradient_correction``."""
        c = self.options.get("c")
        if not _fits(c, global_params):
            raise ConfigurationError(
                "SCAFFOLD's request must carry the server control variate 'c' with the "
                "model's parameter names and shapes. Received: "
                f"{type(c).__name__ if not isinstance(c, Mapping) else list(c)[:5]}")
        assert isinstance(c, Mapping)
        self.c = ParameterSet(c)
        saved = state.load("scaffold")
        c_i = saved.get("c_i") if saved else None
        if c_i is not None and not _fits(c_i, global_params):
            log.warning("The model's layout changed: SCAFFOLD's node control variate starts "
                        "again from zeros.")
            c_i = None
        self.c_i = _zeros_like(global_params) if c_i is None else ParameterSet(c_i)
        plan.gradient_correction = ParameterSet(
            (k, np.subtract(self.c[k], self.c_i[k], dtype=self.c_i[k].dtype))
            for k in self.c_i)

    def after_fit(self, plan: TrainingPlan, global_params: ParameterSet,
                  state: LocalState) -> dict[str, Any]:
        """Compute and keep ``c_i+``; return ``{"delta_c": c_i+ - c_i}``."""
        steps = plan.local_steps
        if steps is None:
            raise ConfigurationError(
                f"{type(plan).__name__} declares gradient_correction but its fit() did not "
                "report local_steps, which SCAFFOLD needs.")
        local = plan.get_parameters()
        new: dict[str, np.ndarray] = {}
        delta: dict[str, np.ndarray] = {}
        for k, ci in self.c_i.items():
            lr = steps.lr.get(k)
            if steps.count > 0 and lr:
                drift = np.subtract(global_params[k], local[k], dtype=np.float64)
                value = ci - np.asarray(self.c[k], np.float64) + drift / (steps.count * lr)
                new[k] = value.astype(ci.dtype)
            else:  # not trained by gradient (a buffer, a frozen layer), or no step at all
                new[k] = np.array(ci, copy=True)
            delta[k] = np.subtract(new[k], ci, dtype=ci.dtype)
        state.save("scaffold", {"c_i": ParameterSet(new)})
        return {"delta_c": ParameterSet(delta)}


class Scaffold(Aggregator):
    """SCAFFOLD: stochastic controlled averaging, for nodes whose data differ.

    The server keeps a control variate ``c`` (zeros at first, the model's layout), ships it
    with every request, and each node corrects its local gradient steps by ``c - c_i``
    (``c_i``: the node's own variate, kept on the node). Updates:
    ``x <- x + server_lr * weighted mean(y_i - x)`` (weights: sample counts) and
    ``c <- c + (|S| / N) * mean(delta_c_i)``, with ``|S|`` the nodes of the round and ``N``
    every node holding the data: ``n_nodes`` when given, else the number of distinct nodes
    that have taken part so far (exact when every node trains in every round; give
    ``n_nodes`` when a strategy samples nodes). The researcher sees only sums of deltas, so
    it works under secure aggregation. Local training must be plain SGD for the paper's
    guarantees; with momentum or Adam the correction is a heuristic.
    """

    name = "scaffold"
    sum_only = True
    local_algorithm = ScaffoldLocal

    def __init__(self, server_lr: float = 1.0, n_nodes: int | None = None) -> None:
        if not (isinstance(server_lr, (int, float)) and server_lr > 0):
            raise ConfigurationError(
                f"Expected server_lr to be a number > 0 (1.0 is plain averaging). "
                f"Received: {server_lr!r}")
        if n_nodes is not None and not (isinstance(n_nodes, int) and n_nodes >= 1):
            raise ConfigurationError(
                f"Expected n_nodes to be None or an int >= 1. Received: {n_nodes!r}")
        self.server_lr = float(server_lr)
        self.n_nodes = n_nodes
        self._avg = FedAvg()
        self._c: ParameterSet | None = None
        self._seen: set[str] = set()
        self._global: ParameterSet | None = None
        self._sums: dict[str, np.ndarray] = {}
        self._count = 0
        self._nodes: list[str] = []
        self._result: ParameterSet | None = None

    @property
    def control_variate(self) -> ParameterSet | None:
        """The server control variate ``c`` (``None`` before the first round)."""
        return self._c

    def start(self, global_params: ParameterSet, round: int) -> None:  # noqa: D102
        if self._c is not None and not _fits(self._c, global_params):
            log.warning("The model's layout changed: SCAFFOLD's control variate restarts "
                        "from zeros.")
            self._c = None
        if self._c is None:
            self._c = _zeros_like(global_params)
        self._avg.start(global_params, round)
        self._global = global_params
        self._sums = {}
        self._count = 0
        self._nodes = []
        self._result = None

    def round_options(self) -> dict[str, Any]:
        """``{"name": "scaffold", "c": c}``: the server control variate for every node."""
        if self._c is None:
            raise ConfigurationError("Scaffold.round_options() called before start().")
        return {"name": self.name, "c": self._c}

    def add(self, update: ParameterSet, weight: float, node: str = "",  # noqa: D102
            extras: Mapping[str, Any] | None = None) -> None:
        assert self._c is not None, "start() first"
        delta = (extras or {}).get("delta_c")
        if not _fits(delta, self._c):
            raise ConfigurationError(
                f"Node {node!r} sent no SCAFFOLD control-variate delta (extras['delta_c'] "
                "with the model's layout). Expected a node running fedcore's SCAFFOLD side. "
                f"Received extras: {sorted(extras or {})}")
        assert isinstance(delta, Mapping)
        self._avg.add(update, weight, node, extras)
        for k, d in delta.items():
            if k in self._sums:
                self._sums[k] += np.asarray(d, np.float64)
            else:
                self._sums[k] = np.array(d, np.float64)
        self._count += 1
        self._nodes.append(node)

    def add_sum(self, sums: ParameterSet, total_weight: float, nodes: Sequence[str],
                extras: Mapping[str, ParameterSet] | None = None) -> None:
        """Fold a secure sum of ``nodes``' updates.

        Secure aggregation hides each node's control-variate delta, so the server update
        uses their sample-weighted mean, ``|S| / N * weighted mean(delta_c)``: the paper's
        rule when the nodes hold equally many samples.
        """
        assert self._c is not None, "start() first"
        delta = (extras or {}).get("delta_c")
        if not _fits(delta, self._c) or not nodes:
            raise ConfigurationError(
                "The secure sum carries no SCAFFOLD control-variate delta (extras['delta_c'] "
                f"with the model's layout). Received extras: {sorted(extras or {})}")
        assert isinstance(delta, Mapping)
        self._avg.add_sum(sums, total_weight, nodes)
        for k, d in delta.items():
            mean_times_count = np.asarray(d, np.float64) * (len(nodes) / total_weight)
            if k in self._sums:
                self._sums[k] += mean_times_count
            else:
                self._sums[k] = mean_times_count
        self._count += len(nodes)
        self._nodes.extend(nodes)

    def result(self) -> ParameterSet:  # noqa: D102
        if self._result is not None:
            return self._result
        avg = self._avg.result()  # raises when no update was added
        assert self._c is not None and self._global is not None
        self._seen.update(self._nodes)
        n = self.n_nodes if self.n_nodes is not None else len(self._seen)
        if self._count > n:
            raise ConfigurationError(
                f"Scaffold(n_nodes={n}) got updates from {self._count} nodes in one round. "
                "Set n_nodes to the number of nodes holding the data.")
        # c + (|S| / N) * mean(delta_c) = c + sum(delta_c) / N
        self._c = ParameterSet((k, (np.asarray(c, np.float64) + self._sums[k] / n)
                                .astype(c.dtype)) for k, c in self._c.items())
        if self.server_lr == 1.0:
            self._result = avg
        else:
            out = {}
            for k, x in self._global.items():
                step = np.subtract(avg[k], x, dtype=np.float64) * self.server_lr
                value = np.asarray(x, np.float64) + step
                out[k] = (np.rint(value) if x.dtype.kind in "iub" else value).astype(x.dtype)
            self._result = ParameterSet(out)
        return self._result

    def state_dict(self) -> dict[str, Any]:
        """The server control variate and the nodes seen so far."""
        return {} if self._c is None else {"c": self._c, "nodes": sorted(self._seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        c = state.get("c")
        self._c = ParameterSet(c).copy() if isinstance(c, Mapping) else None
        self._seen = {str(n) for n in state.get("nodes") or ()}
