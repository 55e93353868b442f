from __future__ import annotations

import numpy as np
import pytest

from fedcore.params import ParameterSet


def test_order_is_part_of_the_value():
    a = ParameterSet({"x": np.zeros(2), "y": np.ones(1)})
    b = ParameterSet([("y", np.ones(1)), ("x", np.zeros(2))])
    assert list(a) == ["x", "y"] and not a.equal(b) and a.equal(a.copy())


def test_copy_is_writable_and_independent():
    ro = np.zeros(3)
    ro.flags.writeable = False
    p = ParameterSet({"x": ro})
    c = p.copy()
    c["x"][0] = 5
    assert p["x"][0] == 0 and c["x"].flags.writeable


def test_layout_errors_name_the_difference():
    p = ParameterSet({"x": np.zeros((2, 3))})
    with pytest.raises(ValueError, match=r"shape \(3, 2\); expected \(2, 3\)"):
        p.check_layout({"x": np.zeros((3, 2))})
    assert p.nbytes == 48 and p.n_values == 6


def test_names_must_be_strings_and_values_numeric():
    with pytest.raises(TypeError):
        ParameterSet({1: np.zeros(1)})
    with pytest.raises(TypeError, match="numeric"):
        ParameterSet({"s": np.array(["a"])})


def test_snapshot_is_an_equal_copy_that_can_never_be_written():
    live = np.arange(6, dtype=np.float32).reshape(2, 3)
    p = ParameterSet({"w": live, "b": np.zeros(0), "step": np.int64(3)})
    snap = p.snapshot()
    assert snap.equal(p) and [a.shape for a in snap.values()] == [(2, 3), (0,), ()]
    live[0, 0] = 99  # the model goes on training: the snapshot does not move
    assert snap["w"][0, 0] == 0
    with pytest.raises(ValueError):
        snap["w"].flags.writeable = True
    with pytest.raises(ValueError):
        snap["w"][0, 0] = 1
    assert snap.snapshot() is snap  # nothing left to copy
    assert snap.copy()["w"].flags.writeable


def test_views_follow_the_order_and_cannot_change_the_set():
    params = ParameterSet({"w": np.zeros(2), "b": np.ones(1)})
    assert list(params.keys()) == list(params) == ["w", "b"]
    assert [id(a) for a in params.values()] == [id(params["w"]), id(params["b"])]
    assert [(k, id(a)) for k, a in params.items()] == [(k, id(params[k])) for k in params]
    assert "w" in params and "x" not in params and 1 not in params
    for view in (params.keys(), params.values(), params.items()):
        assert not hasattr(view, "__setitem__") and not hasattr(view, "pop")
    assert dict(params.items()).keys() == {"w", "b"} and len(params.items()) == 2
