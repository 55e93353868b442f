"""scikit-learn backend: federate any estimator that has ``partial_fit``."""

from .plan import SklearnTrainingPlan

__all__ = ["SklearnTrainingPlan"]
