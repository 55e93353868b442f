"""The node runtime: a hospital's dataset registry, round executor and message loop."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedcore.node.node import Node
    from fedcore.node.registry import DatasetRegistry

__all__ = ["DatasetRegistry", "Node"]

# Imported on first use (PEP 562): a plan worker imports the executor and the registry from
# here, not the node's message loop, governance and secure aggregation.
_HOMES = {"Node": "fedcore.node.node", "DatasetRegistry": "fedcore.node.registry"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'fedcore.node' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
