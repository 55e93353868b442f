"""Small synthetic biomedical datasets on disk, for tests and tutorials (no download).

Each generator writes files the way one hospital would, with a known signal planted in
them, and can name things the site's own way (folder names, column names, value codes,
units), so a :class:`~fedcore.data.DataLoadingPlan` has something to harmonise:

- :func:`medical_folder`: ``subject/modality/volume.nii.gz`` plus a demographics CSV; the
  ``T1`` volumes of subjects with ``diagnosis == 1`` are brighter in a fixed cube;
- :func:`image_folder`: ``class/image.png``; ``lesion`` images carry a bright square;
- :func:`site_csv`: a tabular cohort whose ``label`` depends on age and weight;
- :func:`dicom_folder`: ``patient/study/series/image.dcm`` (one MR study per patient, two
  series, slices stored out of order and rescaled) plus a demographics CSV, with planted
  identifying tags (names, IDs, dates, institution) that must never reach a researcher.

Site naming takes harmonised names to local ones, the inverse of a DataLoadingPlan:
``folders={"T1": "t1_mprage"}``, ``columns={"sex": "gender"}``,
``codes={"sex": {"M": 1, "F": 2}}``, ``scales={"age": 12}`` (ages written in months).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedcore.data._synthetic_common import _site_frame, signal_region
from fedcore.data._synthetic_dicom import SyntheticDicomFolder, dicom_folder
from fedcore.errors import ConfigurationError

__all__ = ["SyntheticDicomFolder", "SyntheticMedicalFolder", "dicom_folder", "image_folder",
           "medical_folder", "signal_region", "site_csv"]


@dataclass(frozen=True)
class SyntheticMedicalFolder:
    """Where :func:`medical_folder` wrote its files, and the truth it planted."""

    root: Path
    demographics: Path
    subject_column: str
    #: subject -> diagnosis (0 or 1): which subjects carry the signal in T1.
    labels: dict[str, int] = field(default_factory=dict)

    def register_options(self) -> dict[str, Any]:
        """The ``options`` a node passes to ``datasets.add(..., kind="medical-folder")``."""
        return {"demographics": str(self.demographics), "subject_column": self.subject_column}


def medical_folder(
    root: str | Path,
    *,
    n_subjects: int = 24,
    shape: Sequence[int] = (16, 16, 16),
    modalities: Sequence[str] = ("T1", "T2"),
    signal: float = 1.5,
    seed: int = 0,
    first_subject: int = 1,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    compress: bool = True,
    missing: Mapping[str, Sequence[str]] | None = None,
    folders: Mapping[str, str] | None = None,
    columns: Mapping[str, str] | None = None,
    codes: Mapping[str, Mapping[Any, Any]] | None = None,
    scales: Mapping[str, float] | None = None,
    subject_column: str = "subject",
) -> SyntheticMedicalFolder:
    """Write a MedicalFolder tree of random volumes under ``root`` and its demographics.

    Subjects are ``sub-001``... (from ``first_subject``), half of them (shuffled) with
    ``diagnosis`` 1. Volumes are float32 standard-normal noise; ``T1`` (when listed) adds
    ``signal`` inside :func:`signal_region` for diagnosed subjects. Demographics (harmonised
    names): ``age`` in years, ``sex`` as ``M``/``F``, ``diagnosis`` as 0/1; the CSV goes
    next to ``root`` as ``<root name>_demographics.csv``. ``missing`` maps a subject to
    modalities to leave out; the other keywords name things the site's way (module doc).
    """
    import nibabel as nib  # imported on first use, as in MedicalFolderDataset

    if n_subjects < 2:
        raise ConfigurationError(f"n_subjects must be at least 2. Received: {n_subjects}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    ids = [f"sub-{first_subject + i:03d}" for i in range(n_subjects)]
    diagnosis = rng.permutation(np.arange(n_subjects) % 2)
    demo = pd.DataFrame({
        "age": rng.integers(40, 86, n_subjects),
        "sex": rng.choice(["M", "F"], n_subjects),
        "diagnosis": diagnosis,
    })
    folders = dict(folders or {})
    absent = {k: set(v) for k, v in (missing or {}).items()}
    affine = np.diag([*map(float, spacing), 1.0])
    region = signal_region(shape)
    suffix = ".nii.gz" if compress else ".nii"
    for subject, dx in zip(ids, diagnosis, strict=True):
        for mod in modalities:
            vol = rng.standard_normal(shape, dtype=np.float32)
            if mod == "T1" and dx:
                vol[region] += signal
            if mod in absent.get(subject, ()):
                continue
            folder = root / subject / folders.get(mod, mod)
            folder.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(vol, affine), folder / f"{subject}_{mod.lower()}{suffix}")
    demo.insert(0, subject_column, ids)
    path = root.parent / f"{root.name}_demographics.csv"
    _site_frame(demo, columns, codes, scales).to_csv(path, index=False)
    return SyntheticMedicalFolder(root, path, (columns or {}).get(subject_column,
                                                                  subject_column),
                                  dict(zip(ids, diagnosis.tolist(), strict=True)))


def image_folder(
    root: str | Path,
    *,
    classes: Sequence[str] = ("lesion", "normal"),
    n_per_class: int = 12,
    size: Sequence[int] = (16, 16),
    mode: str = "L",
    fmt: str = "png",
    signal: int = 80,
    seed: int = 0,
    folders: Mapping[str, str] | None = None,
) -> Path:
    """Write ``root/<class>/<n>.<fmt>`` images; ``lesion`` ones carry a bright square.

    Images are grey (``mode="L"``) or colour (``"RGB"``) noise around 100; ``folders``
    names class folders the site's way. Needs Pillow (the ``images`` extra).
    """
    from fedcore.data.image_folder import _pil

    image = _pil()
    root = Path(root)
    rng = np.random.default_rng(seed)
    h, w = (int(s) for s in size)
    channels = () if mode == "L" else (3,)
    region = signal_region((h, w))
    folders = dict(folders or {})
    for cls in classes:
        folder = root / folders.get(cls, cls)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            pixels = rng.normal(100, 20, (h, w, *channels))
            if cls == "lesion":
                pixels[region] += signal
            arr = np.clip(pixels, 0, 255).astype(np.uint8)
            image.fromarray(arr, mode=mode).save(folder / f"{cls}_{i:03d}.{fmt}")
    return root


def site_csv(
    path: str | Path,
    *,
    n: int = 60,
    seed: int = 0,
    columns: Mapping[str, str] | None = None,
    codes: Mapping[str, Mapping[Any, Any]] | None = None,
    scales: Mapping[str, float] | None = None,
) -> Path:
    """Write a cohort CSV: ``age`` (years), ``sex`` (M/F), ``weight`` (kg), ``label`` (0/1).

    ``label`` is 1 when a noisy mix of age and weight is high. Site naming as in the
    module doc (``scales={"weight": 2.20462}`` writes pounds).
    """
    rng = np.random.default_rng(seed)
    age = rng.integers(30, 90, n)
    weight = np.round(rng.normal(75, 12, n), 1)
    score = (age - 60) / 15 + (weight - 75) / 12 + rng.normal(0, 0.5, n)
    frame = pd.DataFrame({"age": age, "sex": rng.choice(["M", "F"], n), "weight": weight,
                          "label": (score > 0).astype(int)})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _site_frame(frame, columns, codes, scales).to_csv(path, index=False)
    return path
