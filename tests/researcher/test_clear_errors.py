"""What a researcher reads when a deployed node refuses: the reason, and who can fix it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedcore import Experiment
from fedcore.errors import GovernanceError
from tests._support.attack import serve

pytest.importorskip("sklearn")

from sklearn.linear_model import SGDClassifier  # noqa: E402

from fedcore_sklearn import SklearnTrainingPlan  # noqa: E402


class Plan(SklearnTrainingPlan):
    estimator = SGDClassifier


def test_a_node_that_does_not_trust_the_researcher_says_so_not_no_dataset(tmp_path):
    # The node trusts alice only; the researcher here signs with the session's test key.
    url, node = serve(tmp_path / "site", "site", trusted={"alice": tmp_path / "alice.key"})
    rng = np.random.default_rng(0)
    data = tmp_path / "cohort.csv"
    pd.DataFrame({"age": rng.normal(50, 10, 40), "label": rng.integers(0, 2, 40)}).to_csv(
        data, index=False)
    node.datasets.add("cohort", ["cohort"], data)
    try:
        exp = Experiment(Plan, tags=["cohort"], federation=url, progress=False,
                         model_args={"target": "label"}, connect_timeout=20,
                         enrolled={"site": node.identity.public_key})
        try:
            with pytest.raises(GovernanceError) as refused:
                exp.run(1)
        finally:
            exp.close()
        message = str(refused.value)
        assert "Node site refused the search" in message
        assert "unknown key" in message and "fedcore-node trust add" in message
        assert "No node has an available dataset" not in message
    finally:
        node.stop()


def test_a_node_lacking_the_dp_package_is_told_apart_from_a_plan_error(monkeypatch):
    pytest.importorskip("torch")
    import sys

    from fedcore import simulate
    from fedcore.errors import RoundError
    from tests._support.torch_plans import TinyMLP

    # This node's installation has no Opacus: nothing can import it (it is the one package
    # the test takes away; the node, the plan and torch are real).
    monkeypatch.setitem(sys.modules, "opacus", None)
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 4)).astype("float32"), rng.integers(0, 2, 60)
    with simulate.from_arrays(X, y, n_nodes=2, tags=["t"]) as fed:
        exp = Experiment(TinyMLP, tags=["t"], federation=fed.url, progress=False,
                         privacy={"mechanism": "dp-sgd", "clip": 1.0, "noise_multiplier": 1.1},
                         training_args={"epochs": 1, "batch_size": 16})
        with pytest.raises(RoundError) as failed:
            exp.run_once()
    rows = exp.history
    assert set(rows["error_kind"]) == {"dependency"}, rows[["node", "error_kind", "error"]]
    error = rows["error"].iloc[0]
    assert "lacks a package this round needs" in error and "its administrator" in error
    assert 'pip install "fedcore[torch]"' in error
    assert "dependency" in str(failed.value)
