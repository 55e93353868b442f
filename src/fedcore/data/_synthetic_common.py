"""What the synthetic generators share: where the signal goes, how a site names things."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd


def signal_region(shape: Sequence[int]) -> tuple[slice, ...]:
    """The cube (a quarter of each side, off centre) where the T1 signal is planted."""
    return tuple(slice(s // 4, s // 4 + max(1, s // 4)) for s in shape)


def _site_frame(frame: pd.DataFrame, columns: Mapping[str, str] | None,
                codes: Mapping[str, Mapping[Any, Any]] | None,
                scales: Mapping[str, float] | None) -> pd.DataFrame:
    """``frame`` (harmonised) as a site writes it: its codes, units and column names."""
    out = frame.copy()
    for col, table in (codes or {}).items():
        out[col] = out[col].map(lambda v, t=table: t.get(v, v))
    for col, factor in (scales or {}).items():
        out[col] = np.round(out[col] * factor, 3)
    return out.rename(columns=dict(columns or {}))
