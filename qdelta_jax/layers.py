"""The Q-Delta layer (docs/MATH.md section 4) as a Flax NNX module, its parts, and a Linen wrapper.

Shapes use the letters of :mod:`qdelta_jax.array_typing` (B batch, T time, D model width, H
query/key heads, HV value heads, K, V head dims, W conv width, E conv channels, S documents per
row).

One layer, from ``x [B, T, D]``::

    q, k, v = SiLU(ShortConv(W_q x)), SiLU(ShortConv(W_k x)), SiLU(ShortConv(W_v x))
    beta    = sigmoid(W_b x)                       (x2 with allow_neg_eigval)
    lam     = sigmoid(W_lam x - lam_bias)          (x2 with allow_neg_eigval; or fixed_lam)
    g       = -exp(A_log) * softplus(W_a x + dt_bias)      (0 with use_decay=False)
    o       = qdelta_rule(l2norm(q), l2norm(k), v, g, beta, lam)
    y       = W_o GatedRMSNorm(o, SiLU(W_g x))     (per head; plain RMSNorm without use_gate)

Training and decoding compute the same function: ``q`` and ``k`` are L2-normalised here, once,
and the op is called with ``normalize_qk=False``; the one-token decoding step uses
:func:`qdelta_jax.reference.qdelta_step` (the single copy of the update) and the short conv uses
the same code for every length, its cache holding the last ``W - 1`` inputs. Where
:meth:`QDelta.decode_implementation` is ``"pallas"`` (GPUs), the one-token step is instead one
kernel (:mod:`qdelta_jax.pallas.decode`) that computes the same conv, norms, gates and update,
tested against this code.

Packed documents: ``cu_seqlens [B, S + 1]`` gives per-row offsets (each row starts at 0, ends at
T, non-decreasing; pad by repeating T). They go to the op unchanged (chunks tile the rows, a
boundary may fall inside a chunk: no padding, see :mod:`qdelta_jax.packing`), and the conv masks
taps that would cross a boundary.

Padding for decoding: ``mask [B, T]`` (True = real token). At masked positions the conv input is
zero and ``beta = g = 0``, so the recurrent state and the conv cache are untouched by left
padding: a left-padded row computes exactly what the unpadded row computes.

Parameter names (what :func:`qdelta_jax.model.weight_decay_mask` keys on): ``A_log`` and
``dt_bias`` (no weight decay, docs/MATH.md section 4), norm weights are called ``scale``;
linear and conv weights are ``kernel``. There are no biases.

Logical axis names: every parameter carries Flax partitioning metadata (``nnx.with_partitioning``;
``nnx.get_partition_spec(nnx.state(layer))`` reads it), one name per dimension, which
:mod:`qdelta_jax.train.sharding` maps to mesh axes:

* ``"embed"`` D, ``"qk"`` H*K (q/k projections and their convs), ``"v"`` HV*V (v and gate
  projections, their conv, the output projection's input), ``"heads"`` HV (``b_proj``,
  ``lam_proj``, ``a_proj`` outputs, ``A_log``, ``dt_bias``), ``"conv"`` W, ``"norm"`` every norm
  weight; the model adds ``"vocab"``, ``"mlp"`` and, with ``scan_layers``, ``"layers"``.

The metadata is only names: values, shapes and the parameter tree are those of a layer without
it, so checkpoints do not change. Variables are not sharded when they are created
(``eager_sharding=False``): the names are not mesh axes, and building a layer needs no mesh.

``dtype=None`` (as in Flax's own layers): the computation runs in the dtype of the inputs
promoted with the parameters' (``jnp.result_type(x, param_dtype)``), so float32 parameters with
bfloat16 inputs compute in float32, exactly as ``nnx.Linear(dtype=None)`` does.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array

from qdelta_jax import ops, packing, reference
from qdelta_jax.array_typing import ConvCache, Hidden, RowOffsets, RowStates, TokenMask

F32 = jnp.float32

# With implementation=None, batches from this size on decode with XLA's step rather than the
# fused kernel (an explicit "pallas" always takes the kernel): on an H200
# (340m preset, bf16) the fused step took 1.885 vs 1.957 ms at batch 1 but 2.645 vs 2.255 ms at
# 16 and 13.1 vs 10.3 ms at 256 (its tiles are not tuned for large batches yet).
FUSED_DECODE_MAX_BATCH = 16


# ----------------------------------------------------------------------------- helpers


def _normal(std: float):
    return nnx.initializers.normal(stddev=std)


def partitioned(init, *names: str | None):
    """``init`` (an initializer ``(key, shape, dtype) -> array``, or any function returning a
    value) whose :class:`nnx.Param` carries the logical axis names ``names``, one per dimension
    (``nnx.with_partitioning``; see the module docstring). Not sharded on creation
    (``eager_sharding=False``), so it needs no mesh."""
    return nnx.with_partitioning(init, names, eager_sharding=False)


def _param(value, *names: str | None) -> nnx.Param:
    """An :class:`nnx.Param` holding ``value`` with logical axis names (see :func:`partitioned`)."""
    if len(names) != jnp.ndim(value):
        raise ValueError(f"{len(names)} axis names {names} for a value of shape {jnp.shape(value)}")
    return nnx.Param(partitioned(lambda: value, *names)())


# ----------------------------------------------------------------------------- parts


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, computed in float32; weight ``scale`` initialised to 1."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=F32,
                 rngs: nnx.Rngs | None = None):
        del rngs
        self.eps = eps
        self.scale = _param(jnp.ones((dim,), param_dtype), "norm")

    def __call__(self, x: Array) -> Array:
        xf = x.astype(F32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(F32)).astype(x.dtype)


class GatedRMSNorm(nnx.Module):
    """Per-head RMSNorm of ``x`` times ``SiLU(gate)``: ``rmsnorm(x) * scale * silu(gate)``.

    ``x``, ``gate``: ``[..., V]`` (the norm runs over the head's V channels, one weight ``[V]``
    shared by all heads). Computed in float32, returned in ``x``'s dtype.
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=F32,
                 rngs: nnx.Rngs | None = None):
        del rngs
        self.eps = eps
        self.scale = _param(jnp.ones((dim,), param_dtype), "norm")

    def __call__(self, x: Array, gate: Array) -> Array:
        xf = x.astype(F32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        y = y * self.scale[...].astype(F32) * jax.nn.silu(gate.astype(F32))
        return y.astype(x.dtype)


class ShortConv(nnx.Module):
    """Causal depthwise conv over time, width W, no bias (activation applied by the caller).

    ``y[t] = sum_i kernel[i] * x[t - (W - 1) + i]`` (PyTorch's causal ``Conv1d`` convention).

    ``__call__(x [B, T, E], cache [B, W-1, E] | None, *, starts=None, mask=None)`` returns
    ``(y [B, T, E], new_cache [B, W-1, E])``. ``cache`` holds the inputs preceding ``x`` (zeros
    at the start of a sequence); the same code serves training (no cache), prefill and one-token
    steps; ``new_cache`` keeps the dtype of ``cache``. ``starts [B, T]``: the position where
    each token's document starts; taps reaching before it are dropped, so packed documents do
    not mix. ``mask [B, T]``: False positions contribute a zero input (left padding).

    ``dtype``: compute dtype, ``None`` for the input's. ``channel_axis``: the logical name of the
    channel axis of ``kernel [W, E]`` (``"qk"`` or ``"v"`` in the layer).
    """

    def __init__(self, channels: int, width: int = 4, *, std: float = 0.02, dtype=F32,
                 param_dtype=F32, channel_axis: str = "qk", rngs: nnx.Rngs):
        self.width = width
        self.channels = channels
        self.dtype = None if dtype is None else jnp.dtype(dtype)
        self.param_dtype = jnp.dtype(param_dtype)
        init = partitioned(_normal(std), "conv", channel_axis)
        self.kernel = nnx.Param(init(rngs.params(), (width, channels), param_dtype))

    def init_cache(self, batch_size: int, dtype=None) -> ConvCache:
        """Zero cache in ``dtype`` (default: the compute dtype, else ``param_dtype``)."""
        if dtype is None:
            dtype = self.param_dtype if self.dtype is None else self.dtype
        return jnp.zeros((batch_size, self.width - 1, self.channels), dtype)

    def __call__(self, x, cache=None, *, starts=None, mask=None):
        B, T, E = x.shape
        Wm1 = self.width - 1
        if self.dtype is not None:
            x = x.astype(self.dtype)
        cache_dtype = None if cache is None else cache.dtype
        if mask is not None:
            x = jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))
        if cache is None:
            cache = jnp.zeros((B, Wm1, E), x.dtype)
        elif starts is not None:
            raise ValueError("ShortConv: a cache and document starts cannot be combined")
        xc = jnp.concatenate([cache.astype(x.dtype), x], axis=1)  # [B, W - 1 + T, E]
        w = self.kernel[...].astype(F32)
        t = jnp.arange(T)
        y = jnp.zeros((B, T, E), F32)
        for i in range(self.width):
            lag = Wm1 - i  # tap i reads x[t - lag]
            tap = xc[:, i : i + T].astype(F32)
            if starts is not None:
                tap = jnp.where((t - lag >= starts)[..., None], tap, 0.0)
            y = y + w[i] * tap
        new_cache = xc[:, T:] if Wm1 > 0 else xc[:, :0]
        if cache_dtype is not None:  # a decoding loop's carry keeps its dtype
            new_cache = new_cache.astype(cache_dtype)
        return y.astype(x.dtype), new_cache


# ----------------------------------------------------------------------------- the layer


class LayerCache(NamedTuple):
    """Decoding cache of one layer: the recurrent state and the short-conv inputs.

    ``state [B, HV, K, V]`` float32; ``conv_q``, ``conv_k`` ``[B, W-1, H*K]``, ``conv_v``
    ``[B, W-1, HV*V]`` in the compute dtype (``None`` without the short conv).
    """

    state: RowStates
    conv_q: Array | None
    conv_k: Array | None
    conv_v: Array | None


class QDelta(nnx.Module):
    """The Q-Delta token mixer (docs/MATH.md section 4).

    Args:
      hidden_size: D. num_heads: H (query/key heads). head_dim: K.
      expand_v: V = expand_v * K (must be an integer).
      num_v_heads: HV value heads, a multiple of H (``None``: H); each q/k head serves the
        HV / H value heads of its group (value head j reads head j // (HV / H)); the op takes
        the heads grouped.
      use_gate: output gate ``SiLU(W_g x)`` in the output norm. use_short_conv / conv_size: the
        causal depthwise conv on q, k, v (width W).
      allow_neg_eigval: double beta and lam (range (0, 2)).
      lam_bias: ``lam = sigmoid(W_lam x - lam_bias)``.
      fixed_lam: ``None`` learns lam; a number fixes lam to that constant (no ``lam_proj``);
        0.0 gives exactly Gated DeltaNet.
      use_decay: ``False`` forces ``g = 0`` (no ``a_proj``, ``A_log``, ``dt_bias``); with
        ``fixed_lam=0.0`` that is DeltaNet.
      norm_eps: eps of the output norm. chunk_size, implementation: passed to ``qdelta_rule``.
      save_residuals: the Pallas kernels' ``save_residuals`` (``qdelta_rule``'s ``config``):
        ``False`` recomputes the forward's per-chunk residuals in the backward (less memory,
        slower); ``None`` leaves the kernels' default (on unless ``QDELTA_SAVE_RESIDUALS=0``).
      guard_nonfinite: passed to ``qdelta_rule``: a NaN or inf spoils exactly what the
        recurrence spoils (off by default for its cost; see there).
      initializer_range: std of the normal init of every linear and conv kernel.
      dtype: compute dtype (float32 or bfloat16), or ``None``: the inputs' dtype promoted with
        ``param_dtype``, as Flax's layers infer it. param_dtype: parameter dtype.

    Parameters: ``q_proj, k_proj, v_proj, b_proj, [lam_proj], [a_proj, A_log, dt_bias],
    [q_conv1d, k_conv1d, v_conv1d], [g_proj], o_norm, o_proj``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        *,
        expand_v: float = 2.0,
        num_v_heads: int | None = None,
        use_gate: bool = True,
        use_short_conv: bool = True,
        conv_size: int = 4,
        allow_neg_eigval: bool = False,
        lam_bias: float = 0.9,
        fixed_lam: float | None = None,
        use_decay: bool = True,
        norm_eps: float = 1e-6,
        chunk_size: int = 64,
        implementation: str | None = None,
        save_residuals: bool | None = None,
        guard_nonfinite: bool = False,
        initializer_range: float = 0.02,
        dtype=F32,
        param_dtype=F32,
        rngs: nnx.Rngs,
    ):
        for name, val in (("hidden_size", hidden_size), ("num_heads", num_heads),
                          ("head_dim", head_dim), ("conv_size", conv_size),
                          ("num_v_heads", 1 if num_v_heads is None else num_v_heads)):
            if not isinstance(val, numbers.Integral) or isinstance(val, bool) or val < 1:
                raise ValueError(f"QDelta: {name} must be a positive integer, got {val!r}")
        if not isinstance(chunk_size, numbers.Integral) or chunk_size < 1 or (
                chunk_size & (chunk_size - 1)):
            raise ValueError(f"QDelta: chunk_size must be a power of two, got {chunk_size!r}")
        if not (isinstance(norm_eps, (int, float)) and norm_eps > 0):
            raise ValueError(f"QDelta: norm_eps must be a positive number, got {norm_eps!r}")
        num_v_heads = num_heads if num_v_heads is None else num_v_heads
        value_dim = expand_v * head_dim
        if value_dim != int(value_dim) or value_dim <= 0:
            raise ValueError(
                f"expand_v * head_dim must be a positive integer, got {expand_v} * {head_dim}"
            )
        if num_v_heads % num_heads:
            raise ValueError(
                f"num_v_heads ({num_v_heads}) must be a multiple of num_heads ({num_heads})"
            )
        if implementation is not None and implementation not in ops.IMPLEMENTATIONS:
            raise ValueError(
                f"implementation must be one of {ops.IMPLEMENTATIONS} or None, got "
                f"{implementation!r}"
            )
        if save_residuals is not None and not isinstance(save_residuals, bool):
            raise ValueError(f"QDelta: save_residuals must be True, False or None, got "
                             f"{save_residuals!r}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_v_heads = num_v_heads
        self.head_dim = head_dim
        self.head_v_dim = int(value_dim)
        self.use_gate = use_gate
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size
        self.allow_neg_eigval = allow_neg_eigval
        self.lam_bias = float(lam_bias)
        self.fixed_lam = None if fixed_lam is None else float(fixed_lam)
        self.use_decay = use_decay
        self.chunk_size = chunk_size
        self.implementation = implementation
        self.save_residuals = save_residuals
        if not isinstance(guard_nonfinite, bool):
            raise ValueError(f"QDelta: guard_nonfinite must be True or False, got "
                             f"{guard_nonfinite!r}")
        self.guard_nonfinite = guard_nonfinite
        self.dtype = None if dtype is None else jnp.dtype(dtype)
        self.param_dtype = jnp.dtype(param_dtype)

        D, H, HV, K, V = hidden_size, num_heads, num_v_heads, head_dim, self.head_v_dim
        init = _normal(initializer_range)

        def linear(n_in, n_out, names):
            return nnx.Linear(n_in, n_out, use_bias=False, kernel_init=partitioned(init, *names),
                              dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.q_proj = linear(D, H * K, ("embed", "qk"))
        self.k_proj = linear(D, H * K, ("embed", "qk"))
        self.v_proj = linear(D, HV * V, ("embed", "v"))
        self.b_proj = linear(D, HV, ("embed", "heads"))
        self.lam_proj = linear(D, HV, ("embed", "heads")) if self.fixed_lam is None else None
        if use_decay:
            self.a_proj = linear(D, HV, ("embed", "heads"))
            # docs/MATH.md section 4: A ~ U(0, 16), A_log = log A (A clipped away from 0, a
            # measure-zero event, so the log stays finite); dt = exp(U(log 1e-3, log 1e-1))
            # floored at 1e-4, dt_bias = inverse softplus(dt).
            A = jax.random.uniform(rngs.params(), (HV,), F32, 0.0, 16.0)
            self.A_log = _param(jnp.log(jnp.maximum(A, 1e-12)).astype(param_dtype), "heads")
            u = jax.random.uniform(rngs.params(), (HV,), F32)
            dt = jnp.exp(u * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3))
            dt = jnp.maximum(dt, 1e-4)
            self.dt_bias = _param((dt + jnp.log(-jnp.expm1(-dt))).astype(param_dtype), "heads")
        else:
            self.a_proj = self.A_log = self.dt_bias = None
        if use_short_conv:
            def conv(c, name):
                return ShortConv(c, conv_size, std=initializer_range, dtype=dtype,
                                 param_dtype=param_dtype, channel_axis=name, rngs=rngs)

            self.q_conv1d, self.k_conv1d = conv(H * K, "qk"), conv(H * K, "qk")
            self.v_conv1d = conv(HV * V, "v")
        else:
            self.q_conv1d = self.k_conv1d = self.v_conv1d = None
        if use_gate:
            self.g_proj = linear(D, HV * V, ("embed", "v"))
            self.o_norm = GatedRMSNorm(V, eps=norm_eps, param_dtype=param_dtype)
        else:
            self.g_proj = None
            self.o_norm = RMSNorm(V, eps=norm_eps, param_dtype=param_dtype)
        self.o_proj = linear(HV * V, D, ("v", "embed"))

    # ------------------------------------------------------------------ pieces

    def init_cache(self, batch_size: int, dtype=None) -> LayerCache:
        """Zero state and conv caches for ``batch_size`` sequences; the conv caches in ``dtype``
        (default: the compute dtype; ``param_dtype`` where that is ``None``)."""
        if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or (
                batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        state = jnp.zeros((batch_size, self.num_v_heads, self.head_dim, self.head_v_dim), F32)
        if not self.use_short_conv:
            return LayerCache(state, None, None, None)
        return LayerCache(state, self.q_conv1d.init_cache(batch_size, dtype),
                          self.k_conv1d.init_cache(batch_size, dtype),
                          self.v_conv1d.init_cache(batch_size, dtype))

    def _gates(self, x, mask):
        """beta, lam, g ``[B, T, HV]`` float32."""
        beta = jax.nn.sigmoid(self.b_proj(x).astype(F32))
        if self.fixed_lam is None:
            lam = jax.nn.sigmoid(self.lam_proj(x).astype(F32) - self.lam_bias)
        else:
            lam = jnp.full(beta.shape, self.fixed_lam, F32)
        if self.allow_neg_eigval:
            beta = beta * 2.0
            if self.fixed_lam is None:
                lam = lam * 2.0
        if self.use_decay:
            a = self.a_proj(x).astype(F32) + self.dt_bias[...].astype(F32)
            g = -jnp.exp(self.A_log[...].astype(F32)) * jax.nn.softplus(a)
        else:
            g = jnp.zeros_like(beta)
        if mask is not None:
            # Padded positions must not touch the state: no write, no decay.
            beta = jnp.where(mask[..., None], beta, 0.0)
            g = jnp.where(mask[..., None], g, 0.0)
        return beta, lam, g

    def _qkv(self, x, cache, starts, mask):
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        conv_caches = (None, None, None)
        if self.use_short_conv:
            cq, ck, cv = (None, None, None) if cache is None else cache[1:]
            q, cq = self.q_conv1d(q, cq, starts=starts, mask=mask)
            k, ck = self.k_conv1d(k, ck, starts=starts, mask=mask)
            v, cv = self.v_conv1d(v, cv, starts=starts, mask=mask)
            conv_caches = (cq, ck, cv)
        q, k, v = jax.nn.silu(q), jax.nn.silu(k), jax.nn.silu(v)
        H, HV, K, V = self.num_heads, self.num_v_heads, self.head_dim, self.head_v_dim
        q = q.reshape(B, T, H, K)
        k = k.reshape(B, T, H, K)
        v = v.reshape(B, T, HV, V)
        # Normalise once, here, for every path (the op is called with normalize_qk=False).
        q = reference.l2_normalize(q).astype(x.dtype)
        k = reference.l2_normalize(k).astype(x.dtype)
        return q, k, v.astype(x.dtype), conv_caches

    def _per_value_head(self, a: Array) -> Array:
        """q or k ``[..., H, K]`` repeated to ``[..., HV, K]``: value head j reads head j // G
        (what the op does inside with grouped value heads)."""
        G = self.num_v_heads // self.num_heads
        return a if G == 1 else jnp.repeat(a, G, axis=-2)

    def _rule(self, q, k, v, g, beta, lam, *, docs, initial_state, output_final_state):
        kw = dict(scale=self.head_dim**-0.5, normalize_qk=False, chunk_size=self.chunk_size,
                  implementation=self.implementation, guard_nonfinite=self.guard_nonfinite)
        if self.save_residuals is not None:
            from qdelta_jax.pallas.config import Config

            kw["config"] = Config(save_residuals=self.save_residuals)
        # The documents go to the op as they are: it owns packing and the split over a mesh.
        return ops.qdelta_rule(q, k, v, g, beta, lam, initial_state=initial_state,
                               output_final_state=output_final_state, cu_seqlens=docs, **kw)

    # ------------------------------------------------------------------ call

    def __call__(
        self,
        x: Hidden,
        *,
        cu_seqlens: RowOffsets | packing.Documents | None = None,
        cache: LayerCache | None = None,
        mask: TokenMask | None = None,
        return_aux: bool = False,
    ):
        """Applies the layer.

        Args:
          x: ``[B, T, D]``.
          cu_seqlens: packed-document offsets ``[B, S + 1]`` (or ``[S + 1]`` with B == 1), or
            their :class:`qdelta_jax.packing.Documents` (not checked again); the state and the
            conv restart at each offset. Not with ``cache``.
          cache: a :class:`LayerCache` (``init_cache``) to continue from; T == 1 runs the
            one-token update (the fused kernel of :mod:`qdelta_jax.pallas.decode` where
            :meth:`decode_implementation` is ``"pallas"``, else
            :func:`qdelta_jax.reference.qdelta_step`), T > 1 the chunked op with the cached
            state as ``initial_state``.
          mask: ``[B, T]`` bool, False at padding (the state and conv ignore those positions;
            a masked one-token step leaves the whole cache as it was).
          return_aux: also return ``dict(q, k, beta, lam, g)`` (normalised q, k
            ``[B, T, HV, K]``; gates ``[B, T, HV]`` float32) for diagnostics.

        Returns:
          ``y [B, T, D]`` without a cache, ``(y, new_cache)`` with one; with ``return_aux`` an
          extra trailing ``aux`` element (``(y, aux)`` or ``(y, new_cache, aux)``).
        """
        if x.ndim != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must have shape [B, T, {self.hidden_size}], got {list(x.shape)}")
        B, T, _ = x.shape
        if cu_seqlens is not None and cache is not None:
            raise ValueError("cu_seqlens (packed training) and cache (decoding) cannot be combined")
        if mask is not None and tuple(mask.shape) != (B, T):
            raise ValueError(f"mask must have shape [B, T] = [{B}, {T}], got {list(mask.shape)}")
        docs = None if cu_seqlens is None else packing.documents(cu_seqlens, B, T)
        # dtype=None: the inputs' dtype promoted with the parameters', as Flax's layers infer it.
        x = x.astype(jnp.result_type(x.dtype, self.param_dtype) if self.dtype is None
                     else self.dtype)
        if (cache is not None and T == 1 and not return_aux
                and self.decode_implementation(B) == "pallas"):
            o, new_cache = self._fused_step(x, cache, mask)
        else:
            o, new_cache, aux = self._mix(x, cache, docs, mask)
        if self.use_gate:
            gate = self.g_proj(x).reshape(B, T, self.num_v_heads, self.head_v_dim)
            o = self.o_norm(o, gate)
        else:
            o = self.o_norm(o)
        y = self.o_proj(o.reshape(B, T, self.num_v_heads * self.head_v_dim))

        out = (y,) if cache is None else (y, new_cache)
        if return_aux:
            out = out + (aux,)
        return out[0] if len(out) == 1 else out

    def _mix(self, x, cache, docs, mask):
        """The token mixing in plain XLA: ``(o [B, T, HV, V], new_cache, aux)``."""
        starts = None if docs is None else docs.starts
        q, k, v, conv_caches = self._qkv(x, cache, starts, mask)  # q, k: [B, T, H, K]
        beta, lam, g = self._gates(x, mask)
        # The op repeats q, k over grouped value heads itself; aux shows them per value head.
        aux = dict(q=self._per_value_head(q), k=self._per_value_head(k), beta=beta, lam=lam, g=g)
        if cache is None:
            o, _ = self._rule(q, k, v, g, beta, lam, docs=docs, initial_state=None,
                              output_final_state=False)
            return o, None, aux
        if x.shape[1] == 1:
            o, state = reference.qdelta_step(
                aux["q"][:, 0], aux["k"][:, 0], v[:, 0], g[:, 0], beta[:, 0], lam[:, 0],
                scale=self.head_dim**-0.5, state=cache.state)
            if mask is not None and self.use_short_conv:
                # A masked token leaves the conv cache as it was (its state update is already
                # the identity: beta = g = 0), so finished rows of a batch stay frozen.
                keep = mask[:, :1, None]
                conv_caches = tuple(jnp.where(keep, new, old)
                                    for new, old in zip(conv_caches, cache[1:], strict=True))
            return o[:, None].astype(v.dtype), LayerCache(state, *conv_caches), aux
        o, state = self._rule(q, k, v, g, beta, lam, docs=None, initial_state=cache.state,
                              output_final_state=True)
        return o, LayerCache(state, *conv_caches), aux

    def decode_implementation(self, batch_size: int | None = None) -> str:
        """What runs a one-token decoding step of ``batch_size`` rows: ``"pallas"`` (the fused
        kernel of :mod:`qdelta_jax.pallas.decode`) when ``implementation`` is a pallas one, and
        with ``implementation=None`` on a GPU for batches below :data:`FUSED_DECODE_MAX_BATCH`;
        otherwise ``"xla"`` (:func:`qdelta_jax.reference.qdelta_step` in plain XLA)."""
        if self.implementation is not None:
            return "pallas" if self.implementation.startswith("pallas") else "xla"
        if jax.default_backend() != "gpu":
            return "xla"
        if batch_size is not None and batch_size >= FUSED_DECODE_MAX_BATCH:
            return "xla"
        return "pallas"

    def _fused_step(self, x, cache, mask):
        """One token through the fused decode kernel: ``(o [B, 1, HV, V], new_cache)``."""
        from qdelta_jax.pallas import decode as pallas_decode

        B = x.shape[0]
        x0 = x[:, 0]
        q, k, v = self.q_proj(x0), self.k_proj(x0), self.v_proj(x0)
        # The gate projections ([D, HV] each) as one matmul: one small launch instead of three,
        # their weights concatenated per step (a few KB; the parameters keep their layout).
        small = [self.b_proj]
        small += [self.lam_proj] if self.fixed_lam is None else []
        small += [self.a_proj] if self.use_decay else []
        w = jnp.concatenate([p.kernel[...].astype(x.dtype) for p in small], axis=1)
        gl = jnp.split(jnp.dot(x0, w), len(small), axis=1)
        b_lin = gl.pop(0)
        lam_lin = gl.pop(0) if self.fixed_lam is None else None
        a_lin = gl.pop(0) if self.use_decay else None
        conv = None
        if self.use_short_conv:
            conv = LayerCache(*cache)[1:]
            weights = pallas_decode.LayerWeights(
                self.q_conv1d.kernel[...], self.k_conv1d.kernel[...], self.v_conv1d.kernel[...],
                None, None)
        else:
            weights = pallas_decode.LayerWeights(None, None, None, None, None)
        if self.use_decay:
            weights = weights._replace(A_log=self.A_log[...], dt_bias=self.dt_bias[...])
        gates = pallas_decode.Gates(self.lam_bias, self.fixed_lam, self.allow_neg_eigval,
                                    self.use_decay)
        o, state, conv = pallas_decode.fused_step(
            q, k, v, b_lin, lam_lin, a_lin, cache.state, conv, weights,
            None if mask is None else mask.reshape(B),
            num_heads=self.num_heads, scale=self.head_dim**-0.5, gates=gates)
        conv = (None, None, None) if conv is None else conv
        return o[:, None], LayerCache(state, *conv)


# ----------------------------------------------------------------------------- from attention


def qdelta_like(attn: nnx.MultiHeadAttention, *, rngs: nnx.Rngs, **options) -> QDelta:
    """A fresh :class:`QDelta` with the sizes and dtypes of a self-attention layer (the recipe of
    docs/FLAX.md): ``hidden_size = in_features``, ``num_heads``, ``head_dim = qkv_features //
    num_heads``, ``dtype`` and ``param_dtype``; ``options`` are further :class:`QDelta`
    arguments (``expand_v``, ``num_v_heads``, ...) and override these. The weights are new
    (attention's do not carry over); biases, dropout and the attention's initializers have no
    counterpart. Raises ``ValueError`` when ``out_features != in_features`` (the layer maps D to
    D) and ``TypeError`` for anything but an ``nnx.MultiHeadAttention``."""
    if not isinstance(attn, nnx.MultiHeadAttention):
        raise TypeError(f"attn must be an nnx.MultiHeadAttention, got {type(attn).__name__}")
    if attn.out_features != attn.in_features:
        raise ValueError(
            f"attn.out_features ({attn.out_features}) must equal attn.in_features "
            f"({attn.in_features}): QDelta maps hidden_size to hidden_size"
        )
    kw = dict(hidden_size=attn.in_features, num_heads=attn.num_heads, head_dim=attn.head_dim,
              dtype=attn.dtype, param_dtype=attn.param_dtype)
    kw.update(options)
    return QDelta(rngs=rngs, **kw)


def replace_attention(model: nnx.Module, *, rngs: nnx.Rngs, **options) -> list[tuple]:
    """Replaces, in place, every ``nnx.MultiHeadAttention`` inside ``model`` by
    :func:`qdelta_like` of it (``options`` as there) and returns the paths replaced. The call
    sites must change too: ``attn(x, mask=causal_mask)`` becomes ``attn(x)`` (docs/FLAX.md)."""
    found = [(path, node) for path, node in nnx.iter_graph(model)
             if isinstance(node, nnx.MultiHeadAttention)]
    for path, node in found:
        if not path:
            raise ValueError("model is itself an nnx.MultiHeadAttention; use qdelta_like")
        parent = model
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        new = qdelta_like(node, rngs=rngs, **options)
        if isinstance(path[-1], int):
            parent[path[-1]] = new
        else:
            setattr(parent, path[-1], new)
    return [path for path, _ in found]


# ----------------------------------------------------------------------------- Linen interop


def qdelta_linen(hidden_size: int, num_heads: int, head_dim: int, *, name: str | None = None,
                 **kwargs):
    """The :class:`QDelta` layer as a Linen module, through Flax's NNX-Linen bridge.

    ``qdelta_linen(D, H, K, **options)`` returns a ``flax.linen.Module``; use it inside a Linen
    model (``@nn.compact``) like any Linen layer. Its parameters live in the ``params``
    collection under the same names as the NNX layer (``A_log``, ``dt_bias`` included), boxed
    with their logical axis names as Linen's partitioned parameters are (``nn.unbox`` gives
    the arrays, ``nn.get_partition_spec`` the names). Call it as ``layer(x)`` or
    ``layer(x, cu_seqlens=...)``.
    """
    return nnx.bridge.to_linen(QDelta, hidden_size, num_heads, head_dim, name=name, **kwargs)
