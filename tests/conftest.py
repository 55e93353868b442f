from __future__ import annotations

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
