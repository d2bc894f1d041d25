"""The Q-Delta language model as an NNX module (:class:`QDeltaLM`), its layer stacking and its
decoding step.

Model (docs/MATH.md section 4): token embedding, ``num_hidden_layers`` blocks
(:class:`qdelta_jax.blocks.Block`), a final RMSNorm and an untied ``lm_head`` (tied with
``tie_word_embeddings``). Logits are float32. With ``compute_dtype="bfloat16"`` activations and
matmul inputs are bfloat16 while parameters stay in ``param_dtype`` (float32); the recurrent
state, gates and norms are float32 throughout.

Layer stacking: unrolled (``blocks`` a list, one compiled block per layer) or, with
``scan_layers``, one block whose parameters carry a leading layer axis, run with ``lax.scan``;
:func:`to_scanned` converts the first into the second.

Decoding computes the same function as training:

* ``cache = model.init_cache(B)``; ``logits, cache = model.step(tokens [B, T], cache)``.
  T > 1 (prefill) runs the chunked op with the cached state as ``initial_state``; T == 1 runs
  :func:`qdelta_jax.reference.qdelta_step`, the single copy of the update. Both carry the short
  conv caches. Prefill then steps reproduce the full forward's logits at every position.
* :func:`compiled_step` is ``step`` as one compiled program with a donated cache.

Diagnostics: ``model(tokens, return_aux=True)`` returns ``(logits, aux)`` with ``aux`` a tuple
over layers of ``dict(q, k, beta, lam, g)``: L2-normalised ``q, k [B, T, HV, K]`` (after the
grouped-head repeat, as the op sees them) and ``beta, lam, g [B, T, HV]`` float32, so that
``beta * (k . (k + lam q))`` is the stability quantity of docs/MATH.md section 1.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from qdelta_jax import packing
from qdelta_jax.array_typing import Logits, RowOffsets, TokenMask, Tokens
from qdelta_jax.blocks import Block, _block_forward
from qdelta_jax.layers import LayerCache, RMSNorm, partitioned
from qdelta_jax.loss import LOSS_CHUNK_TOKENS, chunked_cross_entropy
from qdelta_jax.model_config import QDeltaConfig

F32 = jnp.float32

ModelCache = tuple  # tuple[LayerCache, ...], one per layer


class QDeltaLM(nnx.Module):
    """The Q-Delta language model. ``QDeltaLM(config, rngs=nnx.Rngs(seed))``.

    Parameters: ``embed.embedding [vocab, D]``, ``blocks[i].{attn_norm, attn, mlp_norm, mlp}``,
    ``norm``, ``lm_head.kernel [D, vocab]`` (absent when tied).

    With ``config.scan_layers``: ``blocks`` is one :class:`Block` whose parameters carry a
    leading ``[L]`` axis (``L = num_hidden_layers``; ``blocks.attn.q_proj.kernel [L, D, H*K]``;
    created with ``nnx.vmap``, so the per-layer initial values differ from the unrolled model's
    for the same seed, though they have the same distribution). The forward pass is a
    ``lax.scan`` over layers (``remat`` checkpoints the scanned body), decoding too, and the
    decoding cache is one :class:`qdelta_jax.layers.LayerCache` whose arrays have a leading
    ``[L]`` axis instead of a tuple of per-layer caches. :func:`to_scanned` converts an unrolled
    model to that layout (same parameters).
    """

    def __init__(self, config: QDeltaConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        dtype, pdtype = jnp.dtype(c.compute_dtype), jnp.dtype(c.param_dtype)
        self.dtype = dtype
        self.embed = nnx.Embed(c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=pdtype,
                               embedding_init=partitioned(
                                   nnx.initializers.normal(c.initializer_range), "vocab", "embed"),
                               rngs=rngs)
        if c.scan_layers:
            @nnx.split_rngs(splits=c.num_hidden_layers)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def stacked_blocks(rngs):
                return Block(c, rngs=rngs)

            self.blocks = stacked_blocks(rngs)
        else:
            self.blocks = nnx.List([Block(c, rngs=rngs) for _ in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, eps=c.norm_eps, param_dtype=pdtype)
        if c.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nnx.Linear(
                c.hidden_size, c.vocab_size, use_bias=False, dtype=dtype, param_dtype=pdtype,
                kernel_init=partitioned(nnx.initializers.normal(c.initializer_range), "embed",
                                        "vocab"),
                preferred_element_type=F32, rngs=rngs,
            )

    def _logits(self, x: Array) -> Float[Array, "B T vocab"]:
        x = self.norm(x)
        if self.lm_head is None:
            w = self.embed.embedding[...].astype(self.dtype)
            return jnp.einsum("btd,vd->btv", x.astype(self.dtype), w,
                              preferred_element_type=F32)
        return self.lm_head(x).astype(F32)

    def _head_weight(self) -> Float[Array, "D vocab"]:
        """The output projection ``[D, vocab]`` in its storage dtype."""
        if self.lm_head is None:
            return self.embed.embedding[...].T
        return self.lm_head.kernel[...]

    def _check_tokens(self, tokens, name: str = "tokens"):
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"{name} must be an integer array [B, T], got {tokens.dtype} {list(tokens.shape)}"
            )
        check_token_ids(tokens, self.config.vocab_size, name)

    def hidden(
        self,
        tokens: Tokens,
        *,
        cu_seqlens: RowOffsets | packing.Documents | None = None,
        return_aux: bool = False,
    ):
        """The residual stream after the last block, before the final norm: ``[B, T, D]``
        (``(x, aux)`` with ``return_aux``). ``cu_seqlens`` as in :meth:`__call__`."""
        self._check_tokens(tokens)
        B, T = tokens.shape
        if cu_seqlens is not None:  # checked and derived once, for every layer
            cu_seqlens = packing.documents(cu_seqlens, B, T)
        x = self.embed(tokens)
        if self.config.scan_layers:
            x, aux = self._scan_blocks(x, cu_seqlens, return_aux)
            return (x, aux) if return_aux else x
        fwd = nnx.remat(_block_forward, static_argnums=(3,)) if self.config.remat else (
            _block_forward)
        aux = []
        for block in self.blocks:
            out = fwd(block, x, cu_seqlens, return_aux)
            if return_aux:
                x, a = out
                aux.append(a)
            else:
                x = out
        return (x, tuple(aux)) if return_aux else x

    def __call__(
        self,
        tokens: Tokens,
        *,
        cu_seqlens: RowOffsets | packing.Documents | None = None,
        return_aux: bool = False,
    ):
        """Logits ``[B, T, vocab]`` float32 (``(logits, aux)`` with ``return_aux``).

        ``cu_seqlens``: packed documents, per-row offsets ``[B, S + 1]`` (or ``[S + 1]`` with
        B == 1); nothing crosses a boundary.
        """
        out = self.hidden(tokens, cu_seqlens=cu_seqlens, return_aux=return_aux)
        if return_aux:
            return self._logits(out[0]), out[1]
        return self._logits(out)

    def loss(
        self,
        tokens: Tokens,
        targets: Int[Array, "B T"],
        mask: Float[Array, "B T"],
        *,
        cu_seqlens: RowOffsets | packing.Documents | None = None,
        chunk_tokens: int = LOSS_CHUNK_TOKENS,
        return_correct: bool = False,
    ):
        """The masked next-token cross-entropy, summed (not averaged) over ``B * T``, through
        :func:`chunked_cross_entropy`: never holds the ``[B, T, vocab]`` logits.

        Returns ``nll_sum`` (float32 scalar), or ``(nll_sum, correct_sum)`` with
        ``return_correct`` (the number of masked positions whose argmax is the target).
        Equals ``sum(mask * (logsumexp(logits) - logits[target]))`` of :meth:`__call__`'s
        logits, gradients included.
        """
        h = self.norm(self.hidden(tokens, cu_seqlens=cu_seqlens))
        return chunked_cross_entropy(h, self._head_weight(), targets, mask,
                                     compute_dtype=self.dtype, chunk_tokens=chunk_tokens,
                                     return_correct=return_correct)

    def _scan_blocks(self, x, cu_seqlens, return_aux: bool):
        """The stacked blocks as one ``lax.scan`` over layers; aux as a per-layer tuple."""
        graphdef, params = nnx.split(self.blocks)

        def body(x, p):
            out = nnx.merge(graphdef, p)(x, cu_seqlens=cu_seqlens, return_aux=return_aux)
            return out if return_aux else (out, None)

        if self.config.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        x, aux = jax.lax.scan(body, x, params)
        if return_aux:
            aux = tuple(jax.tree.map(lambda a, i=i: a[i], aux)
                        for i in range(self.config.num_hidden_layers))
        return x, aux

    # ------------------------------------------------------------------ decoding

    def init_cache(self, batch_size: int) -> ModelCache | LayerCache:
        """Zero decoding cache: a tuple of :class:`qdelta_jax.layers.LayerCache`, one per layer
        (with ``scan_layers``: one ``LayerCache`` of arrays with a leading ``[L]`` axis)."""
        _check_batch_size(batch_size)
        if self.config.scan_layers:
            # QDelta.init_cache reads only static sizes, so the stacked module gives one layer's.
            L = self.config.num_hidden_layers
            return jax.tree.map(lambda a: jnp.zeros((L,) + a.shape, a.dtype),
                                self.blocks.attn.init_cache(batch_size))
        return tuple(block.attn.init_cache(batch_size) for block in self.blocks)

    def step(
        self,
        tokens: Tokens,
        cache: ModelCache,
        *,
        mask: TokenMask | None = None,
    ) -> tuple[Logits, ModelCache]:
        """Continues decoding: logits for ``tokens`` given the cache, and the new cache.

        T > 1 runs the chunked op (prefill), T == 1 the one-token update (the fused Pallas
        kernel where the layers' ``decode_implementation()`` is ``"pallas"``, the GPU default).
        ``mask`` (False at left padding, or at rows that have finished) keeps those positions
        from touching the state and the conv caches. :func:`compiled_step` wraps this in one
        compiled program that donates the cache.

        Raises ValueError for a cache of another layer count or batch size, or a mask of
        another shape than ``tokens``.
        """
        self._check_tokens(tokens)
        B = tokens.shape[0]
        if mask is not None and tuple(mask.shape) != tuple(tokens.shape):
            raise ValueError(f"mask must have the shape of tokens {list(tokens.shape)}, got "
                             f"{list(mask.shape)}")
        if self.config.scan_layers:
            return self._scan_step(tokens, cache, mask)
        if not isinstance(cache, (tuple, list)) or len(cache) != len(self.blocks):
            n = len(cache) if isinstance(cache, (tuple, list)) else type(cache).__name__
            raise ValueError(f"cache has {n} layers, the model {len(self.blocks)} (a tuple of "
                             "LayerCache, as init_cache returns)")
        _check_cache_batch(LayerCache(*cache[0]).state.shape[0], B)
        x = self.embed(tokens)
        new = []
        for block, layer_cache in zip(self.blocks, cache, strict=True):
            x, c = block(x, cache=LayerCache(*layer_cache), mask=mask)
            new.append(c)
        return self._logits(x), tuple(new)

    def _scan_step(self, tokens, cache: LayerCache, mask):
        L = self.config.num_hidden_layers
        if not isinstance(cache, LayerCache) or cache.state.ndim != 5 or cache.state.shape[0] != L:
            raise ValueError(
                f"with scan_layers the cache is one LayerCache with a leading [{L}] axis (as "
                "init_cache returns)"
            )
        _check_cache_batch(cache.state.shape[1], tokens.shape[0])
        graphdef, params = nnx.split(self.blocks)

        def body(x, xs):
            p, layer_cache = xs
            return nnx.merge(graphdef, p)(x, cache=LayerCache(*layer_cache), mask=mask)

        x, new = jax.lax.scan(body, self.embed(tokens), (params, cache))
        return self._logits(x), LayerCache(*new)


def _check_cache_batch(cache_batch: int, batch: int) -> None:
    if cache_batch != batch:
        raise ValueError(f"the cache holds {cache_batch} sequences but tokens has batch size "
                         f"{batch}; make it with init_cache({batch})")


@partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _jit_step(graphdef, state, tokens, cache, mask):
    return nnx.merge(graphdef, state).step(tokens, cache, mask=mask)


def compiled_step(model: QDeltaLM):
    """``model.step`` as one compiled program (every layer, the embedding and the logits) whose
    cache argument is donated, so each layer's state is updated in place.

    Returns ``step(tokens [B, T], cache, mask=None) -> (logits [B, T, vocab], new_cache)``; the
    cache passed in must not be used again. The parameters are the model's at the time of the
    call (a later change to the model is not seen). One compilation per shape of ``tokens``."""
    graphdef, state = nnx.split(model)

    def step(tokens, cache, mask=None):
        return _jit_step(graphdef, state, jnp.asarray(tokens), cache,
                         None if mask is None else jnp.asarray(mask))

    return step


def check_token_ids(tokens, vocab_size: int, name: str = "tokens") -> None:
    """Raises ``ValueError`` when concrete ``tokens`` hold an id outside ``[0, vocab_size)``
    (an embedding lookup would silently clamp it or give NaN); traced tokens are not checked."""
    if isinstance(tokens, jax.core.Tracer):
        return
    t = np.asarray(tokens)
    if t.size == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= vocab_size:
        bad = np.argwhere((t < 0) | (t >= vocab_size))[0]
        raise ValueError(
            f"{name} must hold ids in [0, vocab_size = {vocab_size}), got "
            f"{int(t[tuple(bad)])} at index {bad.tolist()}"
        )


def _check_batch_size(batch_size) -> None:
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or (
            batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def to_scanned(model: QDeltaLM) -> QDeltaLM:
    """A ``scan_layers=True`` copy of an unrolled model with the same parameters (the blocks'
    parameters stacked on a leading layer axis); computes the same function."""
    if model.config.scan_layers:
        raise ValueError("the model already has scan_layers=True")
    c = dataclasses.replace(model.config, scan_layers=True)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: QDeltaLM(c, rngs=nnx.Rngs(0))))
    src = dict(nnx.to_flat_state(nnx.state(model)))
    flat = []
    for path, var in nnx.to_flat_state(abstract):
        if path[0] == "blocks":
            value = jnp.stack([src[("blocks", i, *path[1:])][...]
                               for i in range(c.num_hidden_layers)])
        else:
            value = src[path][...]
        flat.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
