"""The statistics protocol both sides check: query limits, bin edges, the additive vector.

A :class:`~fedcore.wire.messages.StatsRequest` holds up to :data:`MAX_QUERIES` queries, each a
map of ``variable``, ``shift``, ``min_max``, bin ``edges`` and ``bounds`` (:func:`check_query`).
A result's ``withheld`` list says what the node withheld without saying where: ``{"cell":
"all"}`` (the whole variable), ``{"cell": "cells", "cells": n}`` (n histogram cells, which
stay unnamed: they read as zeros) or ``{"cell": "min_max"}``. Under
secure aggregation a node packs each query's additive statistics in one float64 vector
(:func:`additive_vector`, laid out as :data:`SECURE_FIELDS`) and the researcher reads the
summed vector back (:func:`additive_from_vector`); the node computes the statistics in
:mod:`fedcore.node.statistics`, the researcher pools them in
:mod:`fedcore.researcher.statistics`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedcore.errors import ConfigurationError

__all__ = [
    "IMAGE_VARIABLE",
    "MAX_BINS",
    "MAX_QUERIES",
    "SECURE_FIELDS",
    "Query",
    "additive_from_vector",
    "additive_vector",
    "check_edges",
    "check_query",
    "check_split",
    "withheld_cells",
    "vector_size",
]

#: The one variable of an image folder: its pixel intensities.
IMAGE_VARIABLE = "intensity"
#: The most queries one request may hold.
MAX_QUERIES = 256
#: The most bins one histogram query may ask for.
MAX_BINS = 100_000

# --- queries ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    """One checked query of a :class:`~fedcore.wire.messages.StatsRequest`.

    Sums of ``x - shift``, extremes if ``min_max``, a histogram on ``edges``; under
    differential privacy values are clipped to ``bounds``.
    """

    variable: str
    shift: float = 0.0
    min_max: bool = False
    edges: np.ndarray | None = None
    bounds: tuple[float, float] | None = None

    @property
    def bins(self) -> int:
        """The number of histogram bins (0: no histogram)."""
        return 0 if self.edges is None else self.edges.size - 1

    @property
    def clip(self) -> tuple[float, float] | None:
        """The range values are clipped to under differential privacy.

        ``bounds``, or the edges' range; ``None`` when neither is given.
        """
        if self.bounds is not None:
            return self.bounds
        return None if self.edges is None else (float(self.edges[0]), float(self.edges[-1]))


def check_query(i: int, query: Any) -> Query:
    """Query ``i`` of a request, checked.

    A malformed query raises ``ConfigurationError`` naming its key.
    """
    if not isinstance(query, Mapping):
        raise ConfigurationError(f"Query {i} must be a map. Received: {type(query).__name__}")
    variable, shift = query.get("variable"), query.get("shift", 0.0)
    min_max, edges = query.get("min_max", False), query.get("edges")
    if not isinstance(variable, str) or not variable:
        raise ConfigurationError(f"Query {i}: 'variable' must be a non-empty string. "
                                 f"Received: {variable!r}")
    if not _finite(shift):
        raise ConfigurationError(f"Query {i} ({variable!r}): 'shift' must be a finite number. "
                                 f"Received: {shift!r}")
    if not isinstance(min_max, bool):
        raise ConfigurationError(f"Query {i} ({variable!r}): 'min_max' must be true or false. "
                                 f"Received: {min_max!r}")
    if edges is not None:
        edges = check_edges(edges, f"Query {i} ({variable!r}): 'edges'")
    bounds = query.get("bounds")
    if bounds is not None:
        if not (isinstance(bounds, (list, tuple)) and len(bounds) == 2
                and all(_finite(b) for b in bounds) and bounds[0] < bounds[1]):
            raise ConfigurationError(f"Query {i} ({variable!r}): 'bounds' must be [low, high], "
                                     f"finite, low < high. Received: {bounds!r}")
        bounds = (float(bounds[0]), float(bounds[1]))
    return Query(variable, float(shift), min_max, edges, bounds)


def _finite(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def check_edges(edges: Any, what: str) -> np.ndarray:
    """``edges`` as float64 bin edges, or ``ConfigurationError`` saying what is wrong."""
    try:
        arr = np.asarray(edges, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{what} must be numbers. Received: {edges!r}") from None
    if arr.ndim != 1 or not 2 <= arr.size <= MAX_BINS + 1:
        raise ConfigurationError(f"{what} must be a list of 2 to {MAX_BINS + 1} bin edges. "
                                 f"Received: shape {arr.shape}")
    if not np.isfinite(arr).all() or not (np.diff(arr) > 0).all():
        raise ConfigurationError(f"{what} must be finite and strictly increasing. "
                                 f"Received: {_short(arr)}")
    return arr


def _short(arr: np.ndarray) -> str:
    values = ", ".join(f"{v:g}" for v in arr[:6])
    return f"[{values}{', ...' if arr.size > 6 else ''}]"


# --- secure aggregation -----------------------------------------------------------------------

#: A query's additive statistics in a secure reply's vector, in order; with bin edges,
#: ``below``, ``above`` and one count per bin follow. ``suppressed`` is 1 when the node
#: withheld the variable whole, ``withheld`` the number of histogram cells it withheld.
SECURE_FIELDS = ("count", "missing", "sum", "sumsq", "suppressed", "withheld")


def additive_vector(result: Mapping[str, Any]) -> np.ndarray:
    """One query's result as the float64 vector a node protects (see :data:`SECURE_FIELDS`).

    Vectors of several nodes add up to the pooled statistics, suppression counts included.
    """
    add = result["additive"]
    cells = withheld_cells(result)
    suppressed = any(w["cell"] == "all" for w in result["withheld"])
    head = [add["count"], add["missing"], add["sum"], add["sumsq"], float(suppressed), cells]
    if "hist" not in add:
        return np.array(head, dtype=np.float64)
    return np.concatenate([np.array([*head, add["below"], add["above"]], dtype=np.float64),
                           np.asarray(add["hist"], dtype=np.float64)])


def withheld_cells(result: Mapping[str, Any]) -> int:
    """How many histogram cells a node withheld in one result (they are not named)."""
    return sum(int(w.get("cells", 0)) for w in result["withheld"] if w.get("cell") == "cells")


def additive_from_vector(vector: np.ndarray, bins: int) -> dict[str, Any]:
    """The pooled additive statistics from a summed :func:`additive_vector` (counts exact)."""
    v = np.asarray(vector, dtype=np.float64)
    out: dict[str, Any] = dict(zip(SECURE_FIELDS, v[:len(SECURE_FIELDS)].tolist(),
                                   strict=True))
    for key in ("count", "missing", "suppressed", "withheld"):
        out[key] = int(round(out[key]))
    if bins:
        head = len(SECURE_FIELDS)
        out.update(below=int(round(v[head])), above=int(round(v[head + 1])),
                   hist=np.rint(v[head + 2:]).astype(np.int64))
    return out


def vector_size(bins: int) -> int:
    """The length of :func:`additive_vector` for a query with ``bins`` bins (0: none)."""
    return len(SECURE_FIELDS) + (bins + 2 if bins else 0)


def check_split(split: Any) -> float:
    """``split``: a positive power of two (``ConfigurationError`` otherwise)."""
    if not (isinstance(split, float) and math.isfinite(split) and split > 0
            and math.frexp(split)[0] == 0.5):
        raise ConfigurationError(f"Secure statistics: 'split' must be a positive power of two. "
                                 f"Received: split={split!r}")
    return split
