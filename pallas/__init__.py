"""Pallas GPU kernels (Triton lowering) for the chunked Q-Delta op, imported as
``qdelta_jax.pallas``.

:func:`chunked_core` returns a drop-in replacement for :func:`qdelta_jax.xla.chunked_core`;
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


def chunked_core(K: int, V: int, dtype, chunk_size: int, *, config: Config | None = None,
                 interpret: bool | None = None, forward_backend: str = "auto"):
    """The Pallas core for head sizes ``K, V``, compute dtype ``dtype`` and ``chunk_size``:
    ``core(q, k, v, G, beta, lam, h0, seg, reset, is_last, seq, scale) -> (o, final)`` with the
    contract of :func:`qdelta_jax.xla.chunked_core`.

    ``forward_backend`` (``"auto"``, ``"mosaic"``, ``"triton"``): which kernels compute the
    forward where no gradient is taken, and whether training uses the Mosaic GPU kernels (see
    :func:`.core.make_core`).

    Raises ValueError when ``chunk_size`` is not in :data:`CHUNK_SIZES` or a head size is out of
    range (K up to 256, V up to 512)."""
    return make_core(K=K, V=V, dtype=dtype, chunk_size=chunk_size, config=config,
                     interpret=interpret, forward_backend=forward_backend)


__all__ = [
    "CHUNK_SIZES",
    "MAX_K",
    "MAX_V",
    "Config",
    "StageConfig",
    "autotune",
    "chunked_core",
    "default_config",
    "default_save_residuals",
    "get_config",
]
