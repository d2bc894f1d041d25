"""A Llama-style transformer LM in Flax NNX: the attention baseline of ``crossover.py``.

Pre-norm blocks ``x + Attention(RMSNorm(x))`` then ``x + SwiGLU(RMSNorm(x))``, rotary position
embeddings (rotate-half form, base ``rope_theta``) on q and k, causal softmax attention through
``jax.nn.dot_product_attention`` (``implementation="cudnn"``, its flash-attention kernel, on
GPUs; XLA elsewhere), a final RMSNorm and an untied head. The norms and the SwiGLU are the Q-Delta
model's own classes, so the two models differ only in the token mixer. Parameters live in
``param_dtype`` and are cast to ``compute_dtype`` for the matmuls, as in ``QDeltaLM``; the layers
are stacked and run with ``lax.scan`` (one compiled block; ``scan_layers=False``: an unrolled
loop, like the Q-Delta model's default). ``loss`` is the same chunked LM head
+ cross-entropy as :meth:`qdelta_jax.model.QDeltaLM.loss`, so the training steps of the two
models differ only in the blocks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from qdelta_jax.layers import RMSNorm
from qdelta_jax.model import LOSS_CHUNK_TOKENS, QDeltaConfig, SwiGLU, chunked_cross_entropy

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 1024
    num_hidden_layers: int = 21
    num_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 2816
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    initializer_range: float = 0.02
    compute_dtype: str = "bfloat16"
    param_dtype: str = "float32"
    attention: str | None = None  # jax.nn.dot_product_attention's implementation
    remat: bool = False
    scan_layers: bool = True

    @classmethod
    def like(cls, c: QDeltaConfig, **overrides) -> LlamaConfig:
        """The transformer of ``c``'s width, depth, MLP size and vocabulary: heads of 128
        channels (of 32 when the width is not a multiple of 128)."""
        head_dim = 128 if c.hidden_size % 128 == 0 else 32
        if c.hidden_size % head_dim:
            raise ValueError(f"hidden_size {c.hidden_size} is not a multiple of {head_dim}")
        fields = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                      num_hidden_layers=c.num_hidden_layers, num_heads=c.hidden_size // head_dim,
                      head_dim=head_dim, intermediate_size=c.mlp_size, norm_eps=c.norm_eps,
                      initializer_range=c.initializer_range, compute_dtype=c.compute_dtype,
                      param_dtype=c.param_dtype, remat=c.remat, scan_layers=c.scan_layers)
        return cls(**{**fields, **overrides})


def rope(x, theta: float):
    """Rotary embedding of ``x [B, T, N, Dh]`` over positions ``0..T-1`` (rotate-half)."""
    T, half = x.shape[1], x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=F32) / half)
    angle = jnp.arange(T, dtype=F32)[:, None] * freq[None, :]  # [T, half]
    cos, sin = jnp.cos(angle)[None, :, None], jnp.sin(angle)[None, :, None]
    xf = x.astype(F32)
    x1, x2 = xf[..., :half], xf[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs):
        self.c = c
        dtype, pdtype = jnp.dtype(c.compute_dtype), jnp.dtype(c.param_dtype)
        init = nnx.initializers.normal(c.initializer_range)

        def linear(n_in, n_out):
            return nnx.Linear(n_in, n_out, use_bias=False, kernel_init=init, dtype=dtype,
                              param_dtype=pdtype, rngs=rngs)

        D, N, Dh = c.hidden_size, c.num_heads, c.head_dim
        self.q_proj, self.k_proj, self.v_proj = linear(D, N * Dh), linear(D, N * Dh), linear(
            D, N * Dh)
        self.o_proj = linear(N * Dh, D)

    def __call__(self, x):
        B, T, _ = x.shape
        N, Dh = self.c.num_heads, self.c.head_dim
        q = rope(self.q_proj(x).reshape(B, T, N, Dh), self.c.rope_theta)
        k = rope(self.k_proj(x).reshape(B, T, N, Dh), self.c.rope_theta)
        v = self.v_proj(x).reshape(B, T, N, Dh)
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                         implementation=self.c.attention)
        return self.o_proj(o.reshape(B, T, N * Dh))


class LlamaBlock(nnx.Module):
    def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs):
        dtype, pdtype = jnp.dtype(c.compute_dtype), jnp.dtype(c.param_dtype)
        self.attn_norm = RMSNorm(c.hidden_size, eps=c.norm_eps, param_dtype=pdtype)
        self.attn = Attention(c, rngs=rngs)
        self.mlp_norm = RMSNorm(c.hidden_size, eps=c.norm_eps, param_dtype=pdtype)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size, std=c.initializer_range,
                          dtype=dtype, param_dtype=pdtype, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class LlamaLM(nnx.Module):
    def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = c
        dtype, pdtype = jnp.dtype(c.compute_dtype), jnp.dtype(c.param_dtype)
        self.dtype = dtype
        init = nnx.initializers.normal(c.initializer_range)
        self.embed = nnx.Embed(c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=pdtype,
                               embedding_init=init, rngs=rngs)

        if c.scan_layers:
            @nnx.split_rngs(splits=c.num_hidden_layers)
            @nnx.vmap(in_axes=0, out_axes=0)
            def stacked(rngs):
                return LlamaBlock(c, rngs=rngs)

            self.blocks = stacked(rngs)
        else:
            self.blocks = nnx.List([LlamaBlock(c, rngs=rngs)
                                    for _ in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, eps=c.norm_eps, param_dtype=pdtype)
        self.lm_head = nnx.Linear(c.hidden_size, c.vocab_size, use_bias=False, dtype=dtype,
                                  param_dtype=pdtype, kernel_init=init,
                                  preferred_element_type=F32, rngs=rngs)

    def hidden(self, tokens):
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an integer array [B, T], got {tokens.dtype} "
                             f"{list(tokens.shape)}")
        x = self.embed(tokens)
        if not self.config.scan_layers:
            fwd = nnx.remat(_block) if self.config.remat else _block
            for block in self.blocks:
                x = fwd(block, x)
            return x
        graphdef, params = nnx.split(self.blocks)

        def body(x, p):
            return nnx.merge(graphdef, p)(x), None

        if self.config.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        x, _ = jax.lax.scan(body, x, params)
        return x

    def __call__(self, tokens, *, cu_seqlens=None):
        _no_packing(cu_seqlens)
        return self.lm_head(self.norm(self.hidden(tokens))).astype(F32)

    def loss(self, tokens, targets, mask, *, cu_seqlens=None, chunk_tokens=LOSS_CHUNK_TOKENS,
             return_correct=False):
        _no_packing(cu_seqlens)
        h = self.norm(self.hidden(tokens))
        return chunked_cross_entropy(h, self.lm_head.kernel[...], targets, mask,
                                     compute_dtype=self.dtype, chunk_tokens=chunk_tokens,
                                     return_correct=return_correct)


def _block(block: LlamaBlock, x):
    return block(x)


def _no_packing(cu_seqlens):
    if cu_seqlens is not None:
        raise ValueError("LlamaLM attends over whole rows: cu_seqlens (packed documents) is not "
                         "supported; pass unpacked rows")
