"""The blocks of the Q-Delta language model: a pre-norm Q-Delta token mixer, then a pre-norm
SwiGLU MLP (docs/MATH.md section 4).

``Block(x) = x' + SwiGLU(RMSNorm(x'))`` with ``x' = x + QDelta(RMSNorm(x))``. The block's
parameter names (``attn_norm``, ``attn``, ``mlp_norm``, ``mlp.{gate,up,down}_proj``) are the
paths of checkpoints and of the authors' HF weights (:mod:`qdelta_jax.hf`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array

from qdelta_jax.layers import QDelta, RMSNorm, partitioned
from qdelta_jax.model_config import QDeltaConfig


class SwiGLU(nnx.Module):
    """``down(SiLU(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, std: float, dtype,
                 param_dtype, rngs: nnx.Rngs):
        def linear(n_in, n_out, names):
            return nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                              kernel_init=partitioned(nnx.initializers.normal(std), *names),
                              rngs=rngs)

        self.gate_proj = linear(hidden_size, intermediate_size, ("embed", "mlp"))
        self.up_proj = linear(hidden_size, intermediate_size, ("embed", "mlp"))
        self.down_proj = linear(intermediate_size, hidden_size, ("mlp", "embed"))

    def __call__(self, x: Array) -> Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    """``x + QDelta(RMSNorm(x))``, then ``x + SwiGLU(RMSNorm(x))``."""

    def __init__(self, config: QDeltaConfig, *, rngs: nnx.Rngs):
        c = config
        dtype, pdtype = jnp.dtype(c.compute_dtype), jnp.dtype(c.param_dtype)
        self.attn_norm = RMSNorm(c.hidden_size, eps=c.norm_eps, param_dtype=pdtype)
        self.attn = QDelta(
            c.hidden_size, c.num_heads, c.head_dim, expand_v=c.expand_v,
            num_v_heads=c.num_v_heads, use_gate=c.use_gate, use_short_conv=c.use_short_conv,
            conv_size=c.conv_size, allow_neg_eigval=c.allow_neg_eigval, lam_bias=c.lam_bias,
            fixed_lam=c.fixed_lam, use_decay=c.use_decay, norm_eps=c.norm_eps,
            chunk_size=c.chunk_size, implementation=c.implementation,
            save_residuals=c.save_residuals, guard_nonfinite=c.guard_nonfinite,
            initializer_range=c.initializer_range, dtype=dtype,
            param_dtype=pdtype, rngs=rngs,
        )
        self.mlp_norm = RMSNorm(c.hidden_size, eps=c.norm_eps, param_dtype=pdtype)
        self.mlp = SwiGLU(c.hidden_size, c.mlp_size, std=c.initializer_range, dtype=dtype,
                          param_dtype=pdtype, rngs=rngs)

    def __call__(self, x, *, cu_seqlens=None, cache=None, mask=None, return_aux=False):
        out = self.attn(self.attn_norm(x), cu_seqlens=cu_seqlens, cache=cache, mask=mask,
                        return_aux=return_aux)
        out = out if isinstance(out, tuple) else (out,)
        x = x + out[0]
        x = x + self.mlp(self.mlp_norm(x))
        return (x,) + out[1:] if len(out) > 1 else x


def _block_forward(block: Block, x, cu_seqlens, return_aux: bool):
    return block(x, cu_seqlens=cu_seqlens, return_aux=return_aux)
