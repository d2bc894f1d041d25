"""Helpers shared by the Q-Delta kernels: Triton-friendly matmuls, masks and the blocked
chunk algebra.

The unit lower triangular inverse (:func:`solve_unit_lower`). The Triton lowering has no
triangular solve and cannot slice a tensor held in registers. Forward substitution runs on the
16 x 16 diagonal blocks (all blocks at once, 15 steps of masked row gathers in a ``fori_loop``),
then the blocks are merged with a few float32 matmuls. Why not the product form on the whole
chunk: ``(I + N)(I + N^2)...(I + N^32)`` forms ``N^32`` whose entries, for correlated keys and
slow decay, grow like binomial coefficients (about ``C(63, 31) |N|^32``) and cancel
catastrophically in float32; substitution never forms them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
S = 16  # rows of one block: the smallest dot the Triton lowering takes


def interpret_default() -> bool:
    """Kernels run in Pallas interpret mode wherever the default backend is not a GPU."""
    return jax.default_backend() != "gpu"


def f32_precision(interpret: bool):
    """Precision of float32 kernel matmuls: exact float32 in interpret mode; on the GPU three
    TF32 passes (float32-accurate to about 1e-6 relative, on the tensor cores), since the Triton
    lowering's IEEE float32 dot runs on the FMA units."""
    if interpret:
        return lax.Precision.HIGHEST
    return lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def dot(a, b, *, ta: bool = False, tb: bool = False, dt=None, hp=lax.Precision.HIGHEST):
    """2-D matmul ``op(a) @ op(b)`` with float32 accumulation.

    Inputs are cast to ``dt`` when given (the compute dtype). bfloat16 operands use the default
    precision; float32 operands use ``hp`` (see :func:`f32_precision`)."""
    if dt is not None:
        a = a.astype(dt)
        b = b.astype(dt)
    prec = hp if a.dtype == F32 else lax.Precision.DEFAULT
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=F32)


def iota2(n: int, m: int, dim: int):
    return lax.broadcasted_iota(jnp.int32, (n, m), dim)


def masks(n: int):
    """``(strict, incl)``: ``i > j`` and ``i >= j`` for an ``[n, n]`` tile."""
    i, j = iota2(n, n, 0), iota2(n, n, 1)
    return i > j, i >= j


def cumsum(x):
    """Inclusive cumulative sum of a 1-D vector (a masked row sum; no scan in the kernel)."""
    n = x.shape[0]
    i, j = iota2(n, n, 0), iota2(n, n, 1)
    return jnp.sum(jnp.where(j <= i, x[None, :], 0.0), axis=1)


def revcumsum(x):
    """``out_i = sum_{j >= i} x_j`` of a 1-D vector."""
    n = x.shape[0]
    i, j = iota2(n, n, 0), iota2(n, n, 1)
    return jnp.sum(jnp.where(j >= i, x[None, :], 0.0), axis=1)


def decay(Gi, Gj, mask=None):
    """``exp(Gi_i - Gj_j)`` where ``mask`` holds, else 0 (the exponent is masked first, so it
    never overflows). ``mask=None``: the block lies strictly below the diagonal, all i > j."""
    diff = Gi[:, None] - Gj[None, :]
    if mask is None:
        return jnp.exp(diff)
    return jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)


def last(x):
    """The last element of a 1-D vector, as a scalar."""
    n = x.shape[0]
    return jnp.sum(jnp.where(lax.broadcasted_iota(jnp.int32, (n,), 0) == n - 1, x, 0.0))


def solve_unit_lower(A, hp):
    """``T = (I + A)^-1`` of a ``[C, C]`` strictly lower triangular float32 ``A``, C = 16 nb.

    1. The ``nb`` diagonal ``16 x 16`` blocks, all at once, by forward substitution: step r
       solves row r of every block (rows of different blocks touch disjoint columns, so one
       masked row-gather serves all of them).
    2. ``(I + A) = (I + A_D)(I + T_D A_L)`` with ``A_L`` the part below the diagonal blocks, so
       ``T = (I + N)^-1 T_D`` with ``N = T_D A_L`` nilpotent of block order ``nb``:
       ``(I + N)^-1 = (I - N)(I + N^2)(I + N^4)...`` -- matmuls only, and the powers of N stay
       small (at most ``nb - 1 = 3`` block steps), unlike the product form on the whole chunk.
    """
    C = A.shape[0]
    i, j = iota2(C, C, 0), iota2(C, C, 1)
    same = (i // S) == (j // S)
    eye = jnp.where(i == j, 1.0, 0.0).astype(F32)
    A_D = jnp.where(same, A, 0.0)

    def step(r, T):
        sel = (i % S) == r
        a = jnp.sum(jnp.where(sel, A_D, 0.0), axis=0)  # row r of every block, by column
        new = jnp.sum(a[:, None] * T, axis=0)  # sum_j A_ij T_j for those rows
        return jnp.where(sel, jnp.where(same, eye - new[None, :], 0.0), T)

    T = lax.fori_loop(1, S, step, eye)
    if C == S:
        return T
    N = dot(T, jnp.where(same, 0.0, A), hp=hp)
    P = eye - N
    Np = N
    p = 2
    while p < C // S:
        Np = dot(Np, Np, hp=hp)
        P = P + dot(P, Np, hp=hp)
        p *= 2
    return dot(P, T, hp=hp)


def local(q, k, g, beta, lam, dt, hp):
    """The state-free quantities of one chunk: ``G``, ``X = k + lam q`` (float32),
    ``Rd = (X K^T) o decay`` (strictly lower), ``A = beta_i Rd`` and ``T = (I + A)^-1``."""
    C = q.shape[0]
    strict, _ = masks(C)
    G = cumsum(g)
    X = k.astype(F32) + lam[:, None] * q.astype(F32)
    Rd = dot(X, k, tb=True, dt=dt) * decay(G, G, strict)
    A = beta[:, None] * Rd
    return G, X, Rd, A, solve_unit_lower(A, hp)
