"""Privacy accounting: epsilon for a given delta from Gaussian-mechanism events (RDP).

Every differentially private step fedcore takes is one or more applications of the
(Poisson-subsampled) Gaussian mechanism, described by an :class:`Event`: its noise
multiplier (noise standard deviation over the L2 sensitivity), its sampling rate and how
many times it ran. Events compose across rounds, possibly with different parameters, in the
Renyi-DP accountant of Google's ``dp-accounting`` package, over the same orders as Opacus's
``RDPAccountant``, so the three agree on the epsilon of the same history.

Sub-sampling is Poisson (each record takes part with probability ``sample_rate``, the
add/remove-one relation: DP-SGD) unless an accountant is built with
``sampling="without-replacement"``: a uniformly drawn subset of fixed size, the fraction
``sample_rate`` of a population whose size is public (the replace-one relation: central DP
over the nodes a strategy such as ``Fraction`` picks).

An :class:`Accountant` keeps its events as plain data (``[[noise, rate, steps], ...]``), so
it persists in TinyDB, in checkpoints and on the wire.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from functools import lru_cache
from typing import Any, NamedTuple

from fedcore.errors import ConfigurationError, MissingDependencyError

__all__ = ["DEFAULT_ORDERS", "SAMPLINGS", "Accountant", "Event", "check_delta", "check_sampling",
           "epsilon"]

#: The Renyi orders searched for the best conversion to (epsilon, delta): Opacus's
#: ``RDPAccountant.DEFAULT_ALPHAS``, so fedcore's numbers match Opacus's.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)])

#: How a sub-sampled event draws its sample (see the module docstring).
SAMPLINGS = ("poisson", "without-replacement")

_INSTALL = 'pip install "fedcore[dp]"'


class Event(NamedTuple):
    """``steps`` applications of the Gaussian mechanism, each on a Poisson sample.

    ``noise_multiplier`` is the noise standard deviation divided by the L2 sensitivity (the
    clipping norm); ``sample_rate`` the probability that a record takes part in a step (1.0:
    every record, every step).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    @classmethod
    def coerce(cls, value: Any) -> Event:
        """An event from a tuple, list or mapping (as stored); ``ConfigurationError`` if bad."""
        if isinstance(value, Mapping):
            try:
                value = (value["noise_multiplier"], value["sample_rate"], value["steps"])
            except KeyError as exc:
                raise ConfigurationError(
                    f"A privacy event needs noise_multiplier, sample_rate and steps. Missing: "
                    f"{exc.args[0]!r}. Received: {dict(value)!r}") from None
        if not isinstance(value, (tuple, list)) or len(value) != 3:
            raise ConfigurationError(
                "Expected a privacy event (noise_multiplier, sample_rate, steps). "
                f"Received: {value!r}")
        noise, rate, steps = value
        if not _number(noise) or noise < 0:
            raise ConfigurationError(
                f"noise_multiplier must be a number >= 0. Received: {noise!r}")
        if not _number(rate) or not 0 < rate <= 1:
            raise ConfigurationError(f"sample_rate must be in (0, 1]. Received: {rate!r}")
        if isinstance(steps, float) and steps.is_integer():
            steps = int(steps)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ConfigurationError(f"steps must be a whole number >= 0. Received: {steps!r}")
        return cls(float(noise), float(rate), steps)


def _number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def check_delta(delta: Any) -> float:
    """``delta`` as a float in (0, 1), or a ``ConfigurationError`` that says what is wrong."""
    if not _number(delta) or not 0 < delta < 1:
        raise ConfigurationError(
            "delta must be a number in (0, 1), typically below 1/number of records "
            f"(e.g. 1e-5). Received: {delta!r}")
    return float(delta)


def _dp_accounting() -> Any:
    try:
        import dp_accounting  # noqa: PLC0415 - optional extra, imported on first use
    except ImportError as exc:
        raise MissingDependencyError(
            f"Differential privacy accounting needs the dp-accounting package ({exc}). "
            f"Install it with: {_INSTALL}") from exc
    return dp_accounting


class _Quiet(logging.Filter):
    """Drops dp-accounting's per-order warnings (an order it cannot bound is skipped)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Excluding this order" not in record.getMessage()


_QUIET = _Quiet()


def check_sampling(sampling: Any) -> str:
    """``sampling`` if it is one of :data:`SAMPLINGS`, else a ``ConfigurationError``."""
    if sampling not in SAMPLINGS:
        raise ConfigurationError(f"sampling must be one of {list(SAMPLINGS)}. Received: "
                                 f"{sampling!r}")
    return str(sampling)


@lru_cache(maxsize=256)
def _rdp(noise: float, rate: float, orders: tuple[float, ...],
         sampling: str = "poisson") -> tuple[float, ...]:
    """The RDP curve of one step of the subsampled Gaussian mechanism (cached)."""
    dpa = _dp_accounting()
    event = dpa.GaussianDpEvent(noise)
    if rate < 1 and sampling == "poisson":
        accountant = dpa.rdp.RdpAccountant(orders=list(orders))
        event = dpa.PoissonSampledDpEvent(rate, event)
    elif rate < 1:  # a fixed-size subset: only its proportion enters the bound
        part = Fraction(rate).limit_denominator(1_000_000)
        accountant = dpa.rdp.RdpAccountant(
            orders=list(orders), neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
        event = dpa.SampledWithoutReplacementDpEvent(part.denominator, part.numerator, event)
    else:
        accountant = dpa.rdp.RdpAccountant(orders=list(orders))
    absl = logging.getLogger("absl")
    absl.addFilter(_QUIET)
    try:
        accountant.compose(event, 1)
    finally:
        absl.removeFilter(_QUIET)
    # The composed curve; dp-accounting keeps it as ``_rdp`` (0.4 to 0.6 at least).
    return tuple(float(r) for r in accountant._rdp)


def epsilon(events: Iterable[Event | Sequence[Any]], delta: float,
            orders: Sequence[float] = DEFAULT_ORDERS, sampling: str = "poisson") -> float:
    """The epsilon of the composition of ``events`` at ``delta`` (0 for no event).

    ``math.inf`` when an event has no noise. Uses ``dp_accounting``'s RDP accountant and
    its conversion to (epsilon, delta); ``ConfigurationError`` names ``pip install
    "fedcore[dp]"`` when it is missing. ``sampling`` says how events with a sample rate
    below 1 draw their sample (:data:`SAMPLINGS`).
    """
    delta = check_delta(delta)
    sampling = check_sampling(sampling)
    checked = [e for e in map(Event.coerce, events) if e.steps > 0]
    if not checked:
        return 0.0
    if any(e.noise_multiplier == 0 for e in checked):
        return math.inf
    orders = tuple(float(a) for a in orders)
    total = [0.0] * len(orders)
    for e in checked:
        curve = _rdp(e.noise_multiplier, e.sample_rate, orders, sampling)
        total = [t + e.steps * r for t, r in zip(total, curve, strict=True)]
    eps, _ = _dp_accounting().rdp.compute_epsilon(list(orders), total, delta)
    return float(eps)


class Accountant:
    """The privacy spent by a history of Gaussian-mechanism events, at any delta.

    A node keeps one per dataset, a researcher one per experiment for central DP. Its whole
    state is its list of events, plain data that persists as it is::

        acc = Accountant()
        acc.add(noise_multiplier=1.1, sample_rate=0.01, steps=500)   # round 1 (DP-SGD)
        acc.add(noise_multiplier=1.3, sample_rate=0.01, steps=400)   # round 2
        acc.epsilon(1e-5)                          # both rounds, composed
        Accountant.from_state(acc.state_dict())    # the same accountant
    """

    def __init__(self, events: Iterable[Event | Sequence[Any]] = (),
                 orders: Sequence[float] = DEFAULT_ORDERS, sampling: str = "poisson"):
        self.orders = tuple(float(a) for a in orders)
        self.sampling = check_sampling(sampling)
        self.events: list[Event] = []
        self.extend(events)

    def __repr__(self) -> str:
        return f"Accountant({len(self.events)} events)"

    def add(self, noise_multiplier: float, sample_rate: float = 1.0, steps: int = 1) -> None:
        """Record ``steps`` runs of the Gaussian mechanism (merged with a same last event)."""
        self.extend([(noise_multiplier, sample_rate, steps)])

    def extend(self, events: Iterable[Event | Sequence[Any]]) -> None:
        """Record several events (checked first: nothing is recorded if one is invalid)."""
        new = [Event.coerce(e) for e in events]
        for e in new:
            last = self.events[-1] if self.events else None
            if last is not None and last[:2] == e[:2]:
                self.events[-1] = Event(e.noise_multiplier, e.sample_rate,
                                        last.steps + e.steps)
            elif e.steps > 0:
                self.events.append(e)

    def epsilon(self, delta: float) -> float:
        """Epsilon of every event so far, at ``delta``."""
        return epsilon(self.events, delta, self.orders, self.sampling)

    def epsilon_with(self, events: Iterable[Event | Sequence[Any]], delta: float) -> float:
        """Epsilon at ``delta`` if ``events`` were added too (nothing is recorded)."""
        return epsilon([*self.events, *events], delta, self.orders, self.sampling)

    def state_dict(self) -> dict[str, Any]:
        """Plain data: ``{"events": [[noise, rate, steps], ...]}``, plus ``"sampling"``.

        ``"sampling"`` is there only when it is not Poisson.
        """
        state: dict[str, Any] = {"events": [list(e) for e in self.events]}
        if self.sampling != "poisson":
            state["sampling"] = self.sampling
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the events (and the sampling) by those of :meth:`state_dict`."""
        self.sampling = check_sampling(state.get("sampling", "poisson"))
        self.events = []
        self.extend(state.get("events") or [])

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Accountant:
        """An accountant restored from :meth:`state_dict`."""
        acc = cls()
        acc.load_state_dict(state)
        return acc
