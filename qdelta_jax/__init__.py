"""qdelta-jax: Q-Delta linear attention for JAX and Flax.

``qdelta_rule`` is the op (docs/MATH.md section 1, exactly, in every implementation); the layer, the
language model and the training loop live in :mod:`qdelta_jax.layers`, :mod:`qdelta_jax.model`
and :mod:`qdelta_jax.train`.
"""

import os as _os

from qdelta_jax.ops import IMPLEMENTATIONS, default_implementation, qdelta_rule
from qdelta_jax.reference import l2_normalize, qdelta_scan, qdelta_step

# In a source checkout the GPU kernels and the training package sit beside this folder
# (``pallas/``, ``train/``) and are mapped to ``qdelta_jax.pallas`` and ``qdelta_jax.train`` at
# install time. When this very file is imported from the checkout (``python -m ...`` from the
# repository root puts the checkout first on ``sys.path``), let the package find them there too.
# An installed copy has neither folder beside it and is left as it is.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and all(
    _os.path.isfile(_os.path.join(_root, sub, "__init__.py")) for sub in ("pallas", "train")
):
    __path__.append(_root)  # noqa: F821 - the package's own __path__


__version__ = "0.1.0"

# The layer and model pull in Flax: import them on first use, so the op alone stays light.
_LAZY = {
    "QDelta": "qdelta_jax.layers",
    "QDeltaConfig": "qdelta_jax.model",
    "QDeltaLM": "qdelta_jax.model",
    "generate": "qdelta_jax.model",
    "count_params": "qdelta_jax.model",
    "weight_decay_mask": "qdelta_jax.model",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qdelta_jax' has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "IMPLEMENTATIONS",
    "default_implementation",
    "l2_normalize",
    "qdelta_rule",
    "qdelta_scan",
    "qdelta_step",
]
