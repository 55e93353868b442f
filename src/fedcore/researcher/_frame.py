"""A round's rows as a DataFrame: ``pd.DataFrame(rows)``, the same frame, built for less.

A round's rows (one per node) have the same keys and value types round after round. Where
every value of a column is of one exact type (``int`` within int64, ``float``, ``bool``,
``str``), pandas is handed one block per dtype, the dtype it would have inferred, instead of
inferring each column from a table of objects (10 rows of 17 columns took ~0.6 ms of the
event loop that way). What depends only on the rows' count, names and types (the column
index, which column goes to which block, the row index) is kept from the last frame while
those and pandas' text settings stay the same. Any other rows (missing keys, ``None``,
mixed types) go to ``pd.DataFrame``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pandas.arrays import StringArray

try:  # pandas >= 3: a frame from its blocks, without inferring anything
    from pandas.api.internals import create_dataframe_from_blocks
except ImportError:  # pragma: no cover - older pandas infers, as it always did
    create_dataframe_from_blocks = None
try:  # pandas' settings, read as its own ``using_string_dtype()`` reads them (get_option,
    # with its key lookup, cost ~20 us a frame)
    from pandas._config import _global_config
except ImportError:  # pragma: no cover - then every frame is inferred by pandas
    create_dataframe_from_blocks = None

#: pandas' own constructor of an array around an ndarray, without checking its values.
_simple_new = getattr(StringArray, "_simple_new", None)

__all__ = ["rows_frame"]

#: The dtype pandas infers for a column whose values are all of one of these exact types
#: (``str``: the dtype it infers for text, ``str`` or ``object`` with its settings).
_SCALARS: dict[type, np.dtype | None] = {int: np.dtype(np.int64), float: np.dtype(np.float64),
                                         bool: np.dtype(np.bool_), str: None}


@dataclass(frozen=True)
class _Layout:
    """How rows of given column names and value types become blocks.

    ``key``: the row count, the names, the types, and pandas' settings for text (inferred as
    ``str``, and its storage); ``index``: the rows' index; ``names``: the column index
    pandas infers for the names; ``blocks``: each block's dtype and the positions of its
    columns, in pandas' order. Text is a numpy ``object`` block, or one block per column
    where pandas infers its ``str`` dtype.
    """

    key: tuple[Any, ...]
    index: pd.RangeIndex
    names: pd.Index
    blocks: list[tuple[Any, list[int]]]


_last: _Layout | None = None


def rows_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """``pd.DataFrame(rows)``: the same values, dtypes, index and column index."""
    table = _table(rows) if create_dataframe_from_blocks is not None else None
    layout = None if table is None else _layout(rows[0], table)
    if table is None or layout is None:
        return pd.DataFrame(rows)
    columns = list(zip(*table, strict=True))
    arrays: list[tuple[Any, np.ndarray]] = []
    for dtype, place in layout.blocks:
        if isinstance(dtype, np.dtype):
            try:
                values = np.array([columns[i] for i in place], dtype)
            except OverflowError:  # an int beyond int64: pandas' inference decides
                return pd.DataFrame(rows)
        else:  # pandas' str dtype: one block per column
            values = _text(columns[place[0]], dtype)
        arrays.append((values, np.array(place)))
    # Shallow copies (the labels are read-only and shared; the name is the frame's own).
    return create_dataframe_from_blocks(arrays, index=layout.index._view(),
                                        columns=layout.names._view())


def _text(values: tuple[str, ...], dtype: Any) -> Any:
    """The array of pandas' ``str`` dtype that pandas makes for ``values``, all ``str``.

    With the python storage it is a ``StringArray`` around an object array of the values:
    made here without ``_from_sequence``'s conversion of each value to ``str``, a no-op on
    values already checked to be ``str`` (~30 us a column in the loop, cold).
    """
    kind = dtype.construct_array_type()
    if kind is StringArray and _simple_new is not None:
        return _simple_new(np.array(values, dtype=object), dtype)
    return kind._from_sequence(values, dtype=dtype)


def _table(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]] | None:
    """Each row's values in the first row's key order, if every row has the same keys."""
    if not rows or not rows[0]:
        return None
    keys = rows[0].keys()  # the same keys, set-wise: pandas orders them by the first row
    if not all(map(keys.__eq__, map(dict.keys, rows))):
        return None
    if len(keys) == 1:
        (key,) = keys
        return [(row[key],) for row in rows]
    return list(map(operator.itemgetter(*keys), rows))


def _layout(first: dict[str, Any], table: list[tuple[Any, ...]]) -> _Layout | None:
    """The layout of ``table``, or ``None`` where a column's values are not of one type."""
    global _last
    types = tuple(map(type, table[0]))
    if not all(tuple(map(type, values)) == types for values in table):
        return None
    try:
        settings = (_global_config["future"]["infer_string"],
                    _global_config["mode"]["string_storage"])
    except (KeyError, TypeError):  # pragma: no cover - a pandas that keeps them elsewhere
        return None
    key = (len(table), tuple(first), types, *settings)
    last = _last
    if last is not None and last.key == key:
        return last
    if any(type(k) is not str for k in first) or not all(t in _SCALARS for t in types):
        return None
    names = pd.Index(list(first))
    blocks: dict[Any, tuple[Any, list[int]]] = {}  # numpy dtypes pooled, others apart
    for i, kind in enumerate(types):
        dtype = _SCALARS[kind]
        dtype = names.dtype if dtype is None else dtype  # text infers as the names' text
        pool = dtype if isinstance(dtype, np.dtype) else i
        blocks.setdefault(pool, (dtype, []))[1].append(i)
    _last = _Layout(key, pd.RangeIndex(len(table)), names, list(blocks.values()))
    return _last
