"""Helpers shared by the Q-Delta kernels: Triton-friendly matmuls, masks and the blocked
unit lower triangular inverse.

:func:`solve_blocks` works on 16 x 16 register tiles: the ``chunk_solve`` kernel computes the
ten blocks of ``A`` below and on the diagonal of a 64-row chunk as separate small matmuls
(looping over K in slices, so no warp holds a whole [16, K] operand for long), inverts the
diagonal blocks by forward substitution (a row of a register tile is taken out by a masked
reduction, as the Triton lowering cannot index registers) and merges the blocks below the
diagonal with small float32 matmuls. Earlier versions wrote ``A`` to HBM and loaded its rows
back (two launches, 2 x 50 MB of traffic at the 340M shape) and computed ``W, U`` by 16-row
blocks in the same kernel, which cost more registers and launches (docs/KERNELS.md has the
times).
Why not the product form on the whole chunk: ``(I + N)(I + N^2)...(I + N^32)`` forms ``N^32``
whose entries, for correlated keys and slow decay, grow like binomial coefficients (about
``C(63, 31) |N|^32``) and cancel catastrophically in float32; substitution never forms them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qdelta_jax.pallas.config import StageConfig

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


def g_vec(G, dt):
    """The chunk's ``G`` ([C] float32, just loaded) as the kernels use it. For float32 inputs
    it goes through a masked diagonal row sum (the identity), the data flow of the in-kernel
    cumulative sum these kernels used before ``G`` was precomputed: on an H200 (jax 0.11.2,
    Triton 3.6) the float32 output kernel with ``G`` straight from the load stopped with a
    misaligned-address fault, while the bfloat16 kernels (and the float32 state pass, solve and
    W/U kernels) ran correctly with the plain load."""
    if jnp.dtype(dt) != jnp.dtype(F32):
        return G
    n = G.shape[0]
    i, j = iota2(n, n, 0), iota2(n, n, 1)
    return jnp.sum(jnp.where(i == j, G[None, :], 0.0), axis=1)


def decay(Gi, Gj, mask=None):
    """``exp(Gi_i - Gj_j)`` where ``mask`` holds, else 0 (the exponent is masked first, so it
    never overflows). ``mask=None``: the block lies strictly below the diagonal, all i > j."""
    diff = Gi[:, None] - Gj[None, :]
    if mask is None:
        return jnp.exp(diff)
    return jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)


def solve_blocks(A: dict, nb: int, hp) -> dict:
    """``T = (I + A)^-1`` of a ``[C, C]`` strictly lower triangular float32 ``A`` (C = 16 nb)
    held in registers as 16 x 16 blocks ``A[b, c]`` (``c <= b``), returned as ``{(b, c): T_bc}``
    (``[16, 16]`` float32, ``c <= b``).

    1. Diagonal blocks by forward substitution, all ``nb`` chains in one 14-step loop: row i
       of ``N = T_bb - I`` is ``a + sum_j a_j N_j`` with ``a = -A_i.`` (zero from column i on),
       ``N`` starting as ``-A_bb`` (right for rows 0 and 1). A row is taken out of a register
       tile by a masked reduction (the Triton lowering cannot index registers); with one warp
       per program every reduction stays inside the warp.
    2. Below the diagonal, block row by block row:
       ``T_bc = -T_bb sum_{m=c}^{b-1} A_bm T_mc`` (float32 matmuls at precision ``hp``).
    Substitution and block merges never form high powers of ``A`` (the product form
    ``(I + N)(I + N^2)...`` does, and cancels catastrophically for correlated keys).
    """
    row, col = iota2(S, S, 0), iota2(S, S, 1)
    eye = jnp.where(row == col, 1.0, 0.0).astype(F32)

    def step(i, Ns):
        out = []
        for b, N in enumerate(Ns):
            a = -jnp.sum(jnp.where(row == i, A[b, b], 0.0), axis=0)  # [S]: -A_ij, 0 for j >= i
            a = a + jnp.sum(a[:, None] * N, axis=0)
            out.append(jnp.where(row == i, a[None, :], N))
        return tuple(out)

    Ns = lax.fori_loop(2, S, step, tuple(-A[b, b] for b in range(nb)))
    T = {(b, b): Ns[b] + eye for b in range(nb)}
    for b in range(1, nb):
        for c in range(b - 1, -1, -1):
            acc = dot(A[b, c], T[c, c], hp=hp)
            for m in range(c + 1, b):
                acc = acc + dot(A[b, m], T[m, c], hp=hp)
            T[b, c] = -dot(T[b, b], acc, hp=hp)
    return T


def solve_unit_lower(A, hp):
    """``(I + A)^-1`` of a ``[C, C]`` strictly lower triangular float32 ``A`` by
    :func:`solve_blocks` on an array (outside kernels, for tests)."""
    C = A.shape[0]
    nb = C // S
    A = A.astype(F32)
    blocks = {(b, c): A[b * S:(b + 1) * S, c * S:(c + 1) * S]
              for b in range(nb) for c in range(b + 1)}
    T = solve_blocks(blocks, nb, hp)
    z = jnp.zeros((S, S), F32)
    return jnp.concatenate(
        [jnp.concatenate([T[b, c] if c <= b else z for c in range(nb)], axis=1)
         for b in range(nb)], axis=0)


def rows(b: int):
    """Row block ``b`` of a chunk."""
    return pl.ds(b * S, S)


def local(q, k, G, beta, lam, dt, hp, seg=None):
    """The state-free quantities of one chunk as whole tiles, given ``G`` (the chunk's
    cumulative log decay): ``Rd = (X K^T) o decay`` (strictly lower, ``X = k + lam q``) and
    ``A = beta_i Rd``."""
    C = q.shape[0]
    strict, _ = masks(C)
    X = k.astype(F32) + lam[:, None] * q.astype(F32)
    Rd = dot(X, k, tb=True, dt=dt, hp=hp) * decay(G, G, within(strict, seg))
    return Rd, beta[:, None] * Rd


# ----------------------------------------------------------------------------- documents
# Packed documents in the row-aligned layout (qdelta_jax.packing): ``seg`` is the chunk's [C]
# int32 document ids, non-decreasing, or None when the whole chunk is one document (then the
# kernels compile without any of this). Decay, the intra-chunk terms and the carried state stop
# at a boundary: gamma (decay from the chunk start) holds for the chunk's first document only,
# e (decay to the chunk end) for its last only, and the state entering the chunk survives it
# only when one document spans it.


def gam_of(G, seg):
    """``exp(G_i)``, zero past the chunk's first document."""
    if seg is None:
        return jnp.exp(G)
    first = seg == jnp.min(seg)
    return jnp.where(first, jnp.exp(jnp.where(first, G, 0.0)), 0.0)


def e_of(G, gC, seg):
    """``exp(G_C - G_i)``, zero before the chunk's last document."""
    if seg is None:
        return jnp.exp(gC - G)
    last = seg == jnp.max(seg)
    return jnp.where(last, jnp.exp(jnp.where(last, gC - G, 0.0)), 0.0)


def aC_of(gC, seg):
    """``exp(G_C)``, the carried state's decay over the chunk; zero where a document starts
    inside it."""
    if seg is None:
        return jnp.exp(gC)
    return jnp.where(jnp.min(seg) == jnp.max(seg), jnp.exp(gC), 0.0)


def within(mask, seg_i, seg_j=None):
    """``mask`` (None: all) restricted to pairs in one document (``seg_i`` rows, ``seg_j``
    columns, default the same ids)."""
    if seg_i is None:
        return mask
    same = seg_i[:, None] == (seg_i if seg_j is None else seg_j)[None, :]
    return same if mask is None else mask & same


def with_seg(kernel, n_in: int, segmented: bool):
    """``kernel`` takes a ``seg_ref`` after its ``n_in`` inputs; without documents inside chunks
    it gets ``None`` there and the call passes no such input."""
    if segmented:
        return kernel

    def call(*refs):
        return kernel(*refs[:n_in], None, *refs[n_in:])

    return call


# ----------------------------------------------------------------------------- launch specs


def params(cfg: StageConfig):
    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def spec_rows(C: int, D: int | None):
    """BlockSpec of one chunk of a ``[B, Tp, H]`` array (``D`` None) or of a ``[B, Tp, H, K]`` or
    ``[B, Tp, H, V]`` one (``D`` its last size) for a grid ``(b, c, h, ...)``."""
    if D is None:
        return pl.BlockSpec((None, C, None), lambda b, c, h, *_: (b, c, h))
    return pl.BlockSpec((None, C, None, D), lambda b, c, h, *_: (b, c, h, 0))


def spec_seg(C: int):
    """BlockSpec of one chunk of the ``[B, Tp]`` document ids for a grid ``(b, c, h, ...)``."""
    return pl.BlockSpec((None, C), lambda b, c, h, *_: (b, c))


def seg_args(seg, C: int):
    """The extra input and BlockSpec of a kernel parallel over chunks: none without ``seg``."""
    return ([], []) if seg is None else ([seg.astype(jnp.int32)], [spec_seg(C)])
