"""Pallas GPU kernels (Triton lowering) for the chunked Q-Delta op, imported as
``qdelta_jax.pallas``.

:func:`make_core` builds a core with the contract of :func:`qdelta_jax.xla.chunked_core` (the
XLA path's core function) from the head sizes, dtype and chunk size;
``qdelta_rule(..., implementation="pallas")`` uses it. Off the GPU the kernels run in Pallas
interpret mode (slow; that is how the tests run them). See :mod:`.forward`, :mod:`.backward`
for the stages, :mod:`.config` for block sizes and :mod:`.tuning` for autotuning.
"""

from __future__ import annotations

from qdelta_jax.pallas.config import (
    Config,
    StageConfig,
    default_config,
    default_save_residuals,
    get_config,
)
from qdelta_jax.pallas.core import CHUNK_SIZES, MAX_K, MAX_V, make_core
from qdelta_jax.pallas.tuning import autotune

__all__ = [
    "CHUNK_SIZES",
    "MAX_K",
    "MAX_V",
    "Config",
    "StageConfig",
    "autotune",
    "default_config",
    "default_save_residuals",
    "get_config",
    "make_core",
]
