"""The node runtime: a hospital's dataset registry, round executor and message loop."""

from .node import Node
from .registry import DatasetRegistry

__all__ = ["DatasetRegistry", "Node"]
