"""Secure-aggregation rounds in memory: known updates, their plain weighted sum, sessions."""

from __future__ import annotations

import numpy as np

from fedcore.params import ParameterSet
from fedcore.secagg import NodeFloors
from fedcore.secagg.local import open_sessions

#: Node terms for in-memory tests of the schemes' arithmetic on small rounds and small keys
#: (a node's defaults refuse rounds of fewer than 3 nodes and keys below 2048 bits).
SMALL = NodeFloors(min_members=2, min_key_bits=256)


def make_round(n_nodes: int, size: int, seed: int = 0, with_extras: bool = False):
    """Updates with a float32 vector, a float64 matrix and an int64 counter, and weights."""
    rng = np.random.default_rng(seed)
    nodes = [f"node-{i:02d}" for i in range(n_nodes)]
    updates, weights, extras = {}, {}, {}
    for node in nodes:
        updates[node] = ParameterSet({
            "w": rng.standard_normal(size).astype(np.float32),
            "m": rng.uniform(-2, 2, (2, 3)),
            "count": np.array(int(rng.integers(0, 4))),
        })
        weights[node] = float(rng.integers(1, 500))
        if with_extras:
            extras[node] = {"control": ParameterSet({"c": rng.standard_normal(7)})}
    return nodes, updates, weights, extras


def plain_sum(updates, weights, nodes, key="w"):
    return sum(weights[n] * np.asarray(updates[n][key], dtype=np.float64) for n in nodes)


def check_sum(result, updates, weights, nodes, extras=None):
    sums, total, extras_sums, report = result
    assert total == sum(weights[n] for n in nodes)  # integer weights are exact
    scale = sum(weights[n] * 4.0 for n in nodes) * 2.0**-50  # float64 rounding of the sums
    for key in ("w", "m", "count"):
        want = plain_sum(updates, weights, nodes, key)
        err = np.max(np.abs(sums[key] - want))
        assert err <= report["error_bound"]["params"] + scale, (key, err)
        assert sums[key].dtype == np.float64 and sums[key].shape == want.shape
    if extras:
        want = sum(weights[n] * extras[n]["control"]["c"] for n in nodes)
        err = np.max(np.abs(extras_sums["control"]["c"] - want))
        assert err <= report["error_bound"]["extras"] + scale
    assert report["survivors"] == sorted(nodes)
    assert report["clipped"] == {"params": 0, "extras": 0}


def open_round(scheme, nodes, reference=None, floors=None):
    """A masking round up to the training options; returns (researcher, node sessions)."""
    return open_sessions(scheme, nodes, reference=reference, floors=floors)
