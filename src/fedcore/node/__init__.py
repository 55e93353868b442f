"""The node runtime: a hospital's dataset registry, round executor and message loop."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedcore import _lazy

if TYPE_CHECKING:
    from fedcore.node.node import Node
    from fedcore.node.registry import DatasetRegistry

__all__ = ["DatasetRegistry", "Node"]

# Imported on first use (PEP 562): a plan worker imports the executor and the registry from
# here, not the node's message loop, governance and secure aggregation.
_HOMES = {"Node": "fedcore.node.node", "DatasetRegistry": "fedcore.node.registry"}


__getattr__, __dir__ = _lazy.exports(__name__, _HOMES, globals(), __all__)
