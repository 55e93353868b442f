"""Entry-point registry: backends, transports, aggregators and secure-aggregation schemes.

Plug-ins are found through the entry-point groups ``fedcore.backends``,
``fedcore.transports``, ``fedcore.aggregators`` and ``fedcore.secagg``, resolved lazily on
first use and never scanned at import time. The built-in table below keeps fedcore working
from a source checkout that was not pip-installed, tells the user which extra to install
when an import fails, and resolves fedcore's own names without a scan of the installed
distributions (a package cannot take a built-in name over: it registers a name of its own).
"""

from __future__ import annotations

import difflib
import importlib
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import entry_points
from typing import Any

from fedcore.errors import ConfigurationError, MissingDependencyError, install_hint

__all__ = ["available", "imported", "load", "loaded", "register", "registered"]

GROUPS = ("backends", "transports", "aggregators", "secagg")

# name -> (import string, extra that provides it)
_BUILTIN: dict[str, dict[str, tuple[str, str | None]]] = {
    "backends": {
        "sklearn": ("fedcore_sklearn:SklearnTrainingPlan", "sklearn"),
        "torch": ("fedcore_torch:TorchTrainingPlan", "torch"),
        "tf": ("fedcore_tf:KerasTrainingPlan", "tf"),
        "jax": ("fedcore_jax:JaxTrainingPlan", "jax"),
    },
    "transports": {
        "inproc": ("fedcore_transport.inprocess:InProcessTransport", None),
        "ws": ("fedcore_transport.websocket:WebSocketTransport", "net"),
        "wss": ("fedcore_transport.websocket:WebSocketTransport", "net"),
        "mqtt": ("fedcore_transport.mqtt:MqttTransport", "net"),
        "mqtts": ("fedcore_transport.mqtt:MqttTransport", "net"),
    },
    "aggregators": {
        "fedavg": ("fedcore.aggregators.fedavg:FedAvg", None),
        "fedprox": ("fedcore.aggregators.fedprox:FedProx", None),
        "scaffold": ("fedcore.aggregators.scaffold:Scaffold", None),
        "fedadam": ("fedcore.aggregators.fedopt:FedAdam", None),
        "fedyogi": ("fedcore.aggregators.fedopt:FedYogi", None),
        "fedadagrad": ("fedcore.aggregators.fedopt:FedAdagrad", None),
        "fedavgm": ("fedcore.aggregators.fedopt:FedAvgM", None),
        "median": ("fedcore.aggregators.robust:Median", None),
        "trimmed-mean": ("fedcore.aggregators.robust:TrimmedMean", None),
        "krum": ("fedcore.aggregators.robust:Krum", None),
        "central-dp": ("fedcore.privacy.central:CentralDP", "dp"),
    },
    "secagg": {
        "plain": ("fedcore.secagg.base:PlainAggregation", None),
        "masking": ("fedcore.secagg.masking:PairwiseMasking", None),
        "joye-libert": ("fedcore.secagg.joye_libert:JoyeLibert", None),
    },
}

_registered: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
_cache: dict[tuple[str, str], Any] = {}


def _check_group(group: str) -> None:
    if group not in GROUPS:
        raise ConfigurationError(f"Unknown plug-in group {group!r}. Expected one of {GROUPS}.")


def register(group: str, name: str, obj: Any) -> None:
    """Register ``obj`` under ``name`` in ``group`` for this process (tests, notebooks)."""
    _check_group(group)
    _registered[group][name] = obj
    _cache.pop((group, name), None)


@contextmanager
def registered(group: str, name: str, obj: Any) -> Iterator[None]:
    """Register ``obj`` under ``name`` for a ``with`` block; what was there before comes back."""
    _check_group(group)
    missing = object()
    before = _registered[group].get(name, missing)
    register(group, name, obj)
    try:
        yield
    finally:
        if before is missing:
            _registered[group].pop(name, None)
        else:
            _registered[group][name] = before
        _cache.pop((group, name), None)


_SCANNED: dict[str, tuple[float, dict[str, str]]] = {}
_RESCAN_S = 30.0  # a package installed meanwhile is seen within this


def _entry_points(group: str) -> dict[str, str]:
    # Scanning the installed distributions takes tens of milliseconds: a node answering
    # pings (which list the backends) must not spend that on every one.
    scanned = _SCANNED.get(group)
    if scanned is None or time.monotonic() - scanned[0] > _RESCAN_S:
        found = {ep.name: ep.value for ep in entry_points(group=f"fedcore.{group}")}
        scanned = _SCANNED[group] = (time.monotonic(), found)
    return dict(scanned[1])


def available(group: str) -> list[str]:
    """Names known in ``group`` (registered, installed entry points and built-ins)."""
    _check_group(group)
    names = set(_registered[group]) | set(_BUILTIN[group]) | set(_entry_points(group))
    return sorted(names)


def imported(group: str) -> list[str]:
    """Names in ``group`` whose module this process has imported already (none imported)."""
    _check_group(group)
    targets = {name: target for name, (target, _) in _BUILTIN[group].items()}
    targets.update(_entry_points(group))
    return sorted(name for name, target in targets.items()
                  if target.partition(":")[0] in sys.modules)


def loaded(group: str, name: str) -> bool:
    """Whether :func:`load` would return ``name`` at once: imported already, or registered."""
    _check_group(group)
    return (group, name) in _cache or name in _registered[group]


def load(group: str, name: str) -> Any:
    """The object registered as ``name`` in ``group``, imported on first use.

    Raises :class:`ConfigurationError` naming the close matches when ``name`` is unknown, or
    the ``pip install`` that fixes a missing dependency.
    """
    _check_group(group)
    key = (group, name)
    if key in _cache:
        return _cache[key]
    if name in _registered[group]:
        return _registered[group][name]
    # A built-in name resolves from the table, without scanning the installed distributions
    # (~0.1 s, paid before a node can connect); the scan is for the other names.
    builtin = _BUILTIN[group].get(name)
    target = builtin[0] if builtin is not None else _entry_points(group).get(name)
    if target is None:
        known = available(group)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigurationError(
            f"No {group[:-1]} named {name!r}.{hint} Known {group}: {', '.join(known) or 'none'}."
        )
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = builtin[1] if builtin else None
        fix = f" {install_hint(extra)}." if extra else ""
        raise MissingDependencyError(
            f"The {group[:-1]} {name!r} cannot be imported ({exc}).{fix}"
        ) from exc
    obj = getattr(module, attr) if attr else module
    _cache[key] = obj
    return obj
