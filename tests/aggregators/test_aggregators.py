from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from fedcore.aggregators import FedAvg
from fedcore.errors import ConfigurationError
from fedcore.params import ParameterSet


def test_fedavg_matches_a_hand_computed_weighted_mean():
    g = ParameterSet({"w": np.zeros((2, 2), np.float32), "n": np.array(0, np.int64)})
    a = ParameterSet({"w": np.array([[1, 2], [3, 4]], np.float32), "n": np.array(10)})
    b = ParameterSet({"w": np.array([[5, 6], [7, 8]], np.float32), "n": np.array(20)})
    agg = FedAvg()
    agg.start(g, 1)
    agg.add(a, 10, "a")
    agg.add(b, 30, "b")
    out = agg.result()
    # (10 * a + 30 * b) / 40, by hand: w = [[4, 5], [6, 7]], n = (100 + 600) / 40 = 17.5 -> 18
    np.testing.assert_array_equal(out["w"], np.array([[4, 5], [6, 7]], np.float32))
    assert out["w"].dtype == np.float32
    assert out["n"] == 18 and out["n"].dtype == np.int64


def test_fedavg_refuses_mismatched_updates_and_bad_weights():
    g = ParameterSet({"w": np.zeros(3)})
    agg = FedAvg()
    agg.start(g, 1)
    with pytest.raises(ValueError, match="shape"):
        agg.add(ParameterSet({"w": np.zeros(4)}), 1.0, "n1")
    with pytest.raises(ValueError, match="parameter names"):
        agg.add(ParameterSet({"v": np.zeros(3)}), 1.0, "n1")
    with pytest.raises(ConfigurationError, match="positive"):
        agg.add(ParameterSet({"w": np.zeros(3)}), 0, "n1")
    with pytest.raises(ConfigurationError, match="before any update"):
        agg.result()


def _peak_bytes(n_nodes: int, size: int) -> int:
    g = ParameterSet({"w": np.zeros(size, np.float32)})
    agg = FedAvg()
    agg.start(g, 1)
    tracemalloc.start()
    tracemalloc.reset_peak()
    for i in range(n_nodes):
        update = ParameterSet({"w": np.full(size, float(i), np.float32)})  # arrives, is folded
        agg.add(update, 1.0 + i, f"n{i}")
        del update
    result = agg.result()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert result["w"][0] == pytest.approx(sum(i * (1 + i) for i in range(n_nodes))
                                           / sum(1 + i for i in range(n_nodes)), rel=1e-6)
    return peak


def test_streaming_fedavg_memory_does_not_grow_with_nodes():
    size = 1_000_000  # 4 MB per float32 update
    few, many = _peak_bytes(3, size), _peak_bytes(40, size)
    assert many < few * 1.1, (few, many)
    assert many < 8 * size * 4  # a handful of model copies, not 40


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32, np.int64,
                                   np.bool_])
def test_fedavg_is_the_float64_fold_cast_back_bit_for_bit(dtype):
    """Each update widened to float64, times its weight, summed in order, divided, cast back."""
    rng = np.random.default_rng(3)
    shapes = {"w": (300, 70), "b": (70,), "scalar": (), "big": (1 << 18) + 5, "empty": (0, 3)}

    span = {np.float16: 3, np.float32: 30}.get(dtype, 150)  # finite in the dtype

    def array(shape):
        x = rng.standard_normal(shape) * 10.0 ** rng.integers(-span, span, shape)
        return (x > 0) if dtype is np.bool_ else x.astype(dtype)

    reference = ParameterSet({k: array(s) for k, s in shapes.items()})
    updates = [ParameterSet({k: array(s) for k, s in shapes.items()}) for _ in range(5)]
    weights = [143.0, 1.0, 0.3, 1e-3, 77.7]
    agg = FedAvg()
    agg.start(reference, 1)
    for u, w in zip(updates, weights, strict=True):
        agg.add(u, w)
    result = agg.result()
    for k in shapes:
        sums = np.zeros(np.shape(reference[k]), np.float64)
        for u, w in zip(updates, weights, strict=True):
            sums = sums + np.multiply(u[k], w, dtype=np.float64)
        mean = sums / sum(weights)
        if np.dtype(dtype).kind in "iub":
            mean = np.rint(mean)
        expected = mean.astype(dtype)
        assert result[k].dtype == expected.dtype and result[k].shape == expected.shape
        assert expected.tobytes() == result[k].tobytes(), k


def _fresh_result(reference: ParameterSet, updates: list[ParameterSet],
                  weights: list[float]) -> ParameterSet:
    agg = FedAvg()
    agg.start(reference, 1)
    for u, w in zip(updates, weights, strict=True):
        agg.add(u, w)
    return agg.result()


def test_fedavg_reused_over_rounds_gives_each_round_a_fresh_aggregators_bits():
    """The sums' memory serves the next round: no round sees another's values, and a
    model returned earlier stays as it was."""
    rng = np.random.default_rng(11)

    def model(shapes):
        return ParameterSet({k: rng.standard_normal(s).astype(np.float32)
                             for k, s in shapes.items()})

    same = {"w": (40, 30), "b": (30,)}
    changed = {"w": (40, 31), "b": (30,), "extra": (5,)}  # a new shape and a new name
    agg = FedAvg()
    kept = []
    for rnd, shapes in enumerate([same, same, changed, same], start=1):
        reference = model(shapes)
        updates = [model(shapes) for _ in range(3)]
        weights = [10.0 + rnd, 3.5, 0.25 * rnd]
        agg.start(reference, rnd)
        for u, w in zip(updates, weights, strict=True):
            agg.add(u, w)
        out = agg.result()
        want = _fresh_result(reference, updates, weights)
        assert list(out) == list(want)
        for k in want:
            assert out[k].dtype == want[k].dtype and out[k].tobytes() == want[k].tobytes()
        kept.append((out, {k: v.tobytes() for k, v in out.items()}))
    for out, bits in kept:  # later rounds wrote into the sums, never into a result
        assert {k: v.tobytes() for k, v in out.items()} == bits


def test_fedavg_first_update_that_fails_leaves_no_partial_sums():
    g = ParameterSet({"w": np.zeros(3), "z": np.zeros(2)})
    agg = FedAvg()
    agg.start(g, 1)
    agg.add(ParameterSet({"w": np.ones(3), "z": np.ones(2)}), 1.0)
    agg.result()
    agg.start(g, 2)
    # "w" fits, "z" cannot be widened to float64: the update is refused as a whole.
    with pytest.raises(TypeError):
        agg.add(ParameterSet({"w": np.full(3, 7.0), "z": np.ones(2, np.complex128)}), 2.0)
    with pytest.raises(ConfigurationError, match="before any update"):
        agg.result()
    agg.add(ParameterSet({"w": np.full(3, 2.0), "z": np.full(2, 4.0)}), 3.0)
    out = agg.result()
    np.testing.assert_array_equal(out["w"], np.full(3, 2.0))
    np.testing.assert_array_equal(out["z"], np.full(2, 4.0))
