"""The node runtime: a hospital's dataset registry, round executor and message loop."""

from fedcore.node.node import Node
from fedcore.node.registry import DatasetRegistry

__all__ = ["DatasetRegistry", "Node"]
