"""qdelta-jax: Q-Delta linear attention for JAX and Flax.

``qdelta_rule`` is the op (SPEC section 1, exactly, in every implementation); the layer, the
language model and the training loop live in :mod:`qdelta_jax.layers`, :mod:`qdelta_jax.model`
and :mod:`qdelta_jax.train`.
"""

from qdelta_jax.ops import IMPLEMENTATIONS, default_implementation, qdelta_rule
from qdelta_jax.reference import l2_normalize, qdelta_scan, qdelta_step

__version__ = "0.1.0"

__all__ = [
    "IMPLEMENTATIONS",
    "default_implementation",
    "l2_normalize",
    "qdelta_rule",
    "qdelta_scan",
    "qdelta_step",
]
