"""Names a package exports, imported on first use (PEP 562).

A node daemon or a plan worker imports a few of fedcore's modules; importing a package
must not import every module it exports (the researcher side, pandas, the simulator).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def exports(package: str, homes: Mapping[str, str], namespace: dict[str, Any],
            names: Iterable[str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``.

    ``homes`` maps each exported name to the module that defines it; ``namespace`` is the
    package's ``globals()``, where a name is kept once imported. A submodule
    (``package.name``) is an attribute too, as it is once something imported it.
    """
    listed = tuple(names)

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            if not name.startswith("__"):
                try:
                    return importlib.import_module(f"{package}.{name}")
                except ModuleNotFoundError as exc:
                    if exc.name != f"{package}.{name}":
                        raise
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        namespace[name] = value  # found directly from now on
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *listed})

    return __getattr__, __dir__
