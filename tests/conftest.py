from __future__ import annotations

import os

import numpy as np
import pytest


@pytest.fixture(scope="session")
def breast_cancer():
    """Standardised breast-cancer data: (X_train, X_test, y_train, y_test)."""
    sklearn = pytest.importorskip("sklearn")
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    del sklearn
    X, y = load_breast_cancer(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    scaler = StandardScaler().fit(Xtr)
    return scaler.transform(Xtr), scaler.transform(Xte), ytr, yte


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True, scope="session")
def _researcher_identity(tmp_path_factory):
    """A researcher key for the session, never the user's own ~/.fedcore."""
    import os

    folder = tmp_path_factory.mktemp("researcher")
    os.environ["FEDCORE_IDENTITY"] = str(folder / "researcher.key")
    os.environ["FEDCORE_NODES"] = str(folder / "nodes.toml")
    yield


# --- TF DP-SGD: its own environment (tensorflow-privacy holds numpy at 1.26) ------------------
# scripts/test.sh runs the suite with FEDCORE_TFDP unset (the tests marked `tfdp` are
# deselected), then tests/privacy/test_tf_privacy.py in .venv-tfdp with FEDCORE_TFDP=1 (only the
# `tfdp` tests run). tensorflow-privacy's Keras optimizers need Keras 2, chosen by
# TF_USE_LEGACY_KERAS=1 before TensorFlow is first imported; the variable is process-wide,
# so only that process sets it, here, before any test module imports TensorFlow.
_TFDP = os.environ.get("FEDCORE_TFDP") == "1"
if _TFDP:
    os.environ["TF_USE_LEGACY_KERAS"] = "1"


def pytest_collection_modifyitems(config, items):
    keep = [item for item in items if (item.get_closest_marker("tfdp") is not None) == _TFDP]
    if len(keep) != len(items):
        kept = set(map(id, keep))
        config.hook.pytest_deselected(items=[i for i in items if id(i) not in kept])
        items[:] = keep
