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
    state = module.state_dict()
    if list(state) != list(params) or any(
        tuple(t.shape) != np.shape(params[name]) for name, t in state.items()
    ):
        ParameterSet((k, np.empty(v.shape, np.uint8)) for k, v in state.items()).check_layout(
            params, what="received model"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            _copy_into(tensor, np.asarray(params[name]))


def _copy_into(tensor: torch.Tensor, array: np.ndarray) -> None:
    if tensor.device.type == "cpu":
        try:
            target = tensor.numpy()  # a view: numpy copies straight into the tensor
        except (TypeError, RuntimeError):  # a dtype numpy lacks (bfloat16...)
            pass
        else:
            np.copyto(target, array, casting="unsafe")  # casts as Tensor.copy_ does
            return
    # torch.from_numpy would wrap a read-only array in a writable tensor (and warn).
    source = torch.from_numpy(array) if array.flags.writeable else torch.tensor(array)
    tensor.copy_(source)


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
