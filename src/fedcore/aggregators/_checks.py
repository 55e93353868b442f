"""Argument checks the aggregators share: each failure says what was expected."""

from __future__ import annotations

import math
import numbers

from fedcore.errors import ConfigurationError


def in_range(name: str, value: object, low: float, high: float = math.inf, *,
             low_open: bool = False, high_open: bool = True) -> float:
    """``value`` as a float within the interval, or a ConfigurationError that shows it."""
    v = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) \
        else math.nan
    ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        interval = (f"{'(' if low_open else '['}{low:g}, "
                    f"{'inf' if math.isinf(high) else format(high, 'g')}"
                    f"{')' if high_open else ']'}")
        raise ConfigurationError(
            f"Expected {name} to be a number in {interval}. Received: {name}={value!r}")
    return v


def at_least(name: str, value: object, low: int) -> int:
    """``value`` as an int no smaller than ``low``, or a ConfigurationError that shows it."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ConfigurationError(
            f"Expected {name} to be an integer >= {low}. Received: {name}={value!r}")
    return int(value)
