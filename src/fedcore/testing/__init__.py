"""Conformance suites that every plug-in of an extension point runs (a pytest toolkit).

Import the suite of your extension point in a test module and subclass it::

    from fedcore.testing.transport import Endpoints, TransportConformance

    class TestMyTransport(TransportConformance):
        @pytest.fixture
        def endpoints(self):
            return Endpoints.same("mine://localhost:9999")

Training-plan backends run :class:`fedcore.testing.backend.BackendConformance` (and
:func:`fedcore.testing.backend.check_signature_parity`) the same way; aggregators
:class:`fedcore.testing.aggregator.AggregatorConformance`; secure-aggregation schemes
:class:`fedcore.testing.secagg.SecureAggregationConformance`. The pytest plugin
:mod:`fedcore.testing.plugin` (entry point ``fedcore``, loaded by pytest once fedcore is
installed) adds fixtures that make the suites easy to run from a plug-in's own tests.

``fedcore.testing`` needs pytest; ``import fedcore`` never imports it.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["AggregatorConformance", "BackendConformance", "Endpoints",
           "SecureAggregationConformance", "TransportConformance", "check_signature_parity"]

_WHERE = {"BackendConformance": "backend", "check_signature_parity": "backend",
          "Endpoints": "transport", "TransportConformance": "transport",
          "AggregatorConformance": "aggregator", "SecureAggregationConformance": "secagg"}


def __getattr__(name: str) -> Any:  # lazy: a backend's tests need not import transports
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
