"""The training plan: the researcher's code that nodes run, shipped as hashed source.

:class:`TrainingPlan` is what backends subclass; :class:`LocalTraining` is its typed
``training_args`` (:func:`check_training_args` checks them for a plan class) and
:class:`LocalLoop` the epochs x batches loop backends share; :class:`PlanBundle` ships a
plan class as source that nodes approve by its SHA-256; :mod:`fedcore.plan.metrics`
computes evaluation metrics with numpy alone.
"""

from fedcore.plan.base import (
    TrainingPlan,
    batch_indices,
    check_training_args,
    collect_predictions,
)
from fedcore.plan.bundle import PlanBundle
from fedcore.plan.loop import LocalLoop, LocalSteps
from fedcore.plan.training import COMMON_KEYS, LocalTraining

__all__ = [
    "COMMON_KEYS",
    "LocalLoop",
    "LocalSteps",
    "LocalTraining",
    "PlanBundle",
    "TrainingPlan",
    "batch_indices",
    "check_training_args",
    "collect_predictions",
]
