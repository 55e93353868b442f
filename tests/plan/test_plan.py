from __future__ import annotations

import inspect
import linecache
import sys
import textwrap
import types

import pytest

from fedcore.errors import ConfigurationError, PlanError
from fedcore.plan import PlanBundle, TrainingPlan

pytest.importorskip("sklearn")

from fedcore_sklearn import SklearnTrainingPlan  # noqa: E402

CELL_1 = """
import numpy as np
from sklearn.linear_model import SGDClassifier

SCALE = 2.0
LABELS = ("benign", "malignant")

def rescale(x):
    return np.asarray(x) * SCALE
"""

CELL_2 = """
class Base(SklearnTrainingPlan):
    estimator = SGDClassifier

class NotebookPlan(Base):
    def training_data(self, dataset):
        X, y = super().training_data(dataset)
        return rescale(X), y

    def describe(self):
        return LABELS
"""


def _run_cells(*cells, module_name="fake_notebook"):
    """Execute cells as IPython does: each compiled under its own name kept in linecache."""
    module = types.ModuleType(module_name)
    module.SklearnTrainingPlan = SklearnTrainingPlan  # imported in an earlier cell
    sys.modules[module_name] = module
    for i, cell in enumerate(cells):
        filename = f"<ipython-input-{i + 1}-{abs(hash(cell)) % 10**8}>"
        source = textwrap.dedent(cell)
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        exec(compile(source, filename, "exec"), module.__dict__)
    return module


def test_a_plan_from_notebook_cells_ships_with_what_it_uses():
    nb = _run_cells(CELL_1, CELL_2)
    bundle = PlanBundle.from_class(nb.NotebookPlan)
    src = bundle.source
    assert "import numpy as np" in src
    assert "from sklearn.linear_model import SGDClassifier" in src
    assert "from fedcore_sklearn import SklearnTrainingPlan" in src
    assert "SCALE = 2.0" in src and "LABELS = ('benign', 'malignant')" in src
    assert "def rescale(x):" in src and "class Base(SklearnTrainingPlan):" in src
    assert src.index("class Base") < src.index("class NotebookPlan")
    # What a node does: run the shipped source in a fresh module, with nothing else.
    loaded = PlanBundle.from_wire(bundle.to_wire()).load()
    assert loaded is not nb.NotebookPlan and loaded.__name__ == "NotebookPlan"
    plan = loaded({}, {}, {"kind": "array", "feature_shape": [3],
                           "categories": {"target": [0, 1]}})
    assert plan.describe() == ("benign", "malignant")
    plan.build(seed=0)
    assert plan.get_parameters()["coef_"].shape == (1, 3)


def test_the_hash_is_the_bytes_that_run():
    nb = _run_cells(CELL_1, CELL_2)
    bundle = PlanBundle.from_class(nb.NotebookPlan)
    assert len(bundle.sha256) == 64
    assert PlanBundle.from_class(nb.NotebookPlan).sha256 == bundle.sha256  # deterministic
    source = bundle.source
    # Any change to the text the node executes changes the hash: trailing blanks, line
    # endings, a final newline, one character of code.
    variants = [source.replace("\n", "  \n", 1), source.replace("\n", "\r\n"),
                source + "\n", source.rstrip("\n"), source.replace("2.0", "3.0"),
                source.replace("    ", "\t", 1)]
    hashes = {PlanBundle({"plan.py": v}, bundle.entry, bundle.backend).sha256
              for v in variants}
    assert len(hashes) == len(variants) and bundle.sha256 not in hashes
    # The file boundaries are part of the hash: moving text between files changes it.
    a = PlanBundle({"plan.py": "x\0", "z.py": "y"}, "P", "sklearn")
    b = PlanBundle({"plan.py": "x", "\0z.py": "y"}, "P", "sklearn")
    assert a.sha256 != b.sha256


def test_sources_that_behave_differently_have_different_hashes():
    """A trailing blank inside a string literal changes what the plan does (issue 15)."""
    nb = _run_cells(CELL_1, CELL_2)
    bundle = PlanBundle.from_class(nb.NotebookPlan)
    plain, blank = (PlanBundle({"plan.py": bundle.source + f'\nNOTE = """ok{end}\n"""\n'},
                               bundle.entry, bundle.backend) for end in ("", "  "))
    notes = [sys.modules[b.load().__module__].NOTE for b in (plain, blank)]
    assert notes == ["ok\n", "ok  \n"]  # the node runs these two texts differently...
    assert plain.sha256 != blank.sha256  # ...so an approval of one is not one of the other


def test_a_bundle_whose_hash_does_not_match_is_refused():
    nb = _run_cells(CELL_1, CELL_2)
    wire = PlanBundle.from_class(nb.NotebookPlan).to_wire()
    wire["files"]["plan.py"] += "\nimport os\n"
    with pytest.raises(ConfigurationError, match="hash mismatch"):
        PlanBundle.from_wire(wire)


def test_unshippable_globals_are_named():
    nb = _run_cells(CELL_1, """
    import threading
    LOCK = threading.Lock()

    class LockingPlan(SklearnTrainingPlan):
        def init_model(self):
            with LOCK:
                return None
    """)
    with pytest.raises(ConfigurationError, match="global 'LOCK'"):
        PlanBundle.from_class(nb.LockingPlan)


def test_plans_need_a_backend_and_a_plan_class():
    class NoBackend(TrainingPlan):
        pass

    with pytest.raises(ConfigurationError, match="does not name a backend"):
        PlanBundle.from_class(NoBackend)
    with pytest.raises(ConfigurationError, match="Expected a TrainingPlan subclass"):
        PlanBundle.from_class(dict)  # type: ignore[arg-type]


def test_a_broken_bundle_fails_as_a_plan_error():
    bad = PlanBundle({"plan.py": "raise RuntimeError('no')\n"}, "P", "sklearn")
    with pytest.raises(PlanError, match="RuntimeError: no"):
        bad.load()
    empty = PlanBundle({"plan.py": "x = 1\n"}, "P", "sklearn")
    with pytest.raises(PlanError, match="no TrainingPlan named 'P'"):
        empty.load()


class FilePlan(SklearnTrainingPlan):
    """A plan defined in a regular module."""

    def init_model(self):
        from sklearn.linear_model import SGDRegressor

        return SGDRegressor()


def test_a_plan_from_a_file_ships_too():
    bundle = PlanBundle.from_class(FilePlan)
    assert "class FilePlan(SklearnTrainingPlan):" in bundle.source
    assert bundle.load().__name__ == "FilePlan"


def test_method_locals_that_shadow_module_globals_are_not_shipped():
    nb = _run_cells(CELL_1, """
    X = np.zeros((1000, 3))  # the notebook's data: it must stay on the researcher's side

    class LocalsPlan(SklearnTrainingPlan):
        estimator = SGDClassifier

        def training_data(self, dataset):
            X, y = super().training_data(dataset)
            return rescale(X), y
    """)
    src = PlanBundle.from_class(nb.LocalsPlan).source
    assert "np.zeros" not in src and "X = " not in src
    assert "def rescale(x):" in src


def test_nodes_loading_one_plan_get_classes_of_their_own_from_one_compilation(monkeypatch):
    from fedcore.plan import bundle as bundle_module

    compiled: list[str] = []

    def counting(source, filename, mode):
        compiled.append(filename)
        return compile(source, filename, mode)

    monkeypatch.setattr(bundle_module, "compile", counting, raising=False)
    source = ("from fedcore_sklearn import SklearnTrainingPlan\n\n"
              f"class P(SklearnTrainingPlan):\n    TAG = {id(compiled)}\n")
    wire = PlanBundle({"plan.py": source}, "P", "sklearn").to_wire()
    first, second = (PlanBundle.from_wire(wire).load() for _ in range(2))  # two nodes
    assert first is not second and len(compiled) == 1  # one class each, compiled once
    first.TAG = -1  # what one node's class holds is not the other's
    assert second.TAG == id(compiled)
    changed = PlanBundle({"plan.py": source.replace("TAG", "TAG2")}, "P", "sklearn")
    assert changed.load().TAG2 == id(compiled) and len(compiled) == 2  # new bytes, compiled


def test_a_bundle_ran_before_only_once_its_exact_files_ran_to_the_end(monkeypatch):
    from fedcore.plan import bundle as bundle_module

    monkeypatch.setattr(bundle_module, "_COMPILED", {})
    source = ("from fedcore_sklearn import SklearnTrainingPlan\n\n"
              "class P(SklearnTrainingPlan):\n    pass\n")
    wire = PlanBundle({"plan.py": source}, "P", "sklearn").to_wire()
    first, second = PlanBundle.from_wire(wire), PlanBundle.from_wire(wire)
    assert not first.ran_before and not second.ran_before  # a first load may import
    cls = first.load()
    assert first.ran_before and second.ran_before  # another node's copy: imports done
    assert second.load() is not cls  # still a class of its own
    # Other files (a blank added), even under the same class name: never run here.
    assert not PlanBundle({"plan.py": source + "\n"}, "P", "sklearn").ran_before
    # Code that failed half-way may not have imported what it imports: loaded as a first.
    broken = {"plan.py": "import json\nraise RuntimeError('no')\n"}
    for _ in range(2):
        bad = PlanBundle(broken, "P", "sklearn")
        with pytest.raises(PlanError, match="RuntimeError: no"):
            bad.load()
        assert not bad.ran_before


def test_a_plan_file_edited_between_two_bundles_ships_its_new_source(tmp_path, monkeypatch):
    # A class's source is found once per version of its file; an edit of the file (seen by
    # linecache's check, as inspect sees it) gives the edited source, not the one kept.
    import importlib

    import fedcore.plan.bundle as bundle_module

    path = tmp_path / f"edited_plan_{id(tmp_path)}.py"
    body = ("from fedcore_sklearn import SklearnTrainingPlan\n\n"
            "class EditedPlan(SklearnTrainingPlan):\n    def init_model(self):\n"
            "        return {!r}\n")
    path.write_text(body.format("first"))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(path.stem)
    parsed: list[int] = []
    parse = bundle_module.inspect.ast.parse
    monkeypatch.setattr(bundle_module.inspect.ast, "parse",
                        lambda *a, **k: parsed.append(1) or parse(*a, **k))
    first = PlanBundle.from_class(module.EditedPlan)
    again = PlanBundle.from_class(module.EditedPlan)
    assert again.sha256 == first.sha256 and "'first'" in first.source
    found = len(parsed)
    PlanBundle.from_class(module.EditedPlan)
    assert len(parsed) < found + 2  # the whole file is not parsed again to find the class
    path.write_text(body.format("second, longer"))  # another size: linecache sees the change
    edited = PlanBundle.from_class(module.EditedPlan)
    assert "'second, longer'" in edited.source and edited.sha256 != first.sha256
    assert textwrap.dedent(inspect.getsource(module.EditedPlan)) in edited.source
