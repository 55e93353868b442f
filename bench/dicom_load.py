"""DicomDataset load throughput against the plain pydicom loop that does the same work.

A synthetic DICOM tree (``--patients`` patients, one ``T1`` series of ``--slices`` slices
of ``--side``^2 int16 pixels each, rescaled) is written once. After a warm-up pass (so
every side reads from the page cache), the script times, in alternation, ``--repeats``
times each:

- **pydicom loop**: for each series, ``pydicom.dcmread`` every file, sort the slices by
  ``ImagePositionPatient`` along the slice normal, apply ``RescaleSlope`` and
  ``RescaleIntercept`` to ``pixel_array`` and stack: what a hand-written loader does;
- **dataset.arrays()**: ``DicomDataset.arrays(features=["T1"])``, every volume stacked into
  one (n, 1, slices, side, side) float32 array, as plans receive it (the scan, which reads
  the headers once per process, is timed apart).

It prints the medians in volumes per second and the dataset's as a fraction of the loop;
the target is >= 0.9x (the dataset parses fewer elements than a full read).

Run: ``python bench/dicom_load.py`` (``--patients``, ``--slices``, ``--side``, ``--repeats``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from fedcore.data import DicomDataset
from fedcore.data import synthetic as syn

TARGET = 0.9


def pydicom_loop(root: Path) -> list[np.ndarray]:
    """Every series read the plain way: full reads, ordered by position, rescaled."""
    volumes = []
    for patient in sorted(root.iterdir()):
        for series in sorted(patient.glob("*/*")):
            slices = [pydicom.dcmread(p) for p in series.glob("*.dcm")]
            iop = np.asarray(slices[0].ImageOrientationPatient, float)
            normal = np.cross(iop[:3], iop[3:])
            slices.sort(key=lambda d: float(np.dot(normal, d.ImagePositionPatient)))
            volumes.append(np.stack([
                d.pixel_array * np.float32(d.RescaleSlope) + np.float32(d.RescaleIntercept)
                for d in slices]).astype(np.float32))
    return volumes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patients", type=int, default=32)
    p.add_argument("--slices", type=int, default=32)
    p.add_argument("--side", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        site = syn.dicom_folder(Path(tmp) / "dicom", n_subjects=args.patients,
                                shape=(args.slices, args.side, args.side), series=("T1",))
        ds = DicomDataset(site.root, demographics=site.demographics)
        t = time.perf_counter()
        assert len(ds) == args.patients
        scan = time.perf_counter() - t
        X, _ = ds.arrays(features=["T1"])
        loop = pydicom_loop(site.root)
        assert np.allclose(np.stack(loop)[:, None], X, atol=1e-4)  # same volumes, same order
        fns = {"pydicom loop": lambda: pydicom_loop(site.root),
               "dataset.arrays()": lambda: ds.arrays(features=["T1"])}
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    medians = {name: float(np.median(ts)) for name, ts in times.items()}
    base = medians["pydicom loop"]
    print(f"{args.patients} patients x {args.slices} slices of {args.side}^2, "
          f"load average {os.getloadavg()[0]:.1f}; scan (headers, once) {scan:.2f} s")
    for name, seconds in medians.items():
        print(f"  {name:18s} {args.patients / seconds:8.1f} volumes/s  "
              f"{base / seconds:5.2f}x the loop")
    ratio = base / medians["dataset.arrays()"]
    print(f"dataset.arrays() / pydicom loop: {ratio:.2f}x (target >= {TARGET}x): "
          f"{'met' if ratio >= TARGET else 'NOT met'}")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
