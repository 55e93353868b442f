"""The statistics protocol both sides check: query limits, bin edges, the additive vector.

A :class:`~fedcore.wire.messages.StatsRequest` holds up to :data:`MAX_QUERIES` queries, each a
map of ``variable``, ``shift``, ``min_max`` and bin ``edges`` (:func:`check_query`). Under
secure aggregation a node packs each query's additive statistics in one float64 vector
(:func:`additive_vector`, laid out as :data:`SECURE_FIELDS`) and the researcher reads the
summed vector back (:func:`additive_from_vector`); the node computes the statistics in
:mod:`fedcore.node.statistics`, the researcher pools them in
:mod:`fedcore.researcher.statistics`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedcore.errors import ConfigurationError

__all__ = [
    "IMAGE_VARIABLE",
    "MAX_BINS",
    "MAX_QUERIES",
    "SECURE_FIELDS",
    "additive_from_vector",
    "additive_vector",
    "check_edges",
    "check_query",
    "check_split",
    "vector_size",
]

#: The one variable of an image folder: its pixel intensities.
IMAGE_VARIABLE = "intensity"
#: The most queries one request may hold.
MAX_QUERIES = 256
#: The most bins one histogram query may ask for.
MAX_BINS = 100_000

# --- queries ----------------------------------------------------------------------------------


def check_query(i: int, query: Any) -> tuple[str, float, bool, np.ndarray | None]:
    """Query ``i`` of a request as ``(variable, shift, min_max, edges)``, checked.

    A malformed query raises ``ConfigurationError`` naming its key.
    """
    if not isinstance(query, Mapping):
        raise ConfigurationError(f"Query {i} must be a map. Received: {type(query).__name__}")
    variable, shift = query.get("variable"), query.get("shift", 0.0)
    min_max, edges = query.get("min_max", False), query.get("edges")
    if not isinstance(variable, str) or not variable:
        raise ConfigurationError(f"Query {i}: 'variable' must be a non-empty string. "
                                 f"Received: {variable!r}")
    if not isinstance(shift, (int, float)) or isinstance(shift, bool) or not math.isfinite(
            shift):
        raise ConfigurationError(f"Query {i} ({variable!r}): 'shift' must be a finite number. "
                                 f"Received: {shift!r}")
    if not isinstance(min_max, bool):
        raise ConfigurationError(f"Query {i} ({variable!r}): 'min_max' must be true or false. "
                                 f"Received: {min_max!r}")
    if edges is not None:
        edges = check_edges(edges, f"Query {i} ({variable!r}): 'edges'")
    return variable, float(shift), min_max, edges


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
    cells = sum(1 for w in result["withheld"] if w["cell"] in ("bin", "below", "above"))
    suppressed = any(w["cell"] == "all" for w in result["withheld"])
    head = [add["count"], add["missing"], add["sum"], add["sumsq"], float(suppressed), cells]
    if "hist" not in add:
        return np.array(head, dtype=np.float64)
    return np.concatenate([np.array([*head, add["below"], add["above"]], dtype=np.float64),
                           np.asarray(add["hist"], dtype=np.float64)])


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
