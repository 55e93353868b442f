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
