"""scikit-learn backend: federate any estimator that has ``partial_fit``."""

from fedcore_sklearn.plan import SklearnTrainingPlan

__all__ = ["SklearnTrainingPlan"]
