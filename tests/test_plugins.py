from __future__ import annotations

import sys

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


def test_an_installed_plugin_adds_names_but_cannot_take_a_builtin_one_over(tmp_path, monkeypatch):
    """A distribution's entry points add transports; fedcore's own names stay fedcore's."""
    (tmp_path / "other_transport.py").write_text("class Other:\n    pass\n")
    info = tmp_path / "other_transport-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: other-transport\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[fedcore.transports]\nws = other_transport:Other\nother = other_transport:Other\n")
    # Last on the path, so that its entry points are read after fedcore's own.
    monkeypatch.setattr(sys, "path", [*sys.path, str(tmp_path)])
    monkeypatch.setattr(plugins, "_SCANNED", {})
    monkeypatch.setattr(plugins, "_cache", {})
    from fedcore_transport.websocket import WebSocketTransport

    assert plugins.load("transports", "ws") is WebSocketTransport
    assert plugins.load("transports", "other").__name__ == "Other"
    assert "other" in plugins.available("transports")


def test_imported_names_the_plugins_whose_module_this_process_loaded():
    pytest.importorskip("sklearn")
    import fedcore_sklearn  # noqa: F401

    assert "sklearn" in plugins.imported("backends")
    with pytest.raises(ConfigurationError):
        plugins.imported("engines")


def test_loaded_says_whether_load_would_import_a_module(monkeypatch):
    """A node loads a backend off its loop only while ``loaded`` says it is not imported."""
    monkeypatch.setattr(plugins, "_cache", {})
    assert not plugins.loaded("aggregators", "fedavg")  # a first load imports its module
    plugins.load("aggregators", "fedavg")
    assert plugins.loaded("aggregators", "fedavg")
    assert not plugins.loaded("aggregators", "fedavgg")  # unknown: load raises, names one
    with plugins.registered("aggregators", "mine", FedAvg):
        assert plugins.loaded("aggregators", "mine")
    assert not plugins.loaded("aggregators", "mine")
    with pytest.raises(ConfigurationError, match="Unknown plug-in group"):
        plugins.loaded("colours", "red")
