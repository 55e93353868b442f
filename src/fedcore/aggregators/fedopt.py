"""FedOpt: server optimizers over the round's average update (Reddi et al., ICLR 2021).

Each round the sample-weighted average of the nodes' updates (streamed by :class:`FedAvg`)
gives the pseudo-gradient ``delta = average - x``, where ``x`` is the global model the round
started from; a server optimizer turns it into the next ``x``. Only weighted sums of the
updates are needed, so these aggregators stream (memory O(model)) and work under secure
aggregation. Their state (``m``, ``v``) lives in float64 and survives checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedcore.aggregators._checks import in_range
from fedcore.aggregators.base import Aggregator
from fedcore.aggregators.fedavg import FedAvg, cast_like
from fedcore.errors import ConfigurationError
from fedcore.params import ParameterSet

__all__ = ["FedAdagrad", "FedAdam", "FedAvgM", "FedYogi"]


class ServerOptimizer(Aggregator):
    """Base of the FedOpt family: a FedAvg round, then one step of a server optimizer.

    Subclasses name their state (:attr:`state_names`), set it up (:meth:`_init_state`) and
    update it and return the step added to ``x`` (:meth:`_step`). Only floating-point
    parameters are optimized; integer ones (counters) are averaged as by FedAvg.
    """

    streaming = True
    sum_only = True
    #: Names of the per-parameter float64 state, each a ParameterSet in :meth:`state_dict`.
    state_names: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._avg = FedAvg()
        self._x: ParameterSet | None = None
        self._state: dict[str, dict[str, np.ndarray]] = {}
        self._result: ParameterSet | None = None

    # --- the subclass's rule ----------------------------------------------------------------

    def _init_state(self, name: str, like: np.ndarray) -> np.ndarray:
        """The initial value of state ``name`` for a parameter shaped like ``like``."""
        return np.zeros(like.shape, np.float64)

    def _step(self, delta: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        """Update ``state`` (arrays, in place) with ``delta``; return the change to ``x``.

        The returned array must be a new one (the caller reuses it), never a state array.
        """
        raise NotImplementedError

    # --- the Aggregator interface ----------------------------------------------------------

    def start(self, global_params: ParameterSet, round: int) -> None:
        """Begin a round from ``global_params`` (the ``x`` the step starts from)."""
        floats = [k for k, a in global_params.items() if a.dtype.kind == "f"]
        for name, saved in self._state.items():
            layout = {k: a.shape for k, a in saved.items()}
            wanted = {k: global_params[k].shape for k in floats}
            if layout != wanted:
                raise ConfigurationError(
                    f"{type(self).__name__}'s state {name!r} was built for a model with "
                    f"float parameters {layout}; the global model has {wanted}. Give the "
                    f"experiment a fresh aggregator (e.g. aggregator={self.name!r}) to "
                    "restart the optimizer for this model.")
        self._x = global_params
        self._result = None
        self._avg.start(global_params, round)

    def add(self, update: ParameterSet, weight: float, node: str = "",
            extras: Mapping[str, Any] | None = None) -> None:
        """Fold one node's update into the round's weighted average (see FedAvg)."""
        self._avg.add(update, weight, node, extras)

    def result(self) -> ParameterSet:
        """Apply the server step; calling it again in the same round returns the same set."""
        if self._result is not None:
            return self._result
        if self._avg.total_weight <= 0 or self._x is None:
            raise ConfigurationError(
                f"{type(self).__name__}.result() called before any update was added.")
        x = self._x
        out: dict[str, np.ndarray] = {}
        for k, avg in self._avg.means():
            dtype = x[k].dtype
            if dtype.kind != "f":
                out[k] = cast_like(avg, dtype)
                continue
            if not self._state or k not in next(iter(self._state.values())):
                for name in self.state_names:
                    self._state.setdefault(name, {})[k] = self._init_state(name, avg)
            delta = avg - x[k]
            step = self._step(delta, {name: self._state[name][k] for name in self.state_names})
            # x + step, written as avg + (step - delta): when the step is the pseudo-gradient
            # itself (FedAvgM with eta=1, beta=0) the result is FedAvg's, bit for bit.
            step -= delta
            step += avg
            out[k] = step.astype(dtype, copy=False)
        self._result = ParameterSet(out)
        return self._result

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state as float64 ParameterSets (empty before the first round)."""
        return {name: ParameterSet(arrays) for name, arrays in self._state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; arrays are copied (a checkpoint's are read-only)."""
        state = dict(state or {})
        if state and set(state) != set(self.state_names):
            raise ConfigurationError(
                f"{type(self).__name__} keeps state {sorted(self.state_names)}. Received a "
                f"state with keys {sorted(state)}: was it saved by another aggregator?")
        restored: dict[str, dict[str, np.ndarray]] = {}
        for name, arrays in state.items():
            if not isinstance(arrays, Mapping):
                raise ConfigurationError(
                    f"Expected state {name!r} of {type(self).__name__} to be a ParameterSet. "
                    f"Received: {type(arrays).__name__}")
            restored[name] = {k: np.array(a, dtype=np.float64, copy=True)
                              for k, a in arrays.items()}
        self._state = restored
        self._result = None


class _Adaptive(ServerOptimizer):
    """Shared by FedAdam, FedYogi and FedAdagrad: momentum ``m`` and second moment ``v``."""

    state_names = ("m", "v")

    def __init__(self, eta: float, b1: float, b2: float, tau: float) -> None:
        super().__init__()
        self.eta = in_range("eta", eta, 0.0, low_open=True)
        self.b1 = in_range("b1", b1, 0.0, 1.0)
        self.b2 = in_range("b2", b2, 0.0, 1.0)
        self.tau = in_range("tau", tau, 0.0, low_open=True)

    def _init_state(self, name: str, like: np.ndarray) -> np.ndarray:
        fill = self.tau ** 2 if name == "v" else 0.0  # v starts at tau^2, as in the paper
        return np.full(like.shape, fill, np.float64)

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> None:
        """Update ``v`` in place from the squared pseudo-gradient ``d2``."""
        raise NotImplementedError

    def _step(self, delta: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        m, v = state["m"], state["v"]
        m *= self.b1
        m += (1.0 - self.b1) * delta
        self._second_moment(v, np.square(delta))
        step = np.sqrt(v)
        step += self.tau
        np.divide(m, step, out=step)
        step *= self.eta
        return step


class FedAdam(_Adaptive):
    """Adam on the server (Reddi et al., 2021, Algorithm 2).

    ``m = b1*m + (1-b1)*delta``; ``v = b2*v + (1-b2)*delta**2``;
    ``x = x + eta * m / (sqrt(v) + tau)``, with ``m = 0`` and ``v = tau**2`` at the start.
    As in the paper there is no bias correction: early steps are damped by ``1 - b1`` until
    ``m`` warms up, and each coordinate then moves by about ``eta`` per round.

    Args:
        eta: server learning rate. The paper tunes it per task (1e-2.5 to 1); 1e-2 is a
            safe start for neural networks, simple linear models take 0.1.
        b1: momentum decay.
        b2: second-moment decay.
        tau: adaptivity: larger values make the step closer to momentum SGD.
    """

    name = "fedadam"

    def __init__(self, eta: float = 1e-2, b1: float = 0.9, b2: float = 0.99,
                 tau: float = 1e-3) -> None:
        super().__init__(eta, b1, b2, tau)

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> None:
        v *= self.b2
        d2 *= 1.0 - self.b2
        v += d2


class FedYogi(_Adaptive):
    """Yogi on the server (Reddi et al., 2021): FedAdam with an additive second moment.

    ``v = v - (1-b2) * delta**2 * sign(v - delta**2)``: ``v`` moves towards ``delta**2`` by a
    bounded amount, so a single large update cannot collapse the learning rate. No bias
    correction, as in the paper. Arguments are FedAdam's.
    """

    name = "fedyogi"

    def __init__(self, eta: float = 1e-2, b1: float = 0.9, b2: float = 0.99,
                 tau: float = 1e-3) -> None:
        super().__init__(eta, b1, b2, tau)

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> None:
        sign = np.sign(v - d2)
        d2 *= 1.0 - self.b2
        d2 *= sign
        v -= d2


class FedAdagrad(_Adaptive):
    """Adagrad on the server (Reddi et al., 2021): ``v = v + delta**2``.

    Per-coordinate steps shrink as squared pseudo-gradients accumulate. Momentum is off by
    default (``b1=0``: the classic Adagrad the paper uses for FedAdagrad); the step is
    ``x = x + eta * m / (sqrt(v) + tau)`` with ``m = b1*m + (1-b1)*delta``.
    """

    name = "fedadagrad"

    def __init__(self, eta: float = 1e-2, b1: float = 0.0, tau: float = 1e-3) -> None:
        super().__init__(eta, b1, 0.0, tau)

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> None:
        v += d2


class FedAvgM(ServerOptimizer):
    """FedAvg with server momentum (Hsu et al., 2019): ``m = beta*m + delta``; ``x += eta*m``.

    ``eta=1, beta=0`` is FedAvg exactly. The effective step is about ``eta / (1 - beta)``
    times the average update: lower ``eta`` if a high ``beta`` makes training oscillate.

    Args:
        eta: server learning rate.
        beta: momentum, in [0, 1).
    """

    name = "fedavgm"
    state_names = ("m",)

    def __init__(self, eta: float = 1.0, beta: float = 0.9) -> None:
        super().__init__()
        self.eta = in_range("eta", eta, 0.0, low_open=True)
        self.beta = in_range("beta", beta, 0.0, 1.0)

    def _step(self, delta: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        m = state["m"]
        m *= self.beta
        m += delta
        return self.eta * m
