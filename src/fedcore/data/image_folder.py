"""ImageFolderDataset: ``class/*.png|jpg`` images, read with Pillow."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedcore.data._base import Dataset, Items, without_root
from fedcore.data.loading_plan import DataLoadingPlan, map_values
from fedcore.errors import ConfigurationError, DatasetError, MissingDependencyError

__all__ = ["ImageFolderDataset"]

_SUFFIXES = (".png", ".jpg", ".jpeg")
TARGET = "target"


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError as exc:
        raise MissingDependencyError(
            'Image folders are read with Pillow, which is not installed: '
            'pip install "fedcore[images]"'
        ) from exc
    return Image


@dataclass
class _Index:
    files: list[str]  # relative to the root: "<class folder>/<file>"
    labels: np.ndarray  # class index of each file (int64)
    classes: list[str]  # harmonised class names, sorted
    shape: tuple[int, ...]  # of one image as an array
    dtype: np.dtype[Any]


class ImageFolderDataset(Dataset):
    """Images laid out as ``root/<class>/<image>.png|.jpg|.jpeg``; the class is the label.

    Classes are the class folders' names (after the DataLoadingPlan's ``values["target"]``
    mapping, which may rename or merge them), sorted; ``y`` holds the class names (a node
    may lack a class, so its own indices would not match other nodes': backends turn names
    into indices over the federation's classes, ``data_info["categories"]["target"]``) and
    ``metadata()["categories"]["target"]`` lists them. All images must share one size and
    colour mode, unless ``size=(height, width)`` (resize) or ``mode`` (a Pillow mode such
    as ``"L"`` or ``"RGB"``) makes them. The folder is scanned on first use (image headers
    only); images are read on every request. Needs Pillow (``pip install "fedcore[images]"``).
    """

    def __init__(self, root: str | Path, *, mode: str | None = None,
                 size: Sequence[int] | None = None,
                 loading_plan: DataLoadingPlan | None = None):
        self.root = Path(root)
        self.mode = mode
        if size is not None:
            if len(size) != 2 or not all(int(s) > 0 for s in size):
                raise ConfigurationError(
                    f"size must be (height, width), two positive integers. Received: {size!r}"
                )
            size = (int(size[0]), int(size[1]))
        self.size: tuple[int, int] | None = size
        self.loading_plan = loading_plan or DataLoadingPlan()
        plan = self.loading_plan
        if plan.modalities or plan.columns or plan.units or set(plan.values) - {TARGET}:
            raise ConfigurationError(
                "An image folder's DataLoadingPlan may only map class names, as "
                '{"values": {"target": {"<local class>": "<class>"}}}. '
                f"Received: {plan.to_dict()}"
            )

    # --- the scan ---------------------------------------------------------------------------

    @functools.cached_property
    def _ix(self) -> _Index:
        return self._scan()  # on first use, once

    def _scan(self) -> _Index:
        image = _pil()
        if not self.root.is_dir():
            raise DatasetError(
                "The image folder is unavailable (it was moved or deleted). The node "
                "administrator can re-register it."
            )
        files: list[str] = []
        local: list[str] = []
        for class_dir in sorted(p for p in self.root.iterdir()
                                if p.is_dir() and not p.name.startswith(".")):
            for f in sorted(class_dir.iterdir()):
                if f.suffix.lower() in _SUFFIXES and not f.name.startswith(".") and f.is_file():
                    files.append(f"{class_dir.name}/{f.name}")
                    local.append(class_dir.name)
        if not files:
            raise DatasetError(
                "The image folder holds no images: expected <class>/<image>.png|.jpg|.jpeg."
            )
        names = pd.Series(local)
        table = self.loading_plan.values.get(TARGET)
        if table is not None:
            names = map_values(names, table, column=TARGET, source="the class folders")
        named = [str(n) for n in names]
        classes = sorted(set(named))
        labels = np.searchsorted(classes, named).astype(np.int64)

        sizes: dict[tuple[int, int], str] = {}
        modes: dict[str, str] = {}
        for rel in files:
            try:
                with image.open(self.root / rel) as img:
                    sizes.setdefault((img.height, img.width), rel)
                    modes.setdefault(img.mode, rel)
            except (OSError, ValueError) as exc:
                raise DatasetError(
                    f"The image {rel} cannot be opened: {without_root(exc, self.root)}"
                ) from exc
        if self.size is None and len(sizes) > 1:
            (s1, f1), (s2, f2) = list(sizes.items())[:2]
            raise DatasetError(
                f"The images differ in size ({f1} is {s1[0]}x{s1[1]}, {f2} is "
                f"{s2[0]}x{s2[1]}): register the dataset with size=(height, width) to resize "
                "them."
            )
        if self.mode is None and len(modes) > 1:
            (m1, f1), (m2, f2) = list(modes.items())[:2]
            raise DatasetError(
                f"The images differ in colour mode ({f1} is {m1}, {f2} is {m2}): register "
                "the dataset with mode='L' (grey) or mode='RGB' to convert them."
            )
        first = self._read_file(files[0])
        return _Index(files, labels, classes, first.shape, first.dtype)

    def _read_file(self, rel: str) -> np.ndarray:
        image = _pil()
        try:
            with image.open(self.root / rel) as img:
                if self.mode is not None and img.mode != self.mode:
                    img = img.convert(self.mode)
                if self.size is not None and (img.height, img.width) != self.size:
                    img = img.resize((self.size[1], self.size[0]))
                return np.array(img)  # writable (asarray would be read-only)
        except FileNotFoundError as exc:
            raise DatasetError(
                f"The image {rel} is missing (moved or deleted since registration). The node "
                "administrator can restore it or re-register the dataset."
            ) from exc
        except (OSError, ValueError) as exc:
            raise DatasetError(
                    f"The image {rel} cannot be read: {without_root(exc, self.root)}"
                ) from exc

    def _read(self, i: int) -> np.ndarray:
        ix = self._ix
        arr = self._read_file(ix.files[i])
        if arr.shape != ix.shape or arr.dtype != ix.dtype:
            raise DatasetError(
                f"The image {ix.files[i]} reads as {arr.dtype}{list(arr.shape)}, unlike the "
                f"others ({ix.dtype}{list(ix.shape)}). Re-register the dataset."
            )
        return arr

    # --- Dataset ----------------------------------------------------------------------------

    @property
    def classes(self) -> list[str]:
        """Class names (harmonised), sorted; ``y`` indexes into them."""
        return list(self._ix.classes)

    def iter_images(self) -> Iterator[np.ndarray]:
        """Every image as an array (height, width[, channels]), in dataset order."""
        for i in range(len(self)):
            yield self._read(i)

    def __len__(self) -> int:
        return len(self._ix.files)

    def metadata(self) -> dict[str, Any]:
        ix = self._ix
        counts = np.bincount(ix.labels, minlength=len(ix.classes))
        return {
            "kind": "image-folder",
            "n_samples": len(ix.files),
            "feature_shape": list(ix.shape),
            "dtypes": {"X": ix.dtype.str, TARGET: np.dtype(np.int64).str},
            "categories": {TARGET: list(ix.classes)},
            "class_counts": {c: int(n) for c, n in zip(ix.classes, counts, strict=True)},
        }

    def arrays(self, features=None, target=None):  # noqa: D102 - inherits the doc
        return self._arrays_at(np.arange(len(self)), features, target)

    def _arrays_at(self, indices, features, target):
        self._check(features, target)
        ix = self._ix
        X = np.empty((len(indices), *ix.shape), dtype=ix.dtype)
        for row, i in enumerate(indices):
            X[row] = self._read(int(i))
        return X, np.asarray(ix.classes)[ix.labels[indices]]

    def items(self, features=None, target=None, **options):
        """The images one at a time, as ``(image, label)``.

        Labels are class names; with ``classes=[...]`` (the federation's classes, e.g. a
        plan's ``self.classes()``) they are indices into that list, the same on every node.
        """
        self._check(features, target)
        classes = options.pop("classes", None)
        if options:
            raise ConfigurationError(
                f"ImageFolderDataset.items() takes only `classes`. Received {sorted(options)}."
            )
        return _ImageItems(self, None if classes is None else list(classes))

    def __getitem__(self, index: int) -> tuple[np.ndarray, Any]:
        return _ImageItems(self, None)[index]

    @staticmethod
    def _check(features: Any, target: Any) -> None:
        if features is not None or target not in (None, TARGET):
            raise ConfigurationError(
                "An image folder has no named features: its samples are images and its "
                "target the class. Drop `features` and `target` from model_args (or use "
                f"target={TARGET!r}). Received: features={features!r}, target={target!r}"
            )


class _ImageItems(Items):
    def __init__(self, dataset: ImageFolderDataset, classes: list[Any] | None):
        self.dataset = dataset
        names = dataset._ix.classes
        if classes is None:
            self.labels: list[Any] = list(names)
        else:
            missing = [c for c in names if c not in classes]
            if missing:
                raise DatasetError(
                    f"Classes {missing} of this image folder are not among the "
                    f"federation's classes {classes}."
                )
            self.labels = [classes.index(c) for c in names]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[np.ndarray, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        return self.dataset._read(index % n), self.labels[self.dataset._ix.labels[index]]
