"""torch state_dict <-> ParameterSet, without copies on the CPU."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from fedcore.params import ParameterSet


def get_parameters(module: torch.nn.Module) -> ParameterSet:
    """The module's state (parameters and buffers) as numpy arrays sharing its memory."""
    return ParameterSet(
        (name, t.detach().cpu().numpy()) for name, t in module.state_dict().items()
    )


def set_parameters(module: torch.nn.Module, params: ParameterSet) -> None:
    """Copy ``params`` into the module's state in place (shapes and names are checked)."""
    state = module.state_dict()
    ParameterSet((k, np.empty(v.shape)) for k, v in state.items()).check_layout(
        params, what="received model"
    )
    with torch.no_grad(), warnings.catch_warnings():
        # Received arrays are read-only views of the frame; copy_ only reads them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, tensor in state.items():
            tensor.copy_(torch.from_numpy(params[name]))


def to_tensor(array: object, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor sharing memory with ``array`` when possible."""
    if isinstance(array, torch.Tensor):
        return array if dtype is None else array.to(dtype)
    arr = np.asarray(array)
    if not arr.flags.writeable:
        arr = arr.copy()
    tensor = torch.from_numpy(arr)
    return tensor if dtype is None else tensor.to(dtype)
