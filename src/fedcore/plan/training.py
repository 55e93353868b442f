"""LocalTraining: the typed arguments of one round of local training.

``training_args`` travel as a plain mapping (the wire carries it as it is). Everything that
reads them (the plan's :meth:`~fedcore.plan.TrainingPlan.fit`, the node's policies, the
privacy accountant) reads one :class:`LocalTraining` parsed from it once, so a misspelt key
(``"epoch"``) or a wrong type (``"epochs": "3"``) is refused with a message that says what
was expected, instead of being silently ignored on some nodes.

Every plan takes the common keys (``epochs``, ``batch_size``, ``num_updates``, ``lr``,
``use_gpu``); a plan class declares the others it reads in ``training_keys`` (name ->
type), with their defaults in ``training_defaults``. Both are merged along the class
hierarchy, so a researcher's plan only adds its own keys::

    class Plan(TorchTrainingPlan):
        training_keys = {"momentum": float}
        training_defaults = {"momentum": 0.9}
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from fedcore.errors import ConfigurationError

__all__ = ["COMMON_KEYS", "LocalTraining"]

#: The keys every plan takes, with their types as a researcher writes them.
COMMON_KEYS: Mapping[str, Any] = MappingProxyType({
    "batch_size": int, "epochs": int, "lr": float, "num_updates": int, "use_gpu": bool})

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_PLAIN = frozenset({bool, int, float, str, type(None)})


@dataclass(frozen=True)
class LocalTraining:
    """What one round of local training runs, parsed once from ``training_args``.

    - ``epochs`` (1): passes over the node's training data;
    - ``batch_size`` (32; a plan may default to ``None``: the whole dataset per batch);
    - ``num_updates`` (``None``: no cap): stop after this many optimizer steps;
    - ``lr`` (0.01): the learning rate of the default optimizers;
    - ``use_gpu`` (True): train on a GPU when there is one and the node allows it;
    - ``extra``: the plan's own declared keys (read-only), defaults included;
    - ``explicit``: the keys the researcher gave (the rest are defaults).
    """

    epochs: int = 1
    batch_size: int | None = 32
    num_updates: int | None = None
    lr: float = 0.01
    use_gpu: bool = True
    extra: Mapping[str, Any] = field(default_factory=lambda: _EMPTY, hash=False)
    explicit: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, mapping: Mapping[str, Any] | None, *, keys: Mapping[str, Any] = _EMPTY,
              defaults: Mapping[str, Any] = _EMPTY, owner: str = "the plan") -> LocalTraining:
        """Check ``mapping`` against the common keys and ``keys`` (name -> type(s)).

        ``defaults`` fill the keys not given (a key given as ``None`` counts as not given).
        Raises :class:`~fedcore.errors.ConfigurationError` for an unknown key (naming the
        close match and every known key) or a value of the wrong type or range.
        """
        given = _as_mapping(mapping)
        known = {**COMMON_KEYS, **keys}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ConfigurationError(_unknown_message(unknown[0], given, known, owner))
        extra = {k: v for k, v in defaults.items() if k not in COMMON_KEYS}
        for name, value in given.items():
            if name not in COMMON_KEYS:
                extra[name] = _checked(name, value, known[name])
        return cls._build(given, defaults, extra)

    @classmethod
    def common(cls, mapping: Mapping[str, Any] | None) -> LocalTraining:
        """The common keys of ``mapping``, checked; other keys kept in ``extra`` unchecked.

        For readers that do not know the plan class (the node's policies run before the
        plan is loaded, the privacy accountant): the plan checks its own keys.
        """
        given = _as_mapping(mapping)
        return cls._build(given, _EMPTY, {k: v for k, v in given.items()
                                          if k not in COMMON_KEYS})

    @classmethod
    def _build(cls, given: Mapping[str, Any], defaults: Mapping[str, Any],
               extra: dict[str, Any]) -> LocalTraining:
        base = cls()
        values: dict[str, Any] = {k: defaults.get(k, getattr(base, k)) for k in COMMON_KEYS}
        values["epochs"] = _count("epochs", given.get("epochs", values["epochs"]))
        values["batch_size"] = _optional_count("batch_size",
                                               given.get("batch_size", values["batch_size"]))
        values["num_updates"] = _optional_count("num_updates",
                                                given.get("num_updates", values["num_updates"]))
        values["lr"] = _rate(given.get("lr", values["lr"]))
        use_gpu = given.get("use_gpu", values["use_gpu"])
        if not isinstance(use_gpu, bool):
            raise ConfigurationError("training_args['use_gpu'] must be True or False. "
                                     f"Received: {use_gpu!r} (of type {type(use_gpu).__name__})")
        values["use_gpu"] = use_gpu
        return cls(**values, extra=MappingProxyType(extra), explicit=frozenset(given))

    @staticmethod
    def cache_key(mapping: Mapping[str, Any] | None) -> Hashable | None:
        """A key under which :meth:`parse` of ``mapping`` may be kept, or ``None``.

        Only a dict of plain values (``bool``, ``int``, ``float``, ``str``, ``None``) has
        one: a parsed value may then be shared, and nothing the caller changes later can
        change it. Types and ``repr`` are part of the key, since ``1``, ``1.0`` and ``True``
        compare equal but do not parse alike.
        """
        if mapping is None:
            return ()
        if type(mapping) is not dict:
            return None
        key = []
        for name, value in mapping.items():
            if type(name) is not str or type(value) not in _PLAIN:
                return None
            key.append((name, type(value), repr(value)))
        return tuple(key)

    def to_dict(self) -> dict[str, Any]:
        """The keys the researcher gave, as plain data (what ``TrainRequest`` carries)."""
        out = {k: getattr(self, k) for k in COMMON_KEYS if k in self.explicit}
        out.update((k, v) for k, v in self.extra.items() if k in self.explicit)
        return out


# --- checks ---------------------------------------------------------------------------------


def _as_mapping(mapping: Mapping[str, Any] | None) -> dict[str, Any]:
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise ConfigurationError("training_args must be a dict of argument names to values. "
                                 f"Received: {type(mapping).__name__}")
    bad = [k for k in mapping if not isinstance(k, str)]
    if bad:
        raise ConfigurationError(f"training_args names must be strings. Received: {bad!r}")
    return {k: v for k, v in mapping.items() if v is not None}


def _unknown_message(name: str, given: Mapping[str, Any], known: Mapping[str, Any],
                     owner: str) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (f"Unknown training argument {name!r} for {owner}.{hint} Expected one of: "
            f"{', '.join(sorted(known))}. Received: {dict(given)!r}. Fix the name, or "
            "declare the key in the plan class: training_keys = {" f"{name!r}: <type>" "}.")


def _whole(value: Any) -> int | None:
    """``value`` as an int when it is a whole number (not a bool), else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _count(name: str, value: Any) -> int:
    number = _whole(value)
    if number is None or number < 1:
        raise ConfigurationError(f"training_args[{name!r}] must be a whole number >= 1. "
                                 f"Received: {value!r} (of type {type(value).__name__})")
    return number


def _optional_count(name: str, value: Any) -> int | None:
    return None if value is None else _count(name, value)


def _rate(value: Any) -> float:
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(float(value)) or float(value) < 0):
        raise ConfigurationError("training_args['lr'] must be a finite number >= 0. "
                                 f"Received: {value!r} (of type {type(value).__name__})")
    return float(value)


def _checked(name: str, value: Any, expected: Any) -> Any:
    """A declared key's value, checked against its type(s) (``object``: anything)."""
    types = expected if isinstance(expected, tuple) else (expected,)
    if object in types:
        return value
    number = not isinstance(value, bool) and isinstance(value, numbers.Real)
    if int in types and number and isinstance(value, numbers.Integral):
        return int(value)
    if float in types and number:
        return float(value)
    if int in types and _whole(value) is not None:  # 2.0 for a whole-number key
        return int(value)
    if isinstance(value, tuple(t for t in types if t not in (int, float))):
        return value
    names = " or ".join(t.__name__ for t in types)
    raise ConfigurationError(f"training_args[{name!r}] must be of type {names}. Received: "
                             f"{value!r} (of type {type(value).__name__})")
