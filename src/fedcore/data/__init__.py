"""Datasets a node exposes to plans: metadata and arrays, never the file path."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedcore import _lazy

if TYPE_CHECKING:
    from fedcore.data import synthetic
    from fedcore.data._base import Dataset, Items, Subset, merge_metadata
    from fedcore.data.array import ArrayDataset
    from fedcore.data.dicom import DicomDataset
    from fedcore.data.image_folder import ImageFolderDataset
    from fedcore.data.loading_plan import DataLoadingPlan
    from fedcore.data.medical_folder import MedicalFolderDataset
    from fedcore.data.tabular import TabularDataset

# Each name is imported on first use (PEP 562): a node that only lists its datasets does not
# import pandas, which the tabular, folder and loading-plan modules need.
_HOMES = {
    "Dataset": "fedcore.data._base", "Items": "fedcore.data._base",
    "Subset": "fedcore.data._base", "merge_metadata": "fedcore.data._base",
    "ArrayDataset": "fedcore.data.array", "DicomDataset": "fedcore.data.dicom",
    "ImageFolderDataset": "fedcore.data.image_folder",
    "DataLoadingPlan": "fedcore.data.loading_plan",
    "MedicalFolderDataset": "fedcore.data.medical_folder",
    "TabularDataset": "fedcore.data.tabular",
}

__all__ = [
    "ArrayDataset",
    "DataLoadingPlan",
    "Dataset",
    "DicomDataset",
    "ImageFolderDataset",
    "Items",
    "MedicalFolderDataset",
    "Subset",
    "TabularDataset",
    "merge_metadata",
    "synthetic",
]


__getattr__, __dir__ = _lazy.exports(__name__, _HOMES, globals(), __all__)
