"""ParameterSet: the one currency of aggregation (ordered name -> numpy array)."""

from __future__ import annotations

from collections.abc import ItemsView, Iterable, Iterator, KeysView, Mapping, ValuesView
from typing import Any

import numpy as np

__all__ = ["ParameterSet"]


class ParameterSet(Mapping[str, np.ndarray]):
    """An ordered, immutable-by-convention mapping from parameter names to numpy arrays.

    Order is part of the value: two sets with the same names in another order are different
    models. Arrays may be read-only views into a received frame; use :meth:`copy` before
    changing them in place.
    """

    __slots__ = ("_arrays",)

    def __init__(self, arrays: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()):
        if type(arrays) is ParameterSet:  # checked when it was made
            self._arrays: dict[str, np.ndarray] = dict(arrays._arrays)
            return
        items = arrays.items() if isinstance(arrays, Mapping) else arrays
        self._arrays = {}
        for name, value in items:
            if not isinstance(name, str):
                raise TypeError(f"Parameter names must be str. Received: {name!r}")
            arr = np.asarray(value)
            if arr.dtype.kind not in "biufc":
                raise TypeError(
                    f"Parameter {name!r} must be a numeric array. Received dtype={arr.dtype}"
                )
            self._arrays[name] = arr

    @classmethod
    def _checked(cls, arrays: dict[str, np.ndarray]) -> ParameterSet:
        """A set of ``arrays`` as they are, without a check or a copy.

        For the decoder, which checked the names (``str``) and that each is a
        ``numpy.ndarray`` of a numeric dtype: what the constructor checks.
        """
        out = cls.__new__(cls)
        out._arrays = arrays
        return out

    def __getitem__(self, name: str) -> np.ndarray:
        return self._arrays[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def __contains__(self, name: object) -> bool:
        return name in self._arrays

    # The dict's own read-only views: iterated in C, without a __getitem__ call per array
    # (the Mapping mixins'), by the codec, the aggregators and the plans on every update.
    def keys(self) -> KeysView[str]:
        """The parameter names, in order (a read-only view)."""
        return self._arrays.keys()

    def values(self) -> ValuesView[np.ndarray]:
        """The arrays, in order (a read-only view)."""
        return self._arrays.values()

    def items(self) -> ItemsView[str, np.ndarray]:
        """``(name, array)`` pairs, in order (a read-only view)."""
        return self._arrays.items()

    def __repr__(self) -> str:
        return f"ParameterSet({len(self)} arrays, {self.nbytes} bytes)"

    @property
    def nbytes(self) -> int:
        """Total size of the arrays in bytes."""
        return sum(a.nbytes for a in self._arrays.values())

    @property
    def n_values(self) -> int:
        """Total number of scalar values."""
        return sum(a.size for a in self._arrays.values())

    def copy(self) -> ParameterSet:
        """A deep copy whose arrays are writable and own their memory."""
        out = ParameterSet()
        out._arrays = {k: np.array(v, copy=True) for k, v in self._arrays.items()}
        return out

    def snapshot(self) -> ParameterSet:
        """A copy whose arrays are read-only for good: views of ``bytes``, never written.

        What may be shared without copying it again: the requests of a round carry one
        snapshot of the global model, which the in-process transport hands to every node
        (:class:`~fedcore.transport.Parts`). A set that is a snapshot already is returned
        as it is.
        """
        if all(immutable(a) for a in self._arrays.values()):
            return self
        out = ParameterSet()
        out._arrays = {k: np.frombuffer(v.tobytes(), v.dtype).reshape(v.shape)
                       for k, v in self._arrays.items()}
        return out

    def same_layout(self, other: Mapping[str, np.ndarray]) -> bool:
        """True when ``other`` has the same names, in order, with the same shapes and dtypes."""
        if list(self) != list(other):
            return False
        return all(
            a.shape == other[k].shape and a.dtype == other[k].dtype for k, a in self.items()
        )

    def check_layout(self, other: Mapping[str, np.ndarray], *, what: str = "update") -> None:
        """Raise ``ValueError`` naming the first difference between the two layouts."""
        if list(self) != list(other):
            missing = [k for k in self if k not in other]
            extra = [k for k in other if k not in self]
            raise ValueError(
                f"The {what} does not have the global model's parameter names. "
                f"Missing: {missing}; unexpected: {extra}."
            )
        for k, a in self._arrays.items():  # once per update a round folds: kept lean
            b = other[k]
            shape = b.shape if isinstance(b, np.ndarray) else np.shape(b)
            if a.shape != shape:
                raise ValueError(
                    f"The {what}'s parameter {k!r} has shape {shape}; expected {a.shape}."
                )

    def allclose(self, other: Mapping[str, np.ndarray], **kwargs: Any) -> bool:
        """True when both have the same layout and values within ``np.allclose`` tolerance."""
        return list(self) == list(other) and all(
            np.allclose(a, other[k], **kwargs) for k, a in self.items()
        )

    def equal(self, other: Mapping[str, np.ndarray]) -> bool:
        """True when both are bit-identical: same names, order, dtypes, shapes and values."""
        return self.same_layout(other) and all(
            np.array_equal(a, other[k]) for k, a in self.items()
        )


def immutable(obj: Any) -> bool:
    """Whether no one can change the memory of ``obj`` any more: ``bytes``, or a view of it.

    Follows the chain of exporters (memoryview -> numpy array -> its base...) down to the
    object that owns the memory; only a ``bytes`` object there cannot be written.
    """
    for _ in range(64):
        if isinstance(obj, bytes):
            return True
        if isinstance(obj, np.ndarray):
            obj = obj.base
        elif isinstance(obj, memoryview):
            obj = obj.obj
        else:
            return False
    return False
