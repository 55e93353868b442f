"""A real Jupyter kernel: a plan defined in a notebook cell ships, and the Experiment runs
inside the kernel's running event loop."""

from __future__ import annotations

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("sklearn")

CELLS = [
    """
import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import SGDClassifier
from sklearn.preprocessing import StandardScaler

import fedcore
from fedcore_sklearn import SklearnTrainingPlan

X, y = load_breast_cancer(return_X_y=True)
X = StandardScaler().fit_transform(X)
CLIP = 10.0
""",
    """
def clip(X):
    return np.clip(X, -CLIP, CLIP)
""",
    """
class NotebookPlan(SklearnTrainingPlan):
    estimator = SGDClassifier

    def training_data(self, dataset):
        X, y = super().training_data(dataset)
        return clip(X), y
""",
    """
import asyncio
assert asyncio.get_event_loop().is_running()  # the kernel's own loop
fed = fedcore.simulate.from_arrays(X, y, n_nodes=3, tags=["bc"])
exp = fedcore.Experiment(NotebookPlan, tags=["bc"], federation=fed.url,
                         model_args={"loss": "log_loss"}, round_limit=3)
exp.run()
await exp.arun_once()
accuracy = exp.metrics()["accuracy"].iloc[-1]
print("ROUNDS", exp.round, "ACCURACY", accuracy)
source = fedcore.PlanBundle.from_class(NotebookPlan).source
print("SOURCE-HAS-HELPERS", "def clip(X)" in source and "CLIP = 10.0" in source)
fed.close()
""",
]


def test_a_plan_defined_in_notebook_cells_trains_in_a_real_kernel():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src.strip()) for src in CELLS]
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3")
    client.execute()
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.get("name") == "stdout")
    assert "ROUNDS 4" in text, nb.cells[-1].outputs
    accuracy = float(text.split("ACCURACY")[1].split()[0])
    assert accuracy > 0.9
    assert "SOURCE-HAS-HELPERS True" in text
