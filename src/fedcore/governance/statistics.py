"""What a node lets researchers compute with federated statistics, from its ``config.toml``.

Policy keys: ``statistics`` (default true), ``min_count`` (default 5) and ``allow_min_max``
(default true), read on every request by :func:`statistics_policy`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedcore.errors import ConfigurationError

__all__ = ["StatisticsPolicy", "statistics_policy"]


@dataclass(frozen=True)
class StatisticsPolicy:
    """What a node lets researchers compute, read from its ``config.toml``.

    ``allowed``: answer statistics at all (key ``statistics``). ``min_count``: non-zero counts
    below it are withheld (0 or 1 withhold nothing). ``min_max``: share extremes (key
    ``allow_min_max``).
    """

    allowed: bool = True
    min_count: int = 5
    min_max: bool = True


def statistics_policy(config: Mapping[str, Any]) -> StatisticsPolicy:
    """The statistics policy in a node's configuration; ``ConfigurationError`` if malformed."""
    allowed = config.get("statistics", True)
    min_count = config.get("min_count", 5)
    min_max = config.get("allow_min_max", True)
    for key, value in (("statistics", allowed), ("allow_min_max", min_max)):
        if not isinstance(value, bool):
            raise ConfigurationError(f"config.toml: {key} must be true or false. "
                                     f"Received: {key} = {value!r}")
    if not isinstance(min_count, int) or isinstance(min_count, bool) or min_count < 0:
        raise ConfigurationError(f"config.toml: min_count must be an integer >= 0. "
                                 f"Received: min_count = {min_count!r}")
    return StatisticsPolicy(allowed=allowed, min_count=min_count, min_max=min_max)
