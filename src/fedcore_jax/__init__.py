"""JAX backend: parameters as pytrees, a jitted training step, optax optimizers."""

from fedcore_jax.convert import mlp
from fedcore_jax.plan import JaxTrainingPlan

__all__ = ["JaxTrainingPlan", "mlp"]
