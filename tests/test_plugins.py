from __future__ import annotations

import pytest

from fedcore import plugins
from fedcore.aggregators import FedAvg
from fedcore.errors import ConfigurationError


def test_builtin_names_resolve_lazily():
    assert plugins.load("aggregators", "fedavg") is FedAvg
    from fedcore_transport.inprocess import InProcessTransport

    assert plugins.load("transports", "inproc") is InProcessTransport
    assert {"sklearn", "torch"} <= set(plugins.available("backends"))


def test_unknown_name_suggests_the_close_one():
    with pytest.raises(ConfigurationError, match="Did you mean 'fedavg'"):
        plugins.load("aggregators", "fedavgg")


def test_unknown_group_is_refused():
    with pytest.raises(ConfigurationError, match="Unknown plug-in group"):
        plugins.load("colours", "red")


def test_registered_object_wins():
    class Mine(FedAvg):
        name = "mine"

    plugins.register("aggregators", "mine", Mine)
    try:
        assert plugins.load("aggregators", "mine") is Mine
        assert "mine" in plugins.available("aggregators")
    finally:
        plugins._registered["aggregators"].pop("mine")


def test_imported_names_the_plugins_whose_module_this_process_loaded():
    pytest.importorskip("sklearn")
    import fedcore_sklearn  # noqa: F401

    assert "sklearn" in plugins.imported("backends")
    with pytest.raises(ConfigurationError):
        plugins.imported("engines")
