"""The Q-Delta language model: its config and presets, the NNX model, decoding and generation.

This module gathers the model's public names; each part lives in the module of its job:

* :mod:`qdelta_jax.model_config`: :class:`QDeltaConfig`, :data:`PRESETS`, :func:`count_params`
  (closed form) and :func:`weight_decay_mask` (the one weight-decay rule);
* :mod:`qdelta_jax.blocks`: :class:`Block` (pre-norm Q-Delta mixer, then pre-norm
  :class:`SwiGLU`);
* :mod:`qdelta_jax.lm`: :class:`QDeltaLM` (embedding, the stacked or unrolled blocks, final
  norm, LM head), its decoding cache and step, :func:`compiled_step` and :func:`to_scanned`;
* :mod:`qdelta_jax.loss`: :func:`chunked_cross_entropy`, the LM head and loss in chunks;
* :mod:`qdelta_jax.generation`: :func:`generate`.

Shapes use the letters of :mod:`qdelta_jax.array_typing` (D model width, L layers, ...).

Model (docs/MATH.md section 4): token embedding, ``num_hidden_layers`` pre-norm blocks
``x + QDelta(RMSNorm(x))`` then ``x + SwiGLU(RMSNorm(x))``, a final RMSNorm and an untied
``lm_head`` (tied with ``tie_word_embeddings``). Logits are float32.

Parameter paths (``nnx.state(model)``, hence checkpoints) are those of the attributes:
``embed.embedding``, ``blocks.<i>.{attn_norm, attn, mlp_norm, mlp}``, ``norm``,
``lm_head.kernel``; with ``scan_layers`` ``blocks.<name>`` with a leading layer axis.
"""

from qdelta_jax.blocks import Block, SwiGLU
from qdelta_jax.generation import _sample as _sample  # one sampling step, for qdelta-generate
from qdelta_jax.generation import generate
from qdelta_jax.layers import LayerCache, QDelta, RMSNorm, partitioned
from qdelta_jax.lm import ModelCache, QDeltaLM, check_token_ids, compiled_step, to_scanned
from qdelta_jax.loss import LOSS_CHUNK_TOKENS, chunked_cross_entropy
from qdelta_jax.model_config import (
    DTYPES,
    NO_DECAY_NAMES,
    PRESETS,
    QDeltaConfig,
    count_params,
    derived_intermediate_size,
    weight_decay_mask,
)

__all__ = [
    "DTYPES",
    "LOSS_CHUNK_TOKENS",
    "NO_DECAY_NAMES",
    "PRESETS",
    "Block",
    "LayerCache",
    "ModelCache",
    "QDelta",
    "QDeltaConfig",
    "QDeltaLM",
    "RMSNorm",
    "SwiGLU",
    "check_token_ids",
    "chunked_cross_entropy",
    "compiled_step",
    "count_params",
    "derived_intermediate_size",
    "generate",
    "partitioned",
    "to_scanned",
    "weight_decay_mask",
]
