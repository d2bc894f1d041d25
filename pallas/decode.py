"""The Q-Delta layer's one-token decoding step as one Pallas kernel (Triton lowering).

Why this exists: a decoding step is memory bound. Per layer and sequence it must read and write
the float32 state ``[HV, K, V]`` once; written as plain ``jnp`` (``reference.qdelta_step`` after
the layer's conv and gate code) the state crosses HBM several times (decay, prediction, write,
read-out) in about 25 small kernels. Here one program per (batch row, value head, V tile) loads
its ``[K, BV]`` slice of the state, does everything in registers and stores it once:

    conv:   y = sum_i w[i] * [cache, x][i]            (causal depthwise, width W), then SiLU
    norm:   q, k = q / |q|, k / |k|                     (over K; eps 1e-6 inside the root)
    gates:  beta = sigmoid(b) (x2 with allow_neg_eigval), lam = sigmoid(l - lam_bias) (x2),
            g = -exp(A_log) softplus(a + dt_bias)       (fixed_lam / use_decay=False as the layer)
    step:   x = k + lam q;  S = exp(g) S;  e = v - S^T x;  S = S + beta k e^T;  o = scale S^T q

It computes exactly :func:`qdelta_jax.reference.qdelta_step` after the conv and gate math of
:class:`qdelta_jax.layers.QDelta`, with the same roundings to the compute dtype (the conv output,
SiLU output and normalised q, k are rounded to it before the update, as the layer rounds them).

What stays outside: the projections (XLA matmuls; they read the weights, the other big cost of
a step) and the gated output RMSNorm, which needs all V channels of a head while a program holds
one V tile (tiling V is what keeps the ``[K, BV]`` state slice in registers at K = 128 or 256).

Grouped value heads: value head ``hv`` reads q/k head ``hv // (HV / H)``; each q/k head's conv
output is recomputed by the programs of its group (K numbers, cheap), and its conv cache is
written by the group's first program only. The conv caches are written to fresh buffers (every
slice by exactly one program), because programs of a group read a q/k cache slice that the
first of them writes: updating it in place would race. The state is updated in place
(``input_output_aliases``; each slice belongs to one program).

Masked rows (``mask[b]`` False): the state and the conv caches are left as they were (the
read-out ``o`` is that of the unchanged state with a zero conv input, what the layer's masked
step computes).

Numerics: everything after the loads is float32; the vector-matrix products are float32 sums
over K in registers (no tensor-core dot: one token gives a [1, K] operand, below the Triton
dot's 16 rows). Head sizes that are not powers of two are zero-padded (exact: zero channels add
nothing to any sum, and the padded rows / columns of the state stay zero), at the price of a
padded copy of the state per step; the shipped presets need none.

Backend: ``interpret=True`` (the default off the GPU, as for the chunked kernels) runs the same
kernel in Pallas interpret mode, which is how the CPU tests check it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Bool, Float

from qdelta_jax.pallas import _util as u
from qdelta_jax.pallas.config import padded_size

F32 = jnp.float32
L2_EPS = 1e-6  # as qdelta_jax.reference.l2_normalize


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Launch shape of the decode kernel: ``block_v`` (V tile of one program; ``None``: the
    default, 32 or V if smaller) and ``num_warps`` (``None``: 4 for tiles of 4096 or more
    elements, else 2)."""

    block_v: int | None = None
    num_warps: int | None = None

    def resolve(self, K: int, V: int) -> tuple[int, int]:
        bv = self.block_v or min(V, 32)
        if bv < 1 or bv & (bv - 1) or V % bv:
            raise ValueError(
                f"DecodeConfig.block_v must be a power of two dividing the padded V = {V}, got "
                f"{self.block_v}"
            )
        warps = self.num_warps or (4 if K * bv >= 4096 else 2)
        return bv, warps


class LayerWeights(NamedTuple):
    """The per-layer parameters the kernel reads (beside the projections run outside).

    ``conv_q, conv_k [W, H*K]``, ``conv_v [W, HV*V]`` (``None`` without the short conv),
    ``A_log, dt_bias [HV]`` (``None`` without decay)."""

    conv_q: Array | None
    conv_k: Array | None
    conv_v: Array | None
    A_log: Array | None
    dt_bias: Array | None


class Gates(NamedTuple):
    """The static gate options of the layer (see :class:`qdelta_jax.layers.QDelta`)."""

    lam_bias: float
    fixed_lam: float | None
    allow_neg_eigval: bool
    use_decay: bool


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def _softplus(x):
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _kernel(*refs, G, W, BV, dt, scale, gates: Gates, has_conv: bool):
    refs = list(refs)
    take = lambda n=1: [refs.pop(0) for _ in range(n)]  # noqa: E731
    q_ref, k_ref, v_ref, bl_ref = take(4)
    lam_ref = take()[0] if gates.fixed_lam is None else None
    a_ref, alog_ref, dtb_ref = take(3) if gates.use_decay else (None, None, None)
    s_ref, m_ref = take(2)
    if has_conv:
        cq_ref, ck_ref, cv_ref, wq_ref, wk_ref, wv_ref = take(6)
    o_ref, s_out = take(2)
    if has_conv:
        cq_out, ck_out, cv_out = take(3)

    b, hv, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    h = lax.div(hv, G)  # program ids are non-negative: truncating division is floor division
    keep = m_ref[b] != 0
    vs = pl.ds(j * BV, BV)
    Wm1 = W - 1

    def conv_silu(x_ref, c_ref, w_ref, head, sl, c_out, write):
        """SiLU(conv) of one head's channels ``sl``; writes the shifted cache when ``write``."""
        x = x_ref[b, head, sl]
        if has_conv:  # a masked token is a zero conv input (ShortConv's mask)
            x = jnp.where(keep, x.astype(F32), 0.0).astype(dt)
            hist = [c_ref[b, i, head, sl] for i in range(Wm1)]
            taps = hist + [x]
            y = w_ref[0, head, sl].astype(F32) * taps[0].astype(F32)
            for i in range(1, W):
                y = y + w_ref[i, head, sl].astype(F32) * taps[i].astype(F32)
            x = y.astype(dt)

            @pl.when(write)
            def _():
                new = taps[1:]
                for i in range(Wm1):
                    c_out[b, i, head, sl] = jnp.where(keep, new[i], hist[i]).astype(c_out.dtype)

        xf = x.astype(F32)
        return (xf * _sigmoid(xf)).astype(dt).astype(F32)

    first = (lax.rem(hv, G) == 0) & (j == 0)
    K = q_ref.shape[-1]
    ks = pl.ds(0, K)
    cq, ck, cv = (cq_ref, ck_ref, cv_ref) if has_conv else (None, None, None)
    wq, wk, wv = (wq_ref, wk_ref, wv_ref) if has_conv else (None, None, None)
    cqo, cko, cvo = (cq_out, ck_out, cv_out) if has_conv else (None, None, None)
    q = conv_silu(q_ref, cq, wq, h, ks, cqo, first)
    k = conv_silu(k_ref, ck, wk, h, ks, cko, first)
    v = conv_silu(v_ref, cv, wv, hv, vs, cvo, True)
    q = (q * lax.rsqrt(jnp.sum(q * q) + L2_EPS)).astype(dt).astype(F32)
    k = (k * lax.rsqrt(jnp.sum(k * k) + L2_EPS)).astype(dt).astype(F32)

    beta = _sigmoid(bl_ref[b, hv].astype(F32))
    if gates.fixed_lam is None:
        lam = _sigmoid(lam_ref[b, hv].astype(F32) - gates.lam_bias)
    else:
        lam = jnp.float32(gates.fixed_lam)
    if gates.allow_neg_eigval:
        beta = beta * 2.0
        if gates.fixed_lam is None:
            lam = lam * 2.0
    if gates.use_decay:
        a = a_ref[b, hv].astype(F32) + dtb_ref[hv].astype(F32)
        g = -jnp.exp(alog_ref[hv].astype(F32)) * _softplus(a)
    else:
        g = jnp.float32(0.0)
    # A masked row neither writes nor decays (as the layer's masked step): S stays as it is.
    beta = jnp.where(keep, beta, 0.0)
    g = jnp.where(keep, g, 0.0)

    x = k + lam * q
    s = jnp.exp(g) * s_ref[...]  # [K, BV]
    err = v - jnp.sum(s * x[:, None], axis=0)
    s = s + (beta * k)[:, None] * err[None, :]
    o_ref[...] = (scale * jnp.sum(s * q[:, None], axis=0)).astype(o_ref.dtype)

    @pl.when(keep)
    def _():
        s_out[...] = s


def _pad_axis(x, axis: int, n: int):
    if x is None or x.shape[axis] == n:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, pad)


def fused_step(
    q: Float[Array, "B H*K"],
    k: Float[Array, "B H*K"],
    v: Float[Array, "B HV*V"],
    b: Float[Array, "B HV"],
    lam: Float[Array, "B HV"] | None,
    a: Float[Array, "B HV"] | None,
    state: Float[Array, "B HV K V"],
    conv_cache: tuple[Array, Array, Array] | None,
    weights: LayerWeights,
    mask: Bool[Array, " B"] | None,
    *,
    num_heads: int,
    scale: float,
    gates: Gates,
    config: DecodeConfig | None = None,
    interpret: bool | None = None,
):
    """One decoding token of a Q-Delta layer, from its projections to the recurrent read-out.

    Args:
      q, k: ``[B, H*K]`` and v ``[B, HV*V]``: the token's q/k/v projections (before the conv),
        in the compute dtype (float32 or bfloat16, which the kernel rounds to as the layer does).
      b, lam, a: ``[B, HV]`` the beta / lam / decay projections (``lam`` is ``None`` with a fixed
        lam, ``a`` without decay).
      state: ``[B, HV, K, V]`` float32; updated in place when donated.
      conv_cache: ``(conv_q [B, W-1, H*K], conv_k, conv_v [B, W-1, HV*V])`` or ``None`` without
        the short conv.
      weights: :class:`LayerWeights`. mask: ``[B]`` bool (False: the row is left untouched) or
        ``None``.
      num_heads: H. scale: the read-out scale. gates: :class:`Gates`.
      config: :class:`DecodeConfig`. interpret: Pallas interpret mode (default: not on a GPU).

    Returns:
      ``(o [B, HV, V] compute dtype, new_state [B, HV, K, V] float32, new_conv_cache)``.
    """
    B, HV, K, V = state.shape
    H = num_heads
    dt = q.dtype
    if HV % H:
        raise ValueError(f"state has {HV} value heads, not a multiple of num_heads = {H}")
    if state.dtype != F32:
        raise TypeError(f"state must be float32, got {state.dtype}")
    for name, x, n in (("q", q, H * K), ("k", k, H * K), ("v", v, HV * V), ("b", b, HV),
                       ("lam", lam, HV), ("a", a, HV)):
        if x is not None and tuple(x.shape) != (B, n):
            raise ValueError(f"{name} must have shape [B, {n}] = [{B}, {n}], got {list(x.shape)}")
    if (lam is None) != (gates.fixed_lam is not None):
        raise ValueError("lam must be given exactly when gates.fixed_lam is None")
    if (a is None) == gates.use_decay:
        raise ValueError("a must be given exactly when gates.use_decay is True")
    has_conv = conv_cache is not None
    interp = u.interpret_default() if interpret is None else bool(interpret)
    Kp, Vp = padded_size(K), padded_size(V)
    BV, warps = (config or DecodeConfig()).resolve(Kp, Vp)

    # Per-head layouts (free reshapes), zero-padded to the kernel's head sizes.
    qh = _pad_axis(q.reshape(B, H, K), 2, Kp)
    kh = _pad_axis(k.reshape(B, H, K), 2, Kp)
    vh = _pad_axis(v.reshape(B, HV, V), 2, Vp)
    sp = _pad_axis(_pad_axis(state, 2, Kp), 3, Vp)
    m = jnp.ones((B,), jnp.int32) if mask is None else mask.reshape(B).astype(jnp.int32)
    inputs = [qh, kh, vh, b]
    if lam is not None:
        inputs.append(lam)
    if gates.use_decay:
        inputs += [a, weights.A_log, weights.dt_bias]
    inputs += [sp, m]
    n_before_state = len(inputs) - 2
    W = 1
    if has_conv:
        cq, ck, cv = conv_cache
        W = cq.shape[1] + 1
        for name, c, n in (("conv_q", cq, H * K), ("conv_k", ck, H * K), ("conv_v", cv, HV * V)):
            if tuple(c.shape) != (B, W - 1, n):
                raise ValueError(f"{name} cache must have shape [B, W-1, {n}] = "
                                 f"[{B}, {W - 1}, {n}], got {list(c.shape)}")
        heads = lambda x, n, d, dp: _pad_axis(x.reshape(*x.shape[:-1], n, d), -1, dp)  # noqa: E731
        inputs += [heads(cq, H, K, Kp), heads(ck, H, K, Kp), heads(cv, HV, V, Vp),
                   heads(weights.conv_q, H, K, Kp), heads(weights.conv_k, H, K, Kp),
                   heads(weights.conv_v, HV, V, Vp)]

    full = pl.BlockSpec()
    state_spec = pl.BlockSpec((None, None, Kp, BV), lambda b, hv, j: (b, hv, 0, j))
    in_specs = [full] * len(inputs)
    in_specs[n_before_state] = state_spec
    out_shape = [jax.ShapeDtypeStruct((B, HV, Vp), dt), jax.ShapeDtypeStruct(sp.shape, F32)]
    out_specs = [pl.BlockSpec((None, None, BV), lambda b, hv, j: (b, hv, j)), state_spec]
    if has_conv:
        out_shape += [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs[-6:-3]]
        out_specs += [full] * 3
    kernel = functools.partial(_kernel, G=HV // H, W=W, BV=BV, dt=dt, scale=float(scale),
                               gates=gates, has_conv=has_conv)
    outs = pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=(B, HV, Vp // BV),
        in_specs=in_specs,
        out_specs=tuple(out_specs),
        input_output_aliases={n_before_state: 1},
        interpret=interp,
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        name="qdelta_decode_step",
    )(*inputs)
    o, new_state = outs[0][..., :V], outs[1][:, :, :K, :V]
    new_conv = None
    if has_conv:
        new_conv = tuple(c[..., :d].reshape(B, W - 1, n * d)
                         for c, n, d in zip(outs[2:], (H, H, HV), (K, K, V)))
    return o, new_state, new_conv
