"""JAX pytrees <-> ParameterSet: leaves flattened to stable ``"/"``-joined path names.

A pytree of arrays (nested dicts, lists, tuples, named tuples) becomes a ParameterSet whose
names are the leaves' paths, ``"layers/0/w"``, in ``jax.tree_util``'s flattening order
(dict keys sorted), so they are the same in every process. On the CPU, reading parameters
copies nothing: ``np.asarray`` of a JAX array is a read-only view of its buffer (JAX arrays
are immutable, so the view stays valid after training: training makes new arrays).

Loading parameters makes one copy per leaf, in the leaf's own dtype. On the CPU that copy is
a numpy copy into a fresh 64-byte-aligned buffer that JAX then adopts without copying
(DLPack): ``jax.device_put`` and ``jnp.array`` of a large numpy array copy several times
slower than memcpy on the CPU (bench/backend_overhead.py). Small leaves are moved in one
jitted call instead, which costs less per leaf than adopting each. On an accelerator the copy
is the transfer, ``jax.device_put`` to the leaf's device.
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

    Each leaf keeps ``tree``'s dtype and device. ``params`` may be read-only (views of a
    received frame): they are copied into new arrays, never written, and changing them
    afterwards does not change the new arrays.
    """
    current = get_parameters(tree)
    current.check_layout(params, what="received model")
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    new: list[Any] = []
    small: list[tuple[int, np.ndarray]] = []  # small host leaves: copied in one dispatch
    for name, leaf in zip(current, leaves, strict=True):
        dtype = np.dtype(leaf.dtype)
        if isinstance(leaf, jax.Array) and any(d.platform != "cpu" for d in leaf.devices()):
            new.append(jax.device_put(np.asarray(params[name], dtype=dtype), leaf.sharding))
            continue
        host = _private_copy(params[name], dtype)
        if host.nbytes < _SMALL:
            small.append((len(new), host))
            new.append(None)
        else:
            new.append(_adopt(host))
    if small:
        for (i, _), array in zip(small, _copied([h for _, h in small]), strict=True):
            new[i] = array
    for i, leaf in enumerate(leaves):  # a leaf on another CPU device than the default
        if isinstance(leaf, jax.Array) and new[i].devices() != leaf.devices():
            new[i] = jax.device_put(new[i], leaf.sharding)
    return jax.tree_util.tree_unflatten(treedef, new)


_ALIGN = 64  # XLA's CPU client adopts a host buffer without copying only when so aligned
#: Bytes under which one jitted copy of all such leaves is faster than adopting each
#: buffer (DLPack costs ~30 us a leaf; a jitted copy ~4 us a leaf plus ~1 ns a byte).
_SMALL = 32 * 1024


def _private_copy(value: Any, dtype: np.dtype) -> np.ndarray:
    """A copy of ``value`` in ``dtype``, in a fresh 64-byte-aligned buffer nobody else holds."""
    value = np.asarray(value)
    nbytes = value.size * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    out = raw[start:start + nbytes].view(dtype).reshape(value.shape)
    np.copyto(out, value, casting="unsafe")
    return out


def _adopt(host: np.ndarray) -> Any:
    """A JAX array over ``host``'s buffer (no copy): safe, since nobody else holds it."""
    try:
        return jnp.from_dlpack(host)
    except (BufferError, TypeError, ValueError):  # a dtype DLPack cannot carry (bfloat16)
        return jnp.asarray(host)


@jax.jit
def _copied(arrays: list[Any]) -> list[Any]:
    """Device arrays equal to ``arrays`` (host arrays): one dispatch for all of them."""
    return list(arrays)


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
