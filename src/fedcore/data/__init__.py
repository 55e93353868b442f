"""Datasets a node exposes to plans: metadata and arrays, never the file path."""

from . import synthetic
from ._base import Dataset, Items, Subset, merge_metadata
from .array import ArrayDataset
from .image_folder import ImageFolderDataset
from .loading_plan import DataLoadingPlan
from .medical_folder import MedicalFolderDataset
from .tabular import TabularDataset

__all__ = [
    "ArrayDataset",
    "DataLoadingPlan",
    "Dataset",
    "ImageFolderDataset",
    "Items",
    "MedicalFolderDataset",
    "Subset",
    "TabularDataset",
    "merge_metadata",
    "synthetic",
]
