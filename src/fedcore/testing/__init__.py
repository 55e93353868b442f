"""Conformance suites that every plug-in of an extension point runs (a pytest toolkit).

Import the suite of your extension point in a test module and subclass it::

    from fedcore.testing.transport import Endpoints, TransportConformance

    class TestMyTransport(TransportConformance):
        @pytest.fixture
        def endpoints(self):
            return Endpoints.same("mine://localhost:9999")

Training-plan backends run :class:`fedcore.testing.backend.BackendConformance` (and
:func:`fedcore.testing.backend.check_signature_parity`) the same way.

``fedcore.testing`` needs pytest; ``import fedcore`` never imports it.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["BackendConformance", "Endpoints", "TransportConformance",
           "check_signature_parity"]

_WHERE = {"BackendConformance": "backend", "check_signature_parity": "backend",
          "Endpoints": "transport", "TransportConformance": "transport"}


def __getattr__(name: str) -> Any:  # lazy: a backend's tests need not import transports
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
