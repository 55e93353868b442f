"""scikit-learn estimator attributes <-> ParameterSet."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedcore.params import ParameterSet

# Learned arrays per family: plain attributes, and list attributes (one array per layer).
_FAMILIES: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
    ("mlp", (), ("coefs_", "intercepts_")),
    ("linear", ("coef_", "intercept_"), ()),
    ("gaussian_nb", ("theta_", "var_", "class_count_", "class_prior_"), ()),
]


def family(model: Any) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """The family of learned attributes ``model`` has (after it was primed)."""
    for fam in _FAMILIES:
        _, plain, lists = fam
        if all(hasattr(model, a) for a in plain + lists):
            return fam
    raise TypeError(
        f"{type(model).__name__} has none of the learned attributes fedcore federates "
        f"({[f[1] + f[2] for f in _FAMILIES]})."
    )


def get_parameters(model: Any) -> ParameterSet:
    """The model's learned arrays, named ``coef_``, ``coefs_.0``..."""
    _, plain, lists = family(model)
    out: dict[str, np.ndarray] = {a: np.asarray(getattr(model, a)) for a in plain}
    for a in lists:
        for i, arr in enumerate(getattr(model, a)):
            out[f"{a}.{i}"] = np.asarray(arr)
    return ParameterSet(out)


def set_parameters(model: Any, params: ParameterSet) -> None:
    """Copy ``params`` into the model's learned attributes (shapes are checked)."""
    get_parameters(model).check_layout(params, what="received model")
    _, plain, lists = family(model)
    for a in plain:
        setattr(model, a, np.array(params[a], copy=True))
    for a in lists:
        n = len(getattr(model, a))
        setattr(model, a, [np.array(params[f"{a}.{i}"], copy=True) for i in range(n)])
