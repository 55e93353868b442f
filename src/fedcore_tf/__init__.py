"""TensorFlow/Keras backend: KerasTrainingPlan, weights <-> ParameterSet, DP-SGD.

DP-SGD (:mod:`fedcore_tf.privacy`) needs tensorflow-privacy and Keras 2 (``tf-keras``), in a
process that set ``TF_USE_LEGACY_KERAS=1`` before importing TensorFlow; it is imported only
when a round asks for it, so other processes are not affected.
"""

from fedcore_tf.plan import KerasTrainingPlan

__all__ = ["KerasTrainingPlan"]
