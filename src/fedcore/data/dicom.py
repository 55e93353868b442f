"""DicomDataset: DICOM series per patient, assembled into volumes, joined to demographics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.data._base import without_root
from fedcore.data.loading_plan import DataLoadingPlan
from fedcore.data.medical_folder import MedicalFolderDataset
from fedcore.errors import DatasetError, MissingDependencyError, install_hint

__all__ = ["DicomDataset"]

# The only elements ever parsed. Identifying ones (names, IDs, dates, institution...) are
# not among them, so they are never decoded, logged or kept: nothing can leak what is
# not read.
_HEADER_TAGS = ["SOPClassUID", "Modality", "SeriesInstanceUID", "SeriesDescription",
                "SeriesNumber", "InstanceNumber", "ImagePositionPatient",
                "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
                "NumberOfFrames", "RescaleSlope", "RescaleIntercept"]
_PIXEL_TAGS = ["Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
               "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation",
               "PlanarConfiguration", "NumberOfFrames", "RescaleSlope", "RescaleIntercept",
               "PixelData"]


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError as exc:  # the extra is not installed
        raise MissingDependencyError(
            f"DICOM datasets need pydicom. {install_hint('dicom')}.") from exc
    return pydicom


@dataclass(frozen=True)
class _Slice:
    file: str  # relative to the root
    position: float  # along the slice normal (or the instance number)
    slope: float
    intercept: float


@dataclass(frozen=True)
class _Series:
    slices: tuple[_Slice, ...]  # ordered by position
    shape: tuple[int, int, int]  # (slices, rows, columns)
    spacing: tuple[float, ...]


class DicomDataset(MedicalFolderDataset):
    """DICOM images laid out as ``root/<patient>/**/<file>.dcm``, one volume per series.

    Every DICOM file under a patient's folder (any depth: studies, series) is read; its
    series, named by its ``SeriesDescription``, is what a medical folder calls a modality.
    A series' slices are ordered by ``ImagePositionPatient`` along the slice normal (the
    cross product of ``ImageOrientationPatient``), or by ``InstanceNumber`` when positions
    are absent, and stacked into a float32 volume of shape (slices, rows, columns) with
    each slice's ``RescaleSlope`` and ``RescaleIntercept`` applied.

    ``modalities`` selects series by local description (default: every description found);
    ``dicom_modality`` keeps only series of these DICOM modalities (``"MR"``, ``"CT"``...).
    A :class:`~fedcore.data.DataLoadingPlan`'s ``modalities`` maps harmonised names to the
    site's series descriptions, its other parts map the demographics (a CSV joined on the
    patient folder's name, as for :class:`~fedcore.data.MedicalFolderDataset`, whose rules
    for incomplete subjects, items, arrays and covariates apply unchanged).

    Only the geometry, the series' description and modality and the pixels are ever
    parsed: names, identifiers, dates, institutions and every other element are not read,
    so they cannot appear in metadata, statistics, logs or errors. Files that are not
    DICOM (no ``DICM`` marker) are skipped unless named ``*.dcm``; a patient holding two
    series of one description is a ``DatasetError`` naming them.
    """

    _KIND = "dicom"
    _WHAT = "DICOM folder"
    _LAYOUT = "<patient>/<study>/<series>/<image>.dcm"

    def __init__(
        self,
        root: str | Path,
        *,
        demographics: str | Path | None = None,
        subject_column: str = "subject",
        modalities: Sequence[str] | None = None,
        dicom_modality: Sequence[str] | str | None = None,
        loading_plan: DataLoadingPlan | None = None,
        read_csv_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__(root, demographics=demographics, subject_column=subject_column,
                         modalities=modalities, loading_plan=loading_plan,
                         read_csv_kwargs=read_csv_kwargs)
        if isinstance(dicom_modality, str):
            dicom_modality = [dicom_modality]
        self.dicom_modality = (None if dicom_modality is None
                               else sorted({str(m).upper() for m in dicom_modality}))
        self._series: dict[str, _Series] = {}

    # --- the scan ---------------------------------------------------------------------------

    def _discover(self) -> dict[str, dict[str, list[str]]]:
        found: dict[str, dict[str, list[str]]] = {}
        for patient in sorted(p for p in self.root.iterdir()
                              if p.is_dir() and not p.name.startswith(".")):
            groups: dict[str, dict[str, list[tuple[str, Any]]]] = {}  # desc -> uid -> slices
            for path in sorted(patient.rglob("*")):
                if path.is_file() and not any(part.startswith(".") for part in
                                              path.relative_to(self.root).parts):
                    header = self._read_header(path)
                    if header is None:
                        continue
                    desc = _description(header)
                    uid = str(header.get("SeriesInstanceUID", desc))
                    rel = path.relative_to(self.root).as_posix()
                    groups.setdefault(desc, {}).setdefault(uid, []).append((rel, header))
            found[patient.name] = {}
            for desc, by_uid in sorted(groups.items()):
                if len(by_uid) > 1:
                    raise DatasetError(
                        f"{patient.name} holds {len(by_uid)} series described {desc!r}: "
                        "expected one per patient and description. Move the others out, or "
                        "select other series with the 'modalities' option.")
                key = f"{patient.name}/{desc}"
                self._series[key] = self._assemble(key, next(iter(by_uid.values())))
                found[patient.name][desc] = [key]
        return found

    def _read_header(self, path: Path) -> Any:
        """The header elements this dataset uses, or None for a file to skip."""
        pydicom = _pydicom()
        rel = path.relative_to(self.root).as_posix()
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except pydicom.errors.InvalidDicomError as exc:
            if path.suffix.lower() == ".dcm":
                raise DatasetError(f"The file {rel} is not DICOM ({exc}). Move it out of "
                                   "the dataset's folder.") from None
            return None  # a README, a DICOMDIR index...
        except (OSError, ValueError, EOFError) as exc:
            raise DatasetError(f"The DICOM file {rel} cannot be read: "
                               f"{without_root(exc, self.root)}") from None
        if "Rows" not in ds or "Columns" not in ds:
            if "ImagePositionPatient" in ds or "PixelSpacing" in ds:
                raise DatasetError(f"The DICOM image {rel} has no image size (Rows, "
                                   "Columns): it is truncated or damaged. Restore it or move "
                                   "the patient out of the dataset.")
            return None  # no image: a report, a structured document...
        if self.dicom_modality is not None and str(ds.get("Modality", "")).upper() \
                not in self.dicom_modality:
            return None
        return ds

    def _assemble(self, key: str, slices: list[tuple[str, Any]]) -> _Series:
        """The series' slices in spatial order, its shape and its voxel spacing."""
        first = slices[0][1]
        rows, cols = int(first.Rows), int(first.Columns)
        odd = [rel for rel, h in slices if (int(h.Rows), int(h.Columns)) != (rows, cols)]
        if odd:
            raise DatasetError(f"The series {key!r} mixes image sizes ({odd[0]} is not "
                               f"{rows}x{cols}): it cannot be stacked into one volume.")
        if any(int(h.get("NumberOfFrames", 1) or 1) > 1 for _, h in slices):
            raise DatasetError(f"The series {key!r} holds multi-frame images: expected one "
                               "slice per file.")
        positions = _positions(key, [h for _, h in slices])
        order = np.argsort(positions, kind="stable")
        ordered = [positions[i] for i in order]
        if len(set(ordered)) < len(ordered):
            raise DatasetError(f"The series {key!r} has two slices at one position: it "
                               "mixes acquisitions. Keep one per position.")
        steps = np.diff(ordered)
        spacing = float(np.median(steps)) if steps.size else 1.0
        if steps.size and steps.max() > 1.5 * steps.min():
            raise DatasetError(f"The series {key!r} has uneven gaps between slices (from "
                               f"{steps.min():g} to {steps.max():g}): a slice is missing, or "
                               "it mixes stacks. Restore the slice or move the series out.")
        pixel = [float(v) for v in first.get("PixelSpacing") or (1.0, 1.0)]
        return _Series(
            tuple(_Slice(slices[i][0], positions[i], float(slices[i][1].get("RescaleSlope", 1)
                                                           or 1),
                         float(slices[i][1].get("RescaleIntercept", 0) or 0))
                  for i in order),
            (len(slices), rows, cols),
            tuple(round(v, 6) for v in (spacing, *pixel[:2])))

    @staticmethod
    def _buffer(lead: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
        # Slices are stored row by row: C order makes copying each one a plain memory copy.
        return np.empty((*lead, *shape), dtype=np.float32)

    def _header(self, rel: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
        series = self._series[rel]
        return series.shape, series.spacing

    def _read(self, rel: str, out: np.ndarray | None = None) -> np.ndarray:
        """The series ``rel`` as a float32 volume (slices, rows, columns), into ``out``."""
        pydicom = _pydicom()
        series = self._series[rel]
        if out is None:
            out = self._buffer((), series.shape)
        elif out.shape != series.shape:
            raise DatasetError(f"The series {rel!r} has shape {list(series.shape)}; a "
                               f"volume of {list(out.shape)} was asked for.")
        for z, sl in enumerate(series.slices):
            try:
                ds = pydicom.dcmread(self.root / sl.file, specific_tags=_PIXEL_TAGS)
                pixels = ds.pixel_array
            except FileNotFoundError:
                raise DatasetError(
                    f"The DICOM file {sl.file} is missing (moved or deleted since "
                    "registration). The node administrator can restore it or re-register "
                    "the dataset.") from None
            except (OSError, ValueError, EOFError, AttributeError, TypeError,
                    pydicom.errors.InvalidDicomError) as exc:
                raise DatasetError(
                    f"The DICOM file {sl.file} cannot be read "
                    f"({type(exc).__name__}: {without_root(exc, self.root)}). Check that "
                    "it is complete and uncompressed, or move the patient out of the "
                    "dataset.") from None
            if pixels.shape != series.shape[1:]:
                raise DatasetError(f"The DICOM file {sl.file} holds an image of shape "
                                   f"{list(pixels.shape)}, not {list(series.shape[1:])}. "
                                   "Re-register the dataset.")
            np.multiply(pixels, sl.slope, out=out[z], casting="unsafe")
            out[z] += np.float32(sl.intercept)
        return out

    @property
    def patients(self) -> list[str]:
        """The kept patients (folder names), sorted; the same as :attr:`subjects`."""
        return self.subjects


def _description(header: Any) -> str:
    desc = str(header.get("SeriesDescription", "") or "").strip()
    if desc:
        return desc
    number = header.get("SeriesNumber")
    return f"series-{number}" if number is not None else "series"


def _positions(key: str, headers: list[Any]) -> list[float]:
    """Each slice's place along the series' slice normal, or its instance number."""
    if all("ImagePositionPatient" in h and "ImageOrientationPatient" in h for h in headers):
        iop = np.asarray([float(v) for v in headers[0].ImageOrientationPatient])
        if iop.size != 6:
            raise DatasetError(f"The series {key!r} has an ImageOrientationPatient of "
                               f"{iop.size} values: expected 6.")
        normal = np.cross(iop[:3], iop[3:])
        return [float(np.dot(normal, [float(v) for v in h.ImagePositionPatient]))
                for h in headers]
    if all(h.get("InstanceNumber") is not None for h in headers):
        return [float(h.InstanceNumber) for h in headers]
    raise DatasetError(f"The series {key!r} has slices without ImagePositionPatient and "
                       "InstanceNumber: their order is unknown.")
