"""Datasets a node exposes to plans: metadata and arrays, never the file path."""

from fedcore.data import synthetic
from fedcore.data._base import Dataset, Items, Subset, merge_metadata
from fedcore.data.array import ArrayDataset
from fedcore.data.dicom import DicomDataset
from fedcore.data.image_folder import ImageFolderDataset
from fedcore.data.loading_plan import DataLoadingPlan
from fedcore.data.medical_folder import MedicalFolderDataset
from fedcore.data.tabular import TabularDataset

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
