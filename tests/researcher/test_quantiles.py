"""Quantiles from histograms with withheld cells: the bounds never lie, the values never drift."""

from __future__ import annotations

import numpy as np
import pytest

from fedcore.node._statistics_compute import _withhold
from fedcore.researcher._quantiles import auto_bins, bounds, quantiles


def _reply(values, edges, k):
    """What a node with ``values`` answers for ``edges`` under ``min_count = k``."""
    add = {"count": len(values), "hist": np.histogram(values, edges)[0],
           "below": int((values < edges[0]).sum()), "above": int((values > edges[-1]).sum())}
    result = {"additive": add, "withheld": []}
    _withhold(result, len(values), "values", k)
    add = result["additive"]
    hidden = add["count"] - int(add["hist"].sum()) - add["below"] - add["above"]
    cells = next((w["cells"] for w in result["withheld"] if w["cell"] == "cells"), 0)
    return add, hidden, cells


@pytest.mark.parametrize("seed", range(40))
def test_the_bounds_hold_the_truth_and_given_quantiles_stay_in_their_bin(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.choice([3, 5, 10]))
    nodes = [rng.gamma(2.0, 30.0, int(rng.integers(30, 200))) + 20 for _ in range(3)]
    edges = np.linspace(10, 150 + 100 * rng.random(), int(rng.integers(3, 25)) + 1)
    everything = np.concatenate(nodes)
    below_edge = np.array([(everything < e).sum() for e in edges], dtype=float)
    low = high = np.zeros(len(edges))
    counts, shown_below, shown_above, hidden = 0, 0, 0, 0
    for values in nodes:
        add, h, cells = _reply(values, edges, k)
        lo, hi = bounds(add["hist"].astype(float), add["below"], add["above"], h, cells)
        truth = np.array([(values < e).sum() for e in edges], dtype=float)
        assert np.all(lo <= truth) and np.all(truth <= hi)  # per node
        low, high = low + lo, high + hi
        counts = counts + add["hist"]
        shown_below, shown_above, hidden = (shown_below + add["below"],
                                            shown_above + add["above"], hidden + h)
    assert np.all(low <= below_edge) and np.all(below_edge <= high)  # pooled
    qs = [0.1, 0.25, 0.5, 0.75, 0.9]
    values, why = quantiles(edges, counts.astype(float), shown_below, shown_above, low, high,
                            len(everything), qs)
    width = edges[1] - edges[0]
    for q, value, reason in zip(qs, values, why, strict=True):
        if np.isnan(value):
            assert reason
            continue
        # The value's bin holds the rank-q value (numpy's 'inverted_cdf': no interpolation).
        truth = np.quantile(everything, q, method="inverted_cdf")
        assert abs(value - truth) <= width, (q, value, truth, width)


def test_crude_bounds_under_secure_aggregation_and_the_default_bins():
    counts = np.array([0.0, 10, 20, 0])
    low, high = bounds(counts, 0, 0, 7)  # no per-node detail: 7 values anywhere
    assert low.tolist() == [0, 0, 10, 30, 30] and high.tolist() == [7, 7, 17, 37, 37]
    assert auto_bins([148, 147, 147]) == 7
    assert auto_bins([10, 0]) == 1 and auto_bins([10 ** 6]) == 100
