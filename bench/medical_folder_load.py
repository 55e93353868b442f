"""MedicalFolderDataset load throughput against reading the same files with nibabel.

A synthetic MedicalFolder tree (``--subjects`` subjects, one ``T1`` volume each, 64^3
float32) is written twice, as ``.nii`` and as ``.nii.gz``. For each, the script times, in
alternation and after a warm-up pass (so every side reads from the page cache):

- **nibabel loop**: ``nib.load(p, mmap=False).get_fdata(dtype=np.float32)`` for every file,
  into a list: the plainest way to hold every volume in memory;
- **dataset.arrays()**: ``MedicalFolderDataset.arrays(features=["T1"])``, every volume
  stacked into one (n, 1, 64, 64, 64) array, as plans of every backend receive it;
- **dataset.iter_volumes**: ``list(ds.iter_volumes("T1"))``;
- **dataset.items()**: every item of ``ds.items(features=["T1"])``, as a torch DataLoader
  reads them, one subject at a time.

It prints the medians of ``--repeats`` runs in volumes per second and each dataset figure
as a fraction of the nibabel loop; the target is >= 0.9x for ``arrays()``.

Run: ``python bench/medical_folder_load.py`` (``--subjects``, ``--side``, ``--repeats``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from fedcore.data import MedicalFolderDataset
from fedcore.data import synthetic as syn

TARGET = 0.9


def alternate(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in turn ``repeats`` times after one warm-up."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    # np.median, not statistics.median: bench/statistics.py shadows the standard module here.
    return {name: float(np.median(ts)) for name, ts in times.items()}


def bench(root: Path, n: int, side: int, compress: bool, repeats: int) -> bool:
    cohort = syn.medical_folder(root, n_subjects=n, shape=(side,) * 3, modalities=("T1",),
                                compress=compress)
    ds = MedicalFolderDataset(cohort.root, demographics=cohort.demographics)
    t = time.perf_counter()
    assert len(ds) == n  # the scan: every header, once per process (the registry keeps it)
    scan = time.perf_counter() - t
    paths = sorted(cohort.root.glob("*/T1/*.nii*"))

    def nibabel_loop() -> list[np.ndarray]:
        return [nib.load(p, mmap=False).get_fdata(dtype=np.float32) for p in paths]

    def items() -> list[Any]:
        view = ds.items(features=["T1"])
        return [view[i] for i in range(len(view))]

    X, _ = ds.arrays(features=["T1"])
    assert all(np.array_equal(X[i, 0], v) for i, v in enumerate(nibabel_loop()))
    medians = alternate({
        "nibabel loop": nibabel_loop,
        "dataset.arrays()": lambda: ds.arrays(features=["T1"]),
        "dataset.iter_volumes": lambda: list(ds.iter_volumes("T1")),
        "dataset.items()": items,
    }, repeats)
    base = medians["nibabel loop"]
    suffix = ".nii.gz" if compress else ".nii"
    print(f"\n{n} volumes of {side}^3 float32 as {suffix} ({X.nbytes / n / 1e6:.2f} MB each); "
          f"medians of {repeats} runs; folder scan {scan * 1e3:.1f} ms")
    ok = True
    for name, seconds in medians.items():
        line = f"  {name:22s} {n / seconds:8.1f} volumes/s  {seconds * 1e3:8.1f} ms"
        if name != "nibabel loop":
            ratio = base / seconds
            line += f"  {ratio:5.2f}x the nibabel loop"
            if name == "dataset.arrays()":
                met = ratio >= TARGET
                ok = ok and met
                line += f" (target >= {TARGET}x: {'met' if met else 'NOT met'})"
        print(line)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=64, help="volumes per format (64)")
    parser.add_argument("--side", type=int, default=64, help="volume side in voxels (64)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per figure (7)")
    args = parser.parse_args(argv)
    print(f"nibabel {nib.__version__}, numpy {np.__version__}, python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory(prefix="fedcore-bench-") as tmp:
        ok = True
        for compress in (False, True):
            name = "gz" if compress else "nii"
            ok &= bench(Path(tmp) / name / "mri", args.subjects, args.side, compress,
                        args.repeats)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
