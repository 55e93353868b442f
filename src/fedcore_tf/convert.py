"""Keras weights <-> ParameterSet, with names that are stable across processes.

A weight is named ``"{layer index}.{variable name}"`` (``"0.kernel"``, ``"0.bias"``,
``"2.moving_mean"``), from the model's ``layers`` in order, like a torch ``Sequential``'s
state_dict. Keras' own layer names (``dense_3``) come from a per-process counter, so they
are not used.

Copies. :func:`get_parameters` copies nothing on the CPU: ``np.asarray`` of a variable's
read value is a read-only view of its buffer, and it stays a snapshot (TensorFlow copies a
variable's buffer before updating it in place while another tensor holds it), whereas
``variable.numpy()`` would copy. :func:`set_parameters` makes one copy per weight
(``variable.assign`` of a numpy array of the variable's dtype: TensorFlow converts it into a
buffer of its own, which the variable takes over), with no extra copy when the received
array already has the variable's dtype. Handing TensorFlow a numpy buffer instead (DLPack)
would make loading look cheaper, but TensorFlow never updates a buffer it does not own in
place: the first training step would copy every weight again.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

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


def _tf_variable(weight: Any) -> Any:
    """The ``tf.Variable`` behind a Keras 3 variable (a Keras 2 weight is one)."""
    value = getattr(weight, "value", None)
    return value if isinstance(value, tf.Variable) else weight


def get_parameters(model: Any) -> ParameterSet:
    """The model's weights as numpy arrays (read-only snapshots; views on the CPU)."""
    return ParameterSet((name, np.asarray(_tf_variable(w).read_value()))
                        for name, w in named_weights(model))


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
