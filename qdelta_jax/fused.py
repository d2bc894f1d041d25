"""Elementwise pieces of the layer with hand-written backward passes.

Why this exists: under plain autodiff every float32 intermediate of an RMSNorm, a gated norm or
the short conv + SiLU + q/k L2 norm becomes a residual (for the short conv one float32 copy of
its input per tap, then the conv output, the SiLU output, ...), which the step writes to HBM in
the forward and reads back in the backward; in a layer stack under ``lax.scan`` XLA cannot
fuse them away at all. These functions save only their inputs, in the compute dtype, and
recompute the float32 intermediates inside the backward's own fusion.

Numerics: the forward is the same float32 computation as the plain formulas (bit for bit);
the backward is the analytic gradient in float32, equal to autodiff's to float32 rounding.
The plain formulas (``plain_*``, differentiated by autodiff) are the oracles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from qdelta_jax.reference import l2_normalize

F32 = jnp.float32


def _rms(xf, eps):
    return lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


def _sum_to(x, shape):
    """Sums the leading axes of ``x`` down to the trailing ``shape`` (a broadcast's transpose)."""
    return jnp.sum(x.reshape((-1,) + tuple(shape)), axis=0)


def _norm_input_grad(dxhat, xhat, r):
    # y = x r with r = rsqrt(mean(x^2) + eps): dx = r (dxhat - xhat mean(dxhat xhat)).
    return r * (dxhat - xhat * jnp.mean(dxhat * xhat, axis=-1, keepdims=True))


# ----------------------------------------------------------------------------- RMSNorm


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x, scale, eps: float):
    """``x * rsqrt(mean(x^2) + eps) * scale`` over the last axis, in float32, returned in
    ``x``'s dtype."""
    xf = x.astype(F32)
    return (xf * _rms(xf, eps) * scale.astype(F32)).astype(x.dtype)


def _rms_norm_fwd(x, scale, eps):
    return rms_norm(x, scale, eps), (x, scale)


def _rms_norm_bwd(eps, res, dy):
    x, scale = res
    xf = x.astype(F32)
    r = _rms(xf, eps)
    xhat = xf * r
    dyf = dy.astype(F32)
    dscale = _sum_to(dyf * xhat, scale.shape)
    dx = _norm_input_grad(dyf * scale.astype(F32), xhat, r)
    return dx.astype(x.dtype), dscale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


# ----------------------------------------------------------------------------- gated RMSNorm


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gated_rms_norm(x, gate, scale, eps: float):
    """``rmsnorm(x) * scale * silu(gate)`` over the last axis, in float32, returned in ``x``'s
    dtype."""
    xf = x.astype(F32)
    y = xf * _rms(xf, eps) * scale.astype(F32) * jax.nn.silu(gate.astype(F32))
    return y.astype(x.dtype)


def _gated_fwd(x, gate, scale, eps):
    return gated_rms_norm(x, gate, scale, eps), (x, gate, scale)


def _gated_bwd(eps, res, dy):
    x, gate, scale = res
    xf, gf = x.astype(F32), gate.astype(F32)
    r = _rms(xf, eps)
    xhat = xf * r
    w = scale.astype(F32)
    sig = jax.nn.sigmoid(gf)
    silu = gf * sig
    dyf = dy.astype(F32)
    dscale = _sum_to(dyf * silu * xhat, scale.shape)
    dgate = dyf * xhat * w * sig * (1.0 + gf * (1.0 - sig))
    dx = _norm_input_grad(dyf * silu * w, xhat, r)
    return dx.astype(x.dtype), dgate.astype(gate.dtype), dscale.astype(scale.dtype)


gated_rms_norm.defvjp(_gated_fwd, _gated_bwd)


# ----------------------------------------------------------------------------- short conv


def _conv(x, w, starts):
    """The causal depthwise conv in float32 (``ShortConv``'s convention, zeros before the
    start of the sequence and, with ``starts [B, L]``, before each document's start)."""
    B, L, C = x.shape
    W = w.shape[0]
    xf = jnp.pad(x.astype(F32), ((0, 0), (W - 1, 0), (0, 0)))
    wf = w.astype(F32)
    t = jnp.arange(L)
    z = jnp.zeros((B, L, C), F32)
    for i in range(W):
        lag = W - 1 - i
        tap = xf[:, i : i + L]
        if starts is not None and lag:
            tap = jnp.where((t - lag >= starts)[..., None], tap, 0.0)
        z = z + wf[i] * tap
    return z


def _silu_l2(z, heads, dtype):
    """SiLU of the conv output rounded to the compute dtype, then (``heads``) the per-head L2
    norm in float32: the roundings of the plain layer, so that the cached one-token path
    (which runs the plain formulas) computes the same function. Returns the output in
    ``dtype``, the SiLU output in float32 and the per-head ``rsqrt`` (or None)."""
    u = jax.nn.silu(z.astype(dtype)).astype(F32)
    if heads is None:
        return u.astype(dtype), u, None
    B, L, C = u.shape
    uh = u.reshape(B, L, heads, C // heads)
    r = lax.rsqrt(jnp.sum(uh * uh, axis=-1, keepdims=True) + 1e-6)
    return (uh * r).reshape(B, L, C).astype(dtype), u, r


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def conv_silu(x, w, starts, heads: int | None):
    """``silu(conv(x))`` for ``x [B, L, C]`` and taps ``w [W, C]``; with ``heads`` also the
    L2 norm over each of ``heads`` equal slices of C (the layer's q and k:
    ``u / sqrt(sum(u^2) + 1e-6)`` per head, as :func:`qdelta_jax.reference.l2_normalize`).
    ``starts [B, L]`` (int, or None): the first position of each token's document; taps
    reaching before it read zeros. The conv in float32, rounded to ``x``'s dtype before the
    SiLU; the result in ``x``'s dtype."""
    return _silu_l2(_conv(x, w, starts), heads, x.dtype)[0]


def _conv_silu_fwd(x, w, starts, heads):
    return conv_silu(x, w, starts, heads), (x, w, starts)


def _conv_silu_bwd(heads, res, dy):
    x, w, starts = res
    B, L, C = x.shape
    W = w.shape[0]
    zr = _conv(x, w, starts).astype(x.dtype).astype(F32)
    dyf = dy.astype(F32)
    if heads is not None:
        _, u, r = _silu_l2(zr, heads, x.dtype)
        uh = u.reshape(B, L, heads, C // heads)
        yh = uh * r
        dyh = dyf.reshape(B, L, heads, C // heads)
        # y = u r with r = (|u|^2 + eps)^-1/2: du = r (dy - y (y . dy)).
        dyf = (r * (dyh - yh * jnp.sum(yh * dyh, axis=-1, keepdims=True))).reshape(B, L, C)
    sig = jax.nn.sigmoid(zr)
    dz = dyf * sig * (1.0 + zr * (1.0 - sig))
    xf = jnp.pad(x.astype(F32), ((0, 0), (W - 1, 0), (0, 0)))
    wf = w.astype(F32)
    t = jnp.arange(L)
    dx = jnp.zeros((B, L + W - 1, C), F32)
    dw = []
    for i in range(W):
        lag = W - 1 - i
        dzi = dz
        if starts is not None and lag:
            dzi = jnp.where((t - lag >= starts)[..., None], dz, 0.0)
        dw.append(jnp.sum(dzi * xf[:, i : i + L], axis=(0, 1)))
        dx = dx.at[:, i : i + L].add(wf[i] * dzi)
    dstarts = None
    return dx[:, W - 1 :].astype(x.dtype), jnp.stack(dw).astype(w.dtype), dstarts


conv_silu.defvjp(_conv_silu_fwd, _conv_silu_bwd)


# ----------------------------------------------------------------------------- the oracles


def plain_rms_norm(x, scale, eps):
    """:func:`rms_norm` as plain formulas (autodiff's backward): the oracle."""
    xf = x.astype(F32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
            * scale.astype(F32)).astype(x.dtype)


def plain_gated_rms_norm(x, gate, scale, eps):
    """:func:`gated_rms_norm` as plain formulas: the oracle."""
    y = plain_rms_norm(x.astype(F32), scale, eps) * jax.nn.silu(gate.astype(F32))
    return y.astype(x.dtype)


def plain_conv_silu(x, w, starts, heads):
    """:func:`conv_silu` as plain formulas: the oracle."""
    B, L, C = x.shape
    W = w.shape[0]
    xc = jnp.concatenate([jnp.zeros((B, W - 1, C), x.dtype), x], axis=1)
    t = jnp.arange(L)
    z = jnp.zeros((B, L, C), F32)
    for i in range(W):
        lag = W - 1 - i
        tap = xc[:, i : i + L].astype(F32)
        if starts is not None:
            tap = jnp.where((t - lag >= starts)[..., None], tap, 0.0)
        z = z + w.astype(F32)[i] * tap
    u = jax.nn.silu(z.astype(x.dtype))
    if heads is not None:
        u = l2_normalize(u.reshape(B, L, heads, C // heads)).reshape(B, L, C)
    return u.astype(x.dtype)
