"""Datasets a node exposes to plans: metadata and arrays, never the file path."""

from ._base import Dataset, Subset, merge_metadata
from .array import ArrayDataset
from .tabular import TabularDataset

__all__ = ["ArrayDataset", "Dataset", "Subset", "TabularDataset", "merge_metadata"]
