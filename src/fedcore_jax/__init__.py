"""JAX backend: parameters as pytrees, a jitted training step, optax optimizers."""

from .convert import mlp
from .plan import JaxTrainingPlan

__all__ = ["JaxTrainingPlan", "mlp"]
