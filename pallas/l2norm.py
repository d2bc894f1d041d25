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
