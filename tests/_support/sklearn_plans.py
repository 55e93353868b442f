"""scikit-learn training plans that several test modules ship to nodes (needs sklearn)."""

from __future__ import annotations

from sklearn.linear_model import SGDClassifier

from fedcore_sklearn import SklearnTrainingPlan


class SleepWhenToldPlan(SklearnTrainingPlan):
    """Sleeps where the node process has PLAN_TEST_SLEEP set (a site to kill mid-round)."""

    estimator = SGDClassifier

    def fit(self, dataset, seed):
        import os
        import time

        time.sleep(float(os.environ.get("PLAN_TEST_SLEEP", "0")))
        return super().fit(dataset, seed)
