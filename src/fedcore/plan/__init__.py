"""The training plan: the researcher's code that nodes run, shipped as hashed source.

:class:`TrainingPlan` is what backends subclass; :class:`PlanBundle` ships a plan class as
source that nodes approve by its SHA-256; :mod:`fedcore.plan.metrics` computes evaluation
metrics with numpy alone.
"""

from fedcore.plan.base import (
    LocalSteps,
    TrainingPlan,
    batch_indices,
    collect_predictions,
)
from fedcore.plan.bundle import PlanBundle

__all__ = ["LocalSteps", "PlanBundle", "TrainingPlan", "batch_indices", "collect_predictions"]
