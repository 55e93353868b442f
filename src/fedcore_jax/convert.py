"""JAX pytrees <-> ParameterSet: leaves flattened to stable ``"/"``-joined path names.

A pytree of arrays (nested dicts, lists, tuples, named tuples) becomes a ParameterSet whose
names are the leaves' paths, ``"layers/0/w"``, in ``jax.tree_util``'s flattening order
(dict keys sorted), so they are the same in every process. On the CPU, reading parameters
copies nothing: ``np.asarray`` of a JAX array is a read-only view of its buffer (JAX arrays
are immutable, so the view stays valid after training: training makes new arrays). Loading
parameters makes one copy per leaf (``jnp.array``), in the leaf's own dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedcore.params import ParameterSet

__all__ = ["get_parameters", "leaf_names", "mlp", "set_parameters"]


def _key_name(key: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def leaf_names(tree: Any) -> list[str]:
    """The ``"/"``-joined path of every leaf of ``tree``, in flattening order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return ["/".join(_key_name(k) for k in path) for path, _ in leaves]


def get_parameters(tree: Any) -> ParameterSet:
    """The leaves of ``tree`` as numpy arrays (views of the JAX buffers on the CPU)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return ParameterSet(("/".join(_key_name(k) for k in path), np.asarray(leaf))
                        for path, leaf in leaves)


def set_parameters(tree: Any, params: ParameterSet) -> Any:
    """A new pytree shaped like ``tree`` holding ``params`` (names and shapes are checked).

    Each leaf keeps ``tree``'s dtype. ``params`` may be read-only (views of a received
    frame): they are copied into new device arrays, never written.
    """
    current = get_parameters(tree)
    current.check_layout(params, what="received model")
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    new = [jnp.array(np.asarray(params[name]), dtype=leaf.dtype, copy=True)
           for name, leaf in zip(current, leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, new)


def mlp(sizes: list[int], key: Any) -> tuple[Callable[[Any, Any], Any], dict[str, Any]]:
    """A ReLU multi-layer perceptron: ``(apply_fn, params)`` for :meth:`init_model`.

    ``sizes`` lists the layer widths, input first (``[64, 32, 10]``). Weights are
    initialised like ``torch.nn.Linear`` (uniform in ``+-1/sqrt(fan_in)``). Parameters are
    named ``layers/0/b``, ``layers/0/w``...
    """
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=False):
        key, kw, kb = jax.random.split(key, 3)
        bound = 1.0 / np.sqrt(fan_in)
        layers.append({
            "w": jax.random.uniform(kw, (fan_in, fan_out), jnp.float32, -bound, bound),
            "b": jax.random.uniform(kb, (fan_out,), jnp.float32, -bound, bound),
        })

    def apply_fn(params: Any, x: Any) -> Any:
        *hidden, last = params["layers"]
        for layer in hidden:
            x = jax.nn.relu(x @ layer["w"] + layer["b"])
        return x @ last["w"] + last["b"]

    return apply_fn, {"layers": layers}
