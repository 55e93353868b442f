"""Keras weights <-> ParameterSet, with names that are stable across processes.

A weight is named ``"{layer index}.{variable name}"`` (``"0.kernel"``, ``"0.bias"``,
``"2.moving_mean"``), from the model's ``layers`` in order, like a torch ``Sequential``'s
state_dict. Keras' own layer names (``dense_3``) come from a per-process counter, so they
are not used.

Copies: TensorFlow gives no zero-copy view of a variable's buffer (``variable.numpy()``
reads it into a new array), so :func:`get_parameters` makes one copy per weight, and
:func:`set_parameters` one more (``variable.assign`` of a numpy array), with no extra copy
when the received array already has the variable's dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedcore.params import ParameterSet

__all__ = ["get_parameters", "named_weights", "set_parameters"]


def named_weights(model: Any) -> list[tuple[str, Any]]:
    """``(name, variable)`` of every weight of ``model`` (trainable or not), in order."""
    out: list[tuple[str, Any]] = []
    seen: set[str] = set()
    for i, layer in enumerate(model.layers):
        for w in layer.weights:
            short = str(w.name).split("/")[-1].split(":")[0]
            name = f"{i}.{short}"
            k = 1
            while name in seen:  # two weights of one layer with the same short name
                name = f"{i}.{short}_{k}"
                k += 1
            seen.add(name)
            out.append((name, w))
    return out


def numpy_dtype(variable: Any) -> np.dtype:
    """The numpy dtype of a Keras 2, Keras 3 or TensorFlow variable."""
    dtype = variable.dtype
    return np.dtype(getattr(dtype, "as_numpy_dtype", dtype))


def get_parameters(model: Any) -> ParameterSet:
    """The model's weights as numpy arrays (one copy each: TF shares no buffer)."""
    return ParameterSet((name, np.asarray(w.numpy())) for name, w in named_weights(model))


def set_parameters(model: Any, params: ParameterSet) -> None:
    """Assign ``params`` to the model's weights (names and shapes are checked first).

    ``params`` may be read-only (views of a received frame): they are only read.
    """
    named = named_weights(model)
    if [n for n, _ in named] != list(params) or any(
        tuple(w.shape) != np.shape(params[n]) for n, w in named
    ):
        ParameterSet((n, np.empty(tuple(w.shape), np.uint8)) for n, w in named).check_layout(
            params, what="received model")
    for name, w in named:
        w.assign(np.asarray(params[name], dtype=numpy_dtype(w)))
