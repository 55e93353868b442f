"""torch state_dict <-> ParameterSet, without copies on the CPU."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedcore.params import ParameterSet


def get_parameters(module: torch.nn.Module) -> ParameterSet:
    """The module's state (parameters and buffers) as numpy arrays sharing its memory.

    Off the CPU (or for a tensor with its conjugate or negative bit set) they are copies.
    """
    # keep_vars: the tensors themselves, which numpy(force=True) detaches in one call.
    return ParameterSet(
        (name, t.numpy(force=True)) for name, t in module.state_dict(keep_vars=True).items()
    )


def set_parameters(module: torch.nn.Module, params: ParameterSet) -> None:
    """Copy ``params`` into the module's state in place (names and shapes are checked).

    ``params`` may be read-only (arrays decoded from a frame are views of it): they are only
    read, and never wrapped in a tensor that could write to them.
    """
    # keep_vars: the tensors themselves, without a detached copy of each (a node sets its
    # model every round); they are written through numpy views, or under no_grad.
    state = module.state_dict(keep_vars=True)
    if list(state) != list(params) or any(
        tuple(t.shape) != _shape(params[name]) for name, t in state.items()
    ):
        ParameterSet((k, np.empty(v.shape, np.uint8)) for k, v in state.items()).check_layout(
            params, what="received model"
        )
    rest = [(tensor, array) for name, tensor in state.items()
            if not _copy_through_numpy(tensor, array := np.asarray(params[name]))]
    if rest:
        with torch.no_grad():
            for tensor, array in rest:
                # torch.from_numpy would wrap a read-only array in a writable tensor (and
                # warn).
                tensor.copy_(torch.from_numpy(array) if array.flags.writeable
                             else torch.tensor(array))


def _shape(value: Any) -> tuple[int, ...]:
    return value.shape if isinstance(value, np.ndarray) else np.shape(value)


def _copy_through_numpy(tensor: torch.Tensor, array: np.ndarray) -> bool:
    """Copy ``array`` into a CPU ``tensor`` through a numpy view of it; whether it could."""
    # numpy(force=True) of a CPU tensor without a conjugate or negative bit is a view of its
    # memory (the detached tensor's numpy()); otherwise it would be a copy, written in vain.
    if tensor.device.type != "cpu" or tensor.is_conj() or tensor.is_neg():
        return False
    try:
        target = tensor.numpy(force=True)
    except (TypeError, RuntimeError):  # a dtype numpy lacks (bfloat16...)
        return False
    np.copyto(target, array, casting="unsafe")  # casts as Tensor.copy_ does
    return True


def to_tensor(array: object, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor sharing memory with ``array`` when possible."""
    if isinstance(array, torch.Tensor):
        return array if dtype is None else array.to(dtype)
    arr = np.asarray(array)
    if not arr.flags.writeable:
        arr = arr.copy()
    tensor = torch.from_numpy(arr)
    return tensor if dtype is None else tensor.to(dtype)


def to_device(batch: Any, device: torch.device) -> Any:
    """A collated batch (a tensor, or tuples, lists and dicts of them) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch
