"""Helpers shared by the Q-Delta kernels: Triton-friendly matmuls, masks and the blocked
chunk algebra.

The unit lower triangular inverse (:func:`solve_blocks`). The Triton lowering has no
triangular solve and cannot slice a tensor held in registers, so ``A`` is first written to HBM
by one whole-chunk matmul (kernel ``chunk_a``) and the solve kernel loads it back as 16 x 16
blocks and rows (:func:`chunk_blocks`): the diagonal blocks are inverted by forward
substitution (all chains in one 15-step ``fori_loop`` on 16 x 16 tiles, one in-warp reduction
a step), and the blocks below the diagonal are merged with small float32 matmuls. Small tiles
keep few registers live; the earlier whole-chunk [64, 64] substitution (two cross-warp
reductions a step on 64 x 64 tiles) spilled and ran 1.4 ms at the 340M shape. (Computing the
16 x 16 blocks of ``A`` as separate [16, K] x [K, 16] matmuls in the solve kernel does not help:
each warp then holds whole [16, K] operands, 255 registers.) Why not the product form on the whole
chunk: ``(I + N)(I + N^2)...(I + N^32)`` forms ``N^32`` whose entries, for correlated keys and
slow decay, grow like binomial coefficients (about ``C(63, 31) |N|^32``) and cancel
catastrophically in float32; substitution never forms them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

F32 = jnp.float32
S = 16  # rows of one block: the smallest dot the Triton lowering takes


def interpret_default() -> bool:
    """Kernels run in Pallas interpret mode wherever the default backend is not a GPU."""
    return jax.default_backend() != "gpu"


def f32_precision(interpret: bool, dtype=F32):
    """Precision of the float32 kernel matmuls (the solve merge, ``dA = -T^T dT T^T``, states
    where the compute dtype is float32): exact float32 in interpret mode. On the GPU, for
    float32 inputs three TF32 passes (float32-accurate to about 1e-6 relative, on the tensor
    cores; the Triton lowering's IEEE float32 dot runs on the FMA units); for bfloat16 inputs
    one TF32 pass (about 5e-4 relative, under the bfloat16 rounding of every operand that
    feeds these products: ``T`` is rounded to bfloat16 before it meets ``X`` or ``V``)."""
    if interpret:
        return lax.Precision.HIGHEST
    if jnp.dtype(dtype) == jnp.dtype(F32):
        return lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    return lax.DotAlgorithmPreset.TF32_TF32_F32


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


def solve_blocks(row_of, block_of, nb: int, hp):
    """``T = (I + A)^-1`` of a ``[C, C]`` strictly lower triangular float32 ``A`` (C = 16 nb),
    as ``{(b, c): T_bc}`` (``[S, S]`` float32) for ``c <= b``. ``row_of(b, r)`` returns row r of
    diagonal block b as ``[1, S]`` (``r`` traced), ``block_of(b, c)`` block ``A_bc``; in a kernel
    both are loads from a ref holding A (the Triton lowering cannot slice registers).

    1. Diagonal blocks by forward substitution, all ``nb`` chains in one 15-step loop, kept
       transposed: column r of ``T_bb^T`` is ``e_r - sum_j T_bb^T[:, j] A_rj``, a reduction
       along the tile's minor axis (inside a warp: no shared memory, no barrier), with the row
       ``A_r.`` loaded straight from the ref.
    2. Below the diagonal, block row by block row:
       ``T_bc = -T_bb sum_{m=c}^{b-1} A_bm T_mc`` (float32 matmuls at precision ``hp``).
    Substitution and block merges never form high powers of ``A`` (the product form
    ``(I + N)(I + N^2)...`` does, and cancels catastrophically for correlated keys).
    """
    row, col = iota2(S, S, 0), iota2(S, S, 1)
    eye = jnp.where(row == col, 1.0, 0.0).astype(F32)

    def step(r, Tts):
        out = []
        for b, Tt in enumerate(Tts):
            a = row_of(b, r).astype(F32)  # [1, S]: A_rj, zero for j >= r
            new = jnp.sum(Tt * a, axis=1)  # new_c = sum_j T_jc A_rj
            out.append(jnp.where(col == r, eye - new[:, None], Tt))
        return tuple(out)

    Tts = lax.fori_loop(1, S, step, (eye,) * nb)
    T = {(b, b): Tts[b].T for b in range(nb)}
    for b in range(1, nb):
        for c in range(b - 1, -1, -1):
            acc = dot(block_of(b, c), T[c, c], hp=hp)
            for m in range(c + 1, b):
                acc = acc + dot(block_of(b, m), T[m, c], hp=hp)
            T[b, c] = -dot(T[b, b], acc, hp=hp)
    return T


def solve_unit_lower(A, hp):
    """``(I + A)^-1`` of a ``[C, C]`` strictly lower triangular float32 ``A`` by
    :func:`solve_blocks` on an array (outside kernels; kernels load the blocks from a ref)."""
    C = A.shape[0]
    nb = C // S
    A = A.astype(F32)
    blk = lambda b, c: A[b * S:(b + 1) * S, c * S:(c + 1) * S]  # noqa: E731
    row_of = lambda b, r: lax.dynamic_slice(A, (b * S + r, b * S), (1, S))  # noqa: E731
    T = solve_blocks(row_of, blk, nb, hp)
    z = jnp.zeros((S, S), F32)
    return jnp.concatenate(
        [jnp.concatenate([T[b, c] if c <= b else z for c in range(nb)], axis=1)
         for b in range(nb)], axis=0)


class Blocks(NamedTuple):
    """One chunk as ``nb = C / 16`` row blocks: ``G`` (cumulative log decay) and ``beta``
    (lists of [S]) and ``T = (I + A)^-1`` as ``{(b, c): [S, S]}``, c <= b."""

    G: list
    beta: list
    T: dict


def rows(b: int):
    """Row block ``b`` of a chunk."""
    return pl.ds(b * S, S)


def x_block(q_ref, k_ref, l_ref, b: int):
    """``X = k + lam q`` (float32) of row block ``b``, from the refs."""
    lam = l_ref[rows(b)].astype(F32)
    return k_ref[rows(b), :].astype(F32) + lam[:, None] * q_ref[rows(b), :].astype(F32)


def chunk_blocks(a_ref, g_ref, b_ref, hp) -> Blocks:
    """``G``, ``beta`` and ``T = (I + A)^-1`` by row blocks, for the chunk's ``A`` in ``a_ref``
    (``[C, C]`` float32, written by the ``chunk_a`` kernel) and ``g, beta`` refs ``[C]``."""
    nb = a_ref.shape[0] // S
    Gs, betas = [], []
    off = jnp.zeros((), F32)
    for b in range(nb):
        g = g_ref[rows(b)].astype(F32)
        Gs.append(cumsum(g) + off)
        off = off + jnp.sum(g)
        betas.append(b_ref[rows(b)].astype(F32))
    T = solve_blocks(lambda b, r: a_ref[pl.ds(b * S + r, 1), rows(b)],
                     lambda b, c: a_ref[rows(b), rows(c)], nb, hp)
    return Blocks(Gs, betas, T)


def local(q, k, g, beta, lam, dt, hp):
    """The state-free quantities of one chunk as whole tiles: ``G``, ``X = k + lam q``
    (float32), ``Rd = (X K^T) o decay`` (strictly lower) and ``A = beta_i Rd``."""
    C = q.shape[0]
    strict, _ = masks(C)
    G = cumsum(g)
    X = k.astype(F32) + lam[:, None] * q.astype(F32)
    Rd = dot(X, k, tb=True, dt=dt, hp=hp) * decay(G, G, strict)
    return G, X, Rd, beta[:, None] * Rd
