"""Synthetic DICOM series per patient (see :func:`fedcore.data.synthetic.dicom_folder`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedcore.data._synthetic_common import _site_frame, signal_region
from fedcore.errors import ConfigurationError

#: Stored integers map to intensities as ``stored * SLOPE + INTERCEPT`` (written per slice).
SLOPE, INTERCEPT = 0.001, -10.0


@dataclass(frozen=True)
class SyntheticDicomFolder:
    """Where :func:`dicom_folder` wrote its files, the truth it planted, the tags it wrote."""

    root: Path
    demographics: Path
    subject_column: str
    #: patient folder -> diagnosis (0 or 1): which patients carry the signal in T1.
    labels: dict[str, int] = field(default_factory=dict)
    #: the identifying values written into the files (names, IDs, dates, institution):
    #: none may ever show where a researcher can read.
    identifying: tuple[str, ...] = ()

    def register_options(self) -> dict[str, Any]:
        """The ``options`` a node passes to ``datasets.add(..., kind="dicom")``."""
        return {"demographics": str(self.demographics), "subject_column": self.subject_column}


def dicom_folder(
    root: str | Path,
    *,
    n_subjects: int = 24,
    shape: Sequence[int] = (8, 16, 16),
    series: Sequence[str] = ("T1", "T2"),
    signal: float = 1.5,
    seed: int = 0,
    first_subject: int = 1,
    descriptions: Mapping[str, str] | None = None,
    columns: Mapping[str, str] | None = None,
    codes: Mapping[str, Mapping[Any, Any]] | None = None,
    scales: Mapping[str, float] | None = None,
    subject_column: str = "subject",
    site: str = "Hospital",
) -> SyntheticDicomFolder:
    """Write one MR study per patient: ``root/<patient>/<study>/<series>/<image>.dcm``."""
    from fedcore.data.dicom import _pydicom

    pydicom = _pydicom()
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    if n_subjects < 2:
        raise ConfigurationError(f"n_subjects must be at least 2. Received: {n_subjects}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    depth, rows, cols = (int(s) for s in shape)
    ids = [f"sub-{first_subject + i:03d}" for i in range(n_subjects)]
    diagnosis = rng.permutation(np.arange(n_subjects) % 2)
    demo = pd.DataFrame({"age": rng.integers(40, 86, n_subjects),
                         "sex": rng.choice(["M", "F"], n_subjects), "diagnosis": diagnosis})
    descriptions = dict(descriptions or {})
    region = signal_region((depth, rows, cols))
    tag = f"{site[:3].upper()}{seed}"
    planted: list[str] = [f"{site} SECRET Institution {seed}"]
    # An oblique stack: rows along x, columns along y+z; the normal runs along (0, -1, 1).
    row_dir, col_dir = np.array([1.0, 0, 0]), np.array([0, 1.0, 1.0]) / np.sqrt(2)
    normal = np.cross(row_dir, col_dir)
    for p, (subject, dx) in enumerate(zip(ids, diagnosis, strict=True)):
        name, pid = f"DOE{tag}^PATIENT{p:03d}", f"PID{tag}X{p:05d}"
        birth, study_date = f"19{40 + p % 50:02d}0{1 + p % 9}1{p % 9}", f"2023{1 + p % 9:02d}15"
        planted += [name, pid, birth, study_date, f"ACC{tag}{p:05d}"]
        study_uid = generate_uid()
        for s_index, mod in enumerate(series):
            vol = rng.standard_normal((depth, rows, cols)).astype(np.float32)
            if mod == "T1" and dx:
                vol[region] += signal
            desc = descriptions.get(mod, mod)
            folder = root / subject / f"study{p:03d}" / f"series{s_index + 1}"
            folder.mkdir(parents=True, exist_ok=True)
            series_uid = generate_uid()
            # Files are written in reverse spatial order, with shuffled instance numbers:
            # only the positions give the right order.
            numbers = rng.permutation(depth) + 1
            for z in range(depth):
                meta = FileMetaDataset()
                meta.MediaStorageSOPClassUID = MRImageStorage
                meta.MediaStorageSOPInstanceUID = generate_uid()
                meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ds = pydicom.Dataset()
                ds.file_meta = meta
                ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
                ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, pid, birth
                ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = study_date
                ds.InstitutionName = planted[0]
                ds.ReferringPhysicianName = f"DR{tag}^REFERRER"
                ds.AccessionNumber = f"ACC{tag}{p:05d}"
                ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
                ds.Modality, ds.SeriesDescription = "MR", desc
                ds.SeriesNumber, ds.InstanceNumber = s_index + 1, int(numbers[z])
                ds.ImageOrientationPatient = [*row_dir.tolist(), *col_dir.tolist()]
                ds.ImagePositionPatient = (normal * 2.0 * z + [-10.0, 5.0, 3.0]).tolist()
                ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.0
                ds.Rows, ds.Columns = rows, cols
                ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
                ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
                ds.PixelRepresentation = 1
                ds.RescaleSlope, ds.RescaleIntercept = SLOPE, INTERCEPT
                stored = np.rint((vol[z] - INTERCEPT) / SLOPE).astype(np.int16)
                ds.PixelData = stored.tobytes()
                ds.save_as(folder / f"IM{depth - z:04d}.dcm", enforce_file_format=True)
    planted.append(f"DR{tag}^REFERRER")
    demo.insert(0, subject_column, ids)
    path = root.parent / f"{root.name}_demographics.csv"
    _site_frame(demo, columns, codes, scales).to_csv(path, index=False)
    return SyntheticDicomFolder(root, path, (columns or {}).get(subject_column, subject_column),
                                dict(zip(ids, diagnosis.tolist(), strict=True)),
                                tuple(dict.fromkeys(planted)))
