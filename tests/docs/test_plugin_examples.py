"""The plug-in examples of docs/plugins.md pass their conformance suites through fedcore's
pytest plugin, run by pytest as a plug-in author runs them."""

from __future__ import annotations

import re
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from fedcore.testing.aggregator import AggregatorConformance
from fedcore.testing.secagg import SecureAggregationConformance

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = re.compile(r"^<!-- pytest-plugin-example: (\S+) -->\n<!-- not-run -->\n```python\n"
                     r"(.*?)^```$", re.S | re.M)
EXAMPLES = dict(EXAMPLE.findall((ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")))
SUITES = {"test_scaled_fedavg.py": AggregatorConformance,
          "test_tight_masking.py": SecureAggregationConformance}


def plugin_args() -> list[str]:
    """``-p fedcore.testing.plugin`` unless installed fedcore's entry point loads it already
    (pytest refuses a plugin registered twice)."""
    installed = any(ep.value == "fedcore.testing.plugin"
                    for ep in entry_points(group="pytest11"))
    return [] if installed else ["-p", "fedcore.testing.plugin"]


def test_the_page_has_both_examples():
    assert sorted(EXAMPLES) == sorted(SUITES)


@pytest.mark.parametrize("name", sorted(SUITES))
def test_a_doc_example_passes_its_suite_through_the_plugin(pytester, name):
    pytester.makepyfile(**{name[:-3]: EXAMPLES[name]})
    result = pytester.runpytest(*plugin_args(), "-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()
    suite_tests = [t for t in dir(SUITES[name]) if t.startswith("test_")]
    assert outcomes.get("passed", 0) >= len(suite_tests), result.stdout.str()
    assert not {"failed", "errors", "error", "skipped", "xfailed"} & set(outcomes), \
        result.stdout.str()
    result.stdout.fnmatch_lines(["fedcore plug-ins: backends: *secagg: *joye-libert*"])


def test_the_plugin_fixtures(pytester):
    pytester.makepyfile(test_fixtures='''
        from fedcore import plugins

        def test_register(fedcore_register):
            fedcore_register("aggregators", "mine", object)
            assert plugins.load("aggregators", "mine") is object

        def test_registered_for_one_test_only():
            assert "mine" not in plugins.available("aggregators")

        def test_the_others(fedcore_free_port, fedcore_inproc_url, fedcore_identity, tmp_path):
            import os, socket
            with socket.socket() as s:
                s.bind(("127.0.0.1", fedcore_free_port))
            assert fedcore_inproc_url.startswith("inproc://")
            assert os.environ["FEDCORE_IDENTITY"] == str(fedcore_identity)
            assert fedcore_identity.is_relative_to(tmp_path)
    ''')
    result = pytester.runpytest(*plugin_args(), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
