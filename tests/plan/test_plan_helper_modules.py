"""A plan with helper modules: shipped file by file under one hash, importable on a node that
does not have them, and refused at bundling when a local import is not shipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from fedcore.errors import ConfigurationError
from fedcore.plan import PlanBundle
from tests._support.plan_package import FEATURES, make_package, packaged_plan

pytest.importorskip("sklearn")

@pytest.fixture
def importable(tmp_path):
    """``tmp_path`` on the import path (as a researcher's project folder is)."""
    sys.path.insert(0, str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    sys.path.remove(str(tmp_path))
    for name in set(sys.modules) - before:
        if name.startswith("plan_pkg_") or name.startswith("solo_helper_"):
            del sys.modules[name]


_plan = packaged_plan


def test_a_package_plan_ships_every_file_under_one_hash(importable):
    pkg = make_package(importable)
    bundle = PlanBundle.from_class(_plan(pkg))
    assert sorted(bundle.files) == sorted([f"{pkg}/__init__.py", f"{pkg}/features.py",
                                           f"{pkg}/plan.py", "plan.py"])
    assert bundle.helper_files == sorted(set(bundle.files) - {"plan.py"})
    assert bundle.files[f"{pkg}/features.py"] == (importable / pkg / "features.py").read_text()
    assert f"from {pkg}.features import squash" in bundle.source
    again = PlanBundle.from_wire(json.loads(json.dumps(bundle.to_wire())))
    assert again.sha256 == bundle.sha256

    # One character changed in the helper file: another plan as far as any node is concerned.
    path = importable / pkg / "features.py"
    path.write_text(path.read_text().replace("np.tanh", "np.tanh "))
    changed = PlanBundle.from_class(_plan(pkg))
    assert changed.source == bundle.source
    assert changed.sha256 != bundle.sha256


def test_a_node_without_the_package_imports_it_from_the_bundle(importable, tmp_path_factory):
    """What the plan worker does, in a process whose import path lacks the package."""
    pkg = make_package(importable, scale=3.0)
    wire = PlanBundle.from_class(_plan(pkg)).to_wire()
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from fedcore.plan import PlanBundle
        try:
            import {pkg}
        except ImportError:
            pass
        else:
            raise SystemExit("the package is importable without the bundle")
        cls = PlanBundle.from_wire(json.load(sys.stdin)).load()
        import {pkg}.features as f
        print(json.dumps([cls.__name__, float(f.squash(np.ones(1))[0])]))
    """)
    elsewhere = tmp_path_factory.mktemp("node")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and p != str(importable)
                                        and os.path.isdir(p))
    out = subprocess.run([sys.executable, "-c", script], input=json.dumps(wire), text=True,
                         capture_output=True, cwd=elsewhere, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    name, value = json.loads(out.stdout)
    assert name == "PackagedPlan" and value == pytest.approx(float(__import__("numpy").tanh(3)))


def test_two_versions_of_a_helper_in_one_process_each_run_their_own(importable):
    """A plan worker keeps plans between rounds: a new version must not get the old helper."""
    pkg = make_package(importable, scale=1.0)
    first = PlanBundle.from_class(_plan(pkg)).to_wire()
    path = importable / pkg / "features.py"
    path.write_text(FEATURES.format(scale=5.0))
    second = PlanBundle.from_class(_plan(pkg)).to_wire()
    for name in [n for n in sys.modules if n.startswith(pkg)]:  # a process without them
        del sys.modules[name]
    sys.path.remove(str(importable))
    try:
        import numpy as np

        one = PlanBundle.from_wire(first).load()
        two = PlanBundle.from_wire(second).load()
        squash_one = vars(sys.modules[one.__module__])["squash"]
        squash_two = vars(sys.modules[two.__module__])["squash"]
        assert squash_one(np.ones(1))[0] == pytest.approx(np.tanh(1.0))
        assert squash_two(np.ones(1))[0] == pytest.approx(np.tanh(5.0))
    finally:
        sys.path.insert(0, str(importable))


def test_an_import_of_a_local_module_not_shipped_is_refused_at_bundling(importable):
    pkg = make_package(importable, listed=False)
    with pytest.raises(ConfigurationError) as info:
        PlanBundle.from_class(_plan(pkg))
    message = str(info.value)
    assert f"imports local modules that the nodes do not have: {pkg + '.features'!r}" in message
    assert f"helper_modules = ({pkg!r},)" in message
    assert str(importable / pkg) in message


def test_an_import_inside_a_method_is_found_too(importable):
    name = f"solo_helper_{uuid.uuid4().hex[:8]}"
    (importable / f"{name}.py").write_text("def double(x):\n    return 2 * x\n")
    (importable / f"{name}_plan.py").write_text(textwrap.dedent(f"""
        from sklearn.linear_model import SGDClassifier
        from fedcore_sklearn import SklearnTrainingPlan

        class LazyPlan(SklearnTrainingPlan):
            estimator = SGDClassifier

            def training_data(self, dataset):
                import {name}
                X, y = super().training_data(dataset)
                return {name}.double(X), y
    """))
    try:
        plan = __import__(f"{name}_plan").LazyPlan
        with pytest.raises(ConfigurationError, match=f"helper_modules = \\({name!r},\\)"):
            PlanBundle.from_class(plan)
        plan.helper_modules = (name,)
        bundle = PlanBundle.from_class(plan)
        assert sorted(bundle.files) == sorted(["plan.py", f"{name}.py"])
    finally:
        sys.modules.pop(f"{name}_plan", None)


def test_helper_modules_must_be_local(importable):
    pkg = make_package(importable)
    plan = _plan(pkg)
    plan.helper_modules = (pkg, "numpy")
    with pytest.raises(ConfigurationError, match="'numpy', which is not a local module"):
        PlanBundle.from_class(plan)


@pytest.mark.parametrize("name", ["../evil.py", "/etc/evil.py", "a b.py", "pkg/.py",
                                  "plan.txt", "pkg//x.py", "pkg\\x.py"])
def test_a_bundle_with_a_strange_file_name_is_refused(name):
    wire = {"files": {"plan.py": "x = 1\n", name: "y = 2\n"}, "entry": "P",
            "backend": "sklearn"}
    with pytest.raises(ConfigurationError, match="expected file names like 'plan.py'"):
        PlanBundle.from_wire(wire)


def test_a_module_inside_a_package_ships_alone_with_its_parents(importable):
    """``helper_modules = ("pkg.features",)`` ships that file and the __init__ above it."""
    pkg = make_package(importable)
    (importable / pkg / "unrelated.py").write_text("BIG = 1\n")
    plan = _plan(pkg)
    plan.helper_modules = (f"{pkg}.features",)
    bundle = PlanBundle.from_class(plan)
    assert sorted(bundle.files) == sorted(["plan.py", f"{pkg}/__init__.py",
                                           f"{pkg}/features.py"])


@pytest.mark.parametrize("name", ["json.py", "os/__init__.py", "fedcore/node/node.py",
                                  "numpy/__init__.py"])
def test_a_bundle_cannot_replace_an_installed_module(name):
    wire = {"files": {"plan.py": "x = 1\n", name: "y = 2\n"}, "entry": "P",
            "backend": "sklearn"}
    with pytest.raises(ConfigurationError, match="would replace the installed module"):
        PlanBundle.from_wire(wire)
