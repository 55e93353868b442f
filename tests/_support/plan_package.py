"""A researcher's plan as a two-file package (``features.py`` beside ``plan.py``), written to
a folder on the import path; shared by the plan bundle tests and the deployed end to end."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

FEATURES = """
import numpy as np


def squash(X):
    return np.tanh(np.asarray(X) * {scale})
"""

PLAN = """
from sklearn.linear_model import SGDClassifier

from fedcore_sklearn import SklearnTrainingPlan

from .features import squash


class PackagedPlan(SklearnTrainingPlan):
    estimator = SGDClassifier
    helper_modules = ({pkg!r},)

    def training_data(self, dataset):
        X, y = super().training_data(dataset)
        return squash(X), y
"""


def make_package(root: Path, scale: float = 1.0, listed: bool = True) -> str:
    """A two-file package under ``root`` with a unique name; returns the name."""
    pkg = f"plan_pkg_{uuid.uuid4().hex[:10]}"
    (root / pkg).mkdir(parents=True)
    (root / pkg / "__init__.py").write_text('"""A researcher\'s plan package."""\n')
    (root / pkg / "features.py").write_text(FEATURES.format(scale=scale))
    plan = PLAN.format(pkg=pkg)
    if not listed:
        plan = plan.replace(f"    helper_modules = ({pkg!r},)\n", "")
    (root / pkg / "plan.py").write_text(plan)
    return pkg


def packaged_plan(pkg: str) -> type:
    """The plan class of package ``pkg`` (imported afresh if already imported)."""
    for name in [n for n in sys.modules if n == pkg or n.startswith(pkg + ".")]:
        del sys.modules[name]
    __import__(f"{pkg}.plan")
    return sys.modules[f"{pkg}.plan"].PackagedPlan
