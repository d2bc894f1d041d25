"""L2 normalisation over the last axis as one Pallas kernel each way (Triton lowering).

Why this exists: ``qdelta_rule(..., normalize_qk=True)`` normalises ``q`` and ``k`` before the
chunked kernels. XLA computes ``x * rsqrt(sum(x^2) + eps)`` as a reduction and a separate
elementwise pass, reading the input twice (about 100 us for q and k at the 340M layer shape on
an H200, an eighth of the whole forward). Here one program normalises a block of rows held in
registers: one read and one write of each tensor forward, and backward one read of ``x`` and
``dy`` and one write of ``dx``.

Numerics: sums and the scale in float32, whatever the input dtype; the output has the input's
dtype, as :func:`qdelta_jax.reference.l2_normalize` followed by a cast gives. Backward, with
``y = x r`` and ``r = (sum x^2 + eps)^(-1/2)``: ``dx = r (dy - y (dy . y))``.

Backend: head sizes that are powers of two from 16 to 256; other sizes (and the CPU, where the
kernels would run interpreted) take the XLA expression, which computes the same function.

Inside the chunked core (:func:`normalize_pair`, :func:`unit_backward`): the Pallas core
normalises ``q`` and ``k`` itself, in one launch that also keeps the inverse norms ``r``, and
its last backward kernel (``chunk_grads_k``) applies ``dx = r (dy - y (dy . y))`` to the float32
gradients it has in registers, so the backward has no normalisation kernels of its own.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qdelta_jax.pallas import _util as u

F32 = jnp.float32
EPS = 1e-6  # as qdelta_jax.reference.l2_normalize


def _rows_block(R: int, K: int) -> int:
    """Rows a program: about 16K elements (a [64, 256] or [128, 128] tile, 4 warps), the
    largest power of two that divides ``R`` (blocks then tile the rows exactly)."""
    br = 16384 // K
    while br > 1 and R % br:
        br //= 2
    return br


def _fwd_kernel(x_ref, y_ref, *, eps):
    x = x_ref[...].astype(F32)
    r = lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) + eps)
    y_ref[...] = (x * r).astype(y_ref.dtype)


def _bwd_kernel(x_ref, dy_ref, dx_ref, *, eps):
    x = x_ref[...].astype(F32)
    dy = dy_ref[...].astype(F32)
    r = lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) + eps)
    y = x * r
    dx_ref[...] = (r * (dy - y * jnp.sum(dy * y, axis=1, keepdims=True))).astype(dx_ref.dtype)


def unit_backward(y, r, dy):
    """The gradient w.r.t. ``x`` of ``y = x r``, ``r = (sum x^2 + eps)^(-1/2)`` over the last
    axis, from the unit rows ``y`` (any float dtype), ``r`` (``y.shape[:-1]``) and ``dy``;
    float32. Plain jnp: the kernels call it on register tiles, XLA on arrays."""
    yf, dyf = y.astype(F32), dy.astype(F32)
    return r[..., None] * (dyf - yf * jnp.sum(dyf * yf, axis=-1, keepdims=True))


def _pair_kernel(q_ref, k_ref, qn_ref, kn_ref, rq_ref, rk_ref, *, eps):
    for x_ref, y_ref, r_ref in ((q_ref, qn_ref, rq_ref), (k_ref, kn_ref, rk_ref)):
        x = x_ref[...].astype(F32)
        r = lax.rsqrt(jnp.sum(x * x, axis=1) + eps)
        y_ref[...] = (x * r[:, None]).astype(y_ref.dtype)
        r_ref[...] = r


def normalize_pair(q, k, *, interpret: bool, eps: float = EPS):
    """``(q / |q|, k / |k|, 1 / |q|, 1 / |k|)`` over the last axis (with ``eps`` as
    :func:`l2_normalize`), the unit rows in the inputs' dtype and the inverse norms float32
    ``[...]``, in one launch; not differentiable (the core's ``custom_vjp`` differentiates it
    with :func:`unit_backward`). ``q`` and ``k`` have one shape, the last axis a power of two
    from 16 to 256 and a row count that is a multiple of 16."""
    if q.shape != k.shape:
        raise ValueError(f"q and k must have one shape, got {q.shape} and {k.shape}")
    K = q.shape[-1]
    lead = q.shape[:-1]
    qr, kr = q.reshape(-1, K), k.reshape(-1, K)
    R = qr.shape[0]
    if not supported(K) or R % 16:
        raise ValueError(f"normalize_pair takes a last axis that is a power of two from 16 to"
                         f" 256 and a multiple of 16 rows, got {q.shape}")
    BR = _rows_block(R, K)
    spec, vec = pl.BlockSpec((BR, K), lambda i: (i, 0)), pl.BlockSpec((BR,), lambda i: (i,))
    qn, kn, rq, rk = pl.pallas_call(
        functools.partial(_pair_kernel, eps=float(eps)),
        out_shape=(jax.ShapeDtypeStruct((R, K), q.dtype), jax.ShapeDtypeStruct((R, K), k.dtype),
                   jax.ShapeDtypeStruct((R,), F32), jax.ShapeDtypeStruct((R,), F32)),
        grid=(R // BR,),
        in_specs=[spec, spec],
        out_specs=(spec, spec, vec, vec),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        name="qdelta_l2norm_qk",
    )(qr, kr)
    return qn.reshape(q.shape), kn.reshape(k.shape), rq.reshape(lead), rk.reshape(lead)


def _call(kernel, out_dtype, *xs, interpret: bool):
    R, K = xs[0].shape
    BR = _rows_block(R, K)
    spec = pl.BlockSpec((BR, K), lambda i: (i, 0))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((R, K), out_dtype),
        grid=(R // BR,),
        in_specs=[spec] * len(xs),
        out_specs=spec,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        name="qdelta_l2norm",
    )(*xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _l2norm_rows(x, eps, interpret):
    return _call(functools.partial(_fwd_kernel, eps=eps), x.dtype, x, interpret=interpret)


def _l2norm_fwd(x, eps, interpret):
    return _l2norm_rows(x, eps, interpret), x


def _l2norm_bwd(eps, interpret, x, dy):
    return (_call(functools.partial(_bwd_kernel, eps=eps), x.dtype, x, dy.astype(x.dtype),
                  interpret=interpret),)


_l2norm_rows.defvjp(_l2norm_fwd, _l2norm_bwd)


def supported(K: int) -> bool:
    return 16 <= K <= 256 and K & (K - 1) == 0


def l2_normalize(x, eps: float = EPS, *, interpret: bool | None = None):
    """``x / sqrt(sum(x^2) + eps)`` over the last axis, in ``x``'s dtype; differentiable.

    The Pallas kernels run where the last axis is a power of two from 16 to 256 and (unless
    ``interpret`` says otherwise) the backend is a GPU; elsewhere the XLA expression."""
    K = x.shape[-1]
    interp = u.interpret_default() if interpret is None else bool(interpret)
    if not supported(K) or (interpret is None and interp):
        xf = x.astype(jnp.promote_types(x.dtype, F32))
        return (xf * lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    rows = x.reshape(-1, K)
    R = rows.shape[0]
    pad = (-R) % 16 if _rows_block(R, K) < 16 else 0  # odd row counts: a few zero rows
    if pad:
        rows = jnp.pad(rows, ((0, pad), (0, 0)))
    y = _l2norm_rows(rows, float(eps), interp)
    return y[:R].reshape(x.shape)
