"""The chunkwise form of Q-Delta in plain ``jnp`` (docs/MATH.md section 2), with an analytic
backward.

Shapes use the letters of :mod:`qdelta_jax.array_typing`; the capitals of the chunk math below
(``A``, ``T``, ``W``, ``U``, ``D``, ``G``) are matrices, named as there. Time is split into chunks
of C tokens. Inside a chunk (indices i, j; ``G`` the inclusive
cumulative sum of ``g``; ``gamma = exp(G)``; ``h`` the state entering the chunk)::

    A_ij = beta_i (x_i . k_j) exp(G_i - G_j)   for i > j     # x on the ROW index
    T    = (I + A)^-1                                         # unit lower triangular
    W    = T (beta gamma X),   U = T (beta V)
    D    = U - W h                                            # the per-token writes
    O    = scale ((gamma Q) h + ((Q K^T) o exp(G_i - G_j) o [i >= j]) D)
    h'   = gamma_C h + (K o exp(G_C - G))^T D

This module is the CPU/TPU path and the oracle for the Pallas kernels: each stage is its own
function (:func:`chunk_local`, :func:`state_pass`, :func:`chunk_output` and the backward stages) so
a kernel can be checked stage by stage.

Layout (:mod:`qdelta_jax.packing`). Without ``cu_seqlens`` each batch row is one sequence,
padded at its end to whole chunks. Packed documents without states in or out keep that
row-aligned layout: a document boundary may fall inside a chunk, and ``seg`` (per-token
document ids) cuts every decay, intra-chunk term and the carried state there (:func:`gates`:
``gamma`` holds for the chunk's first document only, ``exp(G_C - G)`` for its last only, and the
state entering a chunk survives it only when one document spans the whole chunk). With
initial or final states every document starts on a chunk boundary instead (the per-document
layout) and the state pass resets at those chunks. Pad tokens have ``k = q = v = 0``,
``g = beta = lam = 0``: they leave the state unchanged. The "core" (:func:`chunked_core`, or a
kernel with the same contract) sees ``[B, Tp, H, *]`` arrays with ``Tp`` a multiple of C, ``G``
(the cumulative log decay within each chunk and document), ``seg`` or ``None``, and per-chunk
metadata ``reset``, ``is_last``, ``seq`` of shape ``[B, NC]``.

Backward. Nothing per chunk is saved: the backward recomputes ``W, U`` and the chunk-entry
states (one forward state pass), runs a reverse pass over chunks for the state gradient, then
computes all local gradients in parallel over chunks. Residuals are the inputs and the
per-sequence initial states only.

Numerics: ``G``, the triangular solve and the states are float32. Matmul inputs are in the
compute dtype (bfloat16 inputs stay bfloat16, float32 uses ``precision=HIGHEST``), with float32
accumulation. ``exp(G_i - G_j)`` is only evaluated where ``i >= j``, so it never overflows.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from qdelta_jax import packing
from qdelta_jax.packing import ChunkMeta

F32 = jnp.float32


def _acc(dt):
    """Accumulation dtype for compute dtype ``dt``: float32, or float64 for float64 inputs (used by
    the finite-difference gradient checks)."""
    return jnp.promote_types(dt, F32)


def _mm(eq: str, a: Array, b: Array, dt) -> Array:
    """einsum with inputs in the compute dtype ``dt`` and float32 (or float64) accumulation."""
    acc = _acc(dt)
    prec = lax.Precision.HIGHEST if dt == acc else None
    return jnp.einsum(eq, a.astype(dt), b.astype(dt), preferred_element_type=acc, precision=prec)


def _masks(C: int) -> tuple[Array, Array]:
    i = jnp.arange(C)
    return i[:, None] > i[None, :], i[:, None] >= i[None, :]


def _decay(G: Array, mask: Array) -> Array:
    """``exp(G_i - G_j)`` where ``mask`` holds, else 0; never evaluates an unmasked exponent."""
    diff = G[..., :, None] - G[..., None, :]
    return jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)


# ----------------------------------------------------------------------------- segments


def _seg_split(seg: Array | None, C: int) -> Array | None:
    """``seg [B, Tp] -> [B, 1, NC, C]`` (broadcasts over heads)."""
    if seg is None:
        return None
    B, Tp = seg.shape
    return seg.reshape(B, 1, Tp // C, C)


class Gates(NamedTuple):
    """The decay factors of one chunk, document boundaries inside it included (``seg``).

    ``gam_i = exp(G_i)`` (from the chunk start), zero past the chunk's first document;
    ``e_i = exp(G_C - G_i)`` (to the chunk end), zero before its last document;
    ``aC = exp(G_C)``, zero when a document starts inside the chunk; ``same [.., C, C]``: i and
    j are in one document (``None``: the whole chunk is)."""

    gam: Array
    e: Array
    aC: Array
    same: Array | None


def gates(G: Array, seg: Array | None) -> Gates:
    gC = G[..., -1:]
    if seg is None:
        return Gates(jnp.exp(G), jnp.exp(gC - G), jnp.exp(gC[..., 0]), None)
    first = seg == seg[..., :1]
    last = seg == seg[..., -1:]
    gam = jnp.where(first, jnp.exp(jnp.where(first, G, 0.0)), 0.0)
    e = jnp.where(last, jnp.exp(jnp.where(last, gC - G, 0.0)), 0.0)
    aC = jnp.where(first[..., -1], jnp.exp(gC[..., 0]), 0.0)
    same = seg[..., :, None] == seg[..., None, :]
    return Gates(gam, e, aC, same)


def _within(mask: Array, gt: Gates) -> Array:
    return mask if gt.same is None else mask & gt.same


# ----------------------------------------------------------------------------- forward stages


def _split(x: Array, C: int) -> Array:
    """``[B, Tp, H, *] -> [B, H, NC, C, *]``."""
    B, Tp, H = x.shape[:3]
    x = x.reshape((B, Tp // C, C, H) + x.shape[3:])
    return jnp.moveaxis(x, 3, 1)


def _merge(x: Array) -> Array:
    """``[B, H, NC, C, *] -> [B, Tp, H, *]``."""
    x = jnp.moveaxis(x, 1, 3)
    B, NC, C, H = x.shape[:4]
    return x.reshape((B, NC * C, H) + x.shape[4:])


class Local(NamedTuple):
    """Per-chunk quantities that need no state, each ``[B, H, NC, C, ...]``."""

    G: Array  # [.., C]     inclusive cumulative log decay (f32)
    X: Array  # [.., C, K]  k + lam q (f32)
    Rd: Array  # [.., C, C] (X K^T) o exp(G_i - G_j), strictly lower (f32)
    A: Array  # [.., C, C]  beta_i Rd_ij (f32)
    Tinv: Array  # [.., C, C] (I + A)^-1 (f32)
    W: Array  # [.., C, K]  (f32)
    U: Array  # [.., C, V]  (f32)


def _inverse_trsm(A):
    eye = jnp.eye(A.shape[-1], dtype=A.dtype)
    return lax.linalg.triangular_solve(
        eye + A, jnp.broadcast_to(eye, A.shape), left_side=True, lower=True, unit_diagonal=True
    )


def _inverse_rows(A):
    """Forward substitution one row at a time: row ``i`` of ``T = (I + A)^-1`` is
    ``e_i - A[i, :] T`` (``A`` strictly lower, so only the finished rows ``j < i`` count)."""
    T = jnp.broadcast_to(jnp.eye(A.shape[-1], dtype=A.dtype), A.shape)

    def row(i, T):
        a_i = lax.dynamic_slice_in_dim(A, i, 1, axis=-2)
        t_i = lax.dynamic_slice_in_dim(T, i, 1, axis=-2)  # still e_i
        new = t_i - jnp.matmul(a_i, T, precision=lax.Precision.HIGHEST)
        return lax.dynamic_update_slice_in_dim(T, new, i, axis=-2)

    return lax.fori_loop(0, A.shape[-1], row, T)


def unit_lower_inverse(A):
    """``(I + A)^-1`` for strictly lower-triangular ``A [..., C, C]``.

    On accelerators: XLA's triangular solve. On the CPU: the same substitution written as a
    ``fori_loop`` (same arithmetic, about as fast at our sizes), because jaxlib 0.10's CPU
    lowering calls LAPACK ``trsm`` through a kernel that, for large batches, queues tasks on
    XLA:CPU's intra-op thread pool and blocks a pool thread until they run: with several host
    devices, or independent solves in one program, every pool thread can end up waiting and the
    program hangs (seen as a rendezvous abort in data-parallel CPU training)."""
    return lax.platform_dependent(A, cpu=_inverse_rows, default=_inverse_trsm)


def chunk_local(q, k, v, G, beta, lam, seg=None) -> Local:
    """``A``, ``T = (I + A)^-1``, ``W`` and ``U`` for every chunk (inputs ``[B, H, NC, C, *]``,
    ``G`` the chunk's cumulative log decay, ``seg [B, 1, NC, C]`` document ids or ``None``)."""
    dt = q.dtype
    F32 = _acc(dt)
    C = q.shape[-2]
    strict, _ = _masks(C)
    G = G.astype(F32)
    gt = gates(G, seg)
    beta = beta.astype(F32)
    X = k.astype(F32) + lam.astype(F32)[..., None] * q.astype(F32)
    Rd = _mm("...ik,...jk->...ij", X, k, dt) * _decay(G, _within(strict, gt))
    A = beta[..., :, None] * Rd
    Tinv = unit_lower_inverse(A)
    W = _mm("...ij,...jk->...ik", Tinv, (beta * gt.gam)[..., None] * X, dt)
    U = _mm("...ij,...jv->...iv", Tinv, beta[..., None] * v.astype(F32), dt)
    # X, W, U only feed matmuls: keep them in the compute dtype (halves their bytes in bf16).
    return Local(G, X.astype(dt), Rd, A, Tinv, W.astype(dt), U.astype(dt))


def _time_major(*xs):
    return [jnp.moveaxis(x, 2, 0) for x in xs]


def state_pass(k, G, W, U, h0, meta: ChunkMeta, dt, seg=None):
    """Sequential pass over chunks. Returns ``h_in [B, H, NC, K, V]`` (the state entering each
    chunk, in ``dt``), ``D [B, H, NC, C, V]`` (float32) and the final states ``[N, H, K, V]``."""
    F32 = _acc(dt)
    gt = gates(G, seg)

    def body(carry, inp):
        h, final = carry
        k_c, W_c, U_c, e_c, aC_c, reset, last, seq = inp
        h = jnp.where(reset[:, None, None, None], h0[seq], h)
        D = U_c.astype(F32) - _mm("bhck,bhkv->bhcv", W_c, h, dt)
        kd = k_c.astype(F32) * e_c[..., None]
        h_new = aC_c[..., None, None] * h + _mm("bhck,bhcv->bhkv", kd, D, dt)
        final = final.at[seq].set(jnp.where(last[:, None, None, None], h_new, final[seq]))
        return (h_new, final), (h.astype(dt), D.astype(dt))

    B, H, _, _, K = k.shape
    V = U.shape[-1]
    e, aC = (jnp.broadcast_to(x, G.shape[:x.ndim]) for x in (gt.e, gt.aC))
    xs = _time_major(k, W, U, e, aC) + [m.T for m in meta]
    (_, final), (h_in, D) = lax.scan(body, (jnp.zeros((B, H, K, V), F32), h0), xs)
    return jnp.moveaxis(h_in, 0, 2), jnp.moveaxis(D, 0, 2), final


def chunk_output(q, k, G, h_in, D, scale, dt, seg=None):
    """``O = scale ((gamma Q) h + (Q K^T o decay o causal) D)`` for every chunk, float32."""
    F32 = _acc(dt)
    C = q.shape[-2]
    _, incl = _masks(C)
    gt = gates(G, seg)
    P = _mm("...ik,...jk->...ij", q, k, dt) * _decay(G, _within(incl, gt))
    qg = q.astype(F32) * gt.gam[..., None]
    inter = _mm("...ck,...kv->...cv", qg, h_in, dt)
    return scale * (inter + _mm("...ij,...jv->...iv", P, D, dt))


def _forward(q, k, v, G, beta, lam, h0, seg, meta, scale):
    dt = q.dtype
    C = meta_chunk(q, meta)
    qs, ks, vs = _split(q, C), _split(k, C), _split(v, C)
    Gs, bs, ls = _split(G, C), _split(beta, C), _split(lam, C)
    sg = _seg_split(seg, C)
    loc = chunk_local(qs, ks, vs, Gs, bs, ls, sg)
    h_in, D, final = state_pass(ks, loc.G, loc.W, loc.U, h0, meta, dt, sg)
    o = chunk_output(qs, ks, loc.G, h_in, D, scale, dt, sg)
    return _merge(o.astype(v.dtype)), final


def meta_chunk(q: Array, meta: ChunkMeta) -> int:
    """The chunk length implied by ``q [B, Tp, H, K]`` and ``meta [B, NC]``."""
    return q.shape[1] // meta.reset.shape[1]


# ----------------------------------------------------------------------------- backward stages


def reverse_state_pass(k, G, W, q, do, dD0, dfinal, meta: ChunkMeta, scale, N, dt, seg=None):
    """Reverse pass over chunks for the state gradient.

    Returns ``dh_out [B, H, NC, K, V]`` (gradient w.r.t. the state leaving each chunk, in ``dt``)
    and ``dh0 [N, H, K, V]`` (gradient w.r.t. the initial states of the sequences that own at
    least one chunk). ``dD0 = scale P^T dO`` is the state-independent part of ``dD``.
    """
    F32 = _acc(dt)
    gt = gates(G, seg)

    def body(carry, inp):
        dh, dh0 = carry
        k_c, W_c, q_c, do_c, dD0_c, gam_c, e_c, aC_c, reset, last, seq = inp
        dh = jnp.where(last[:, None, None, None], dfinal[seq], dh)
        kd = k_c.astype(F32) * e_c[..., None]
        dD = dD0_c.astype(F32) + _mm("bhck,bhkv->bhcv", kd, dh, dt)
        qg = q_c.astype(F32) * gam_c[..., None]
        dh_in = (
            scale * _mm("bhck,bhcv->bhkv", qg, do_c, dt)
            + aC_c[..., None, None] * dh
            - _mm("bhck,bhcv->bhkv", W_c, dD, dt)
        )
        r = reset[:, None, None, None]
        dh0 = dh0.at[seq].add(jnp.where(r, dh_in, 0.0))
        return (jnp.where(r, 0.0, dh_in), dh0), dh.astype(dt)

    B, H, _, _, K = k.shape
    V = do.shape[-1]
    xs = _time_major(k, W, q, do, dD0, gt.gam, gt.e, gt.aC) + [m.T for m in meta]
    init = (jnp.zeros((B, H, K, V), F32), jnp.zeros((N, H, K, V), F32))
    (_, dh0), dh_out = lax.scan(body, init, xs, reverse=True)
    return jnp.moveaxis(dh_out, 0, 2), dh0


def chunk_grads(q, k, v, beta, lam, loc: Local, h_in, D, do, dh_out, scale, dt, dD0=None,
                seg=None):
    """All local gradients, in parallel over chunks. Returns f32 ``dq, dk, dv, dG, dbeta, dlam``
    in the ``[B, H, NC, C, *]`` layout (``dG``: w.r.t. the chunk's cumulative log decay)."""
    F32 = _acc(dt)
    C = q.shape[-2]
    strict, incl = _masks(C)
    G, X, Rd, A, Tinv, W, U = loc
    gt = gates(G, seg)
    qf, kf, vf = q.astype(F32), k.astype(F32), v.astype(F32)
    beta, lam = beta.astype(F32), lam.astype(F32)
    gam, e = gt.gam, gt.e
    kd = kf * e[..., None]

    # Output: O = scale ((gamma Q) h + P D), P = (Q K^T) o decay o causal.
    dec_incl = _decay(G, _within(incl, gt))
    QK = _mm("...ik,...jk->...ij", q, k, dt)
    if dD0 is None:  # the backward passes the dD0 its reverse pass used; stage checks do not
        dD0 = scale * _mm("...ij,...iv->...jv", QK * dec_incl, do, dt)
    dD = dD0.astype(F32) + _mm("...ck,...kv->...cv", kd, dh_out, dt)
    dP = scale * _mm("...iv,...jv->...ij", do, D, dt) * dec_incl
    dq = _mm("...ij,...jk->...ik", dP, k, dt)
    dk = _mm("...ij,...ik->...jk", dP, q, dt)
    ZP = dP * QK
    dG = ZP.sum(-1) - ZP.sum(-2)
    doh = _mm("...cv,...kv->...ck", do, h_in, dt)  # dO h^T
    dq = dq + scale * gam[..., None] * doh
    dG = dG + scale * gam * (doh * qf).sum(-1)

    # State out: h' = aC h + (K o e)^T D, e_i = exp(G_C - G_i) (aC = exp(G_C) or 0).
    dkd = _mm("...cv,...kv->...ck", D, dh_out, dt)
    dk = dk + e[..., None] * dkd
    de = (dkd * kf).sum(-1) * e
    dG = dG - de
    dGC = de.sum(-1) + gt.aC * jnp.einsum(
        "...kv,...kv->...", h_in.astype(F32), dh_out.astype(F32)
    )
    dG = dG.at[..., -1].add(dGC)

    # D = U - W h.
    dW = -_mm("...cv,...kv->...ck", dD, h_in, dt)
    dU = dD

    # W = T (beta gamma X), U = T (beta V), T = (I + A)^-1.
    bx = (beta * gam)[..., None] * X
    bv = beta[..., None] * vf
    dT = _mm("...ik,...jk->...ij", dW, bx, dt) + _mm("...iv,...jv->...ij", dU, bv, dt)
    dbx = _mm("...ji,...jk->...ik", Tinv, dW, dt)
    dbv = _mm("...ji,...jv->...iv", Tinv, dU, dt)
    hp = lax.Precision.HIGHEST
    dA = -jnp.einsum("...ji,...jk,...lk->...il", Tinv, dT, Tinv, precision=hp)
    dA = jnp.where(strict, dA, 0.0)

    # A = beta_i (X K^T) o decay, strictly lower.
    ZA = dA * A
    dG = dG + ZA.sum(-1) - ZA.sum(-2)
    dbeta = (dA * Rd).sum(-1)
    dR = dA * beta[..., :, None] * _decay(G, _within(strict, gt))
    dX = _mm("...ij,...jk->...ik", dR, k, dt)
    dk = dk + _mm("...ij,...ik->...jk", dR, X, dt)
    bxX = (dbx * X).sum(-1)
    dX = dX + (beta * gam)[..., None] * dbx
    dbeta = dbeta + gam * bxX
    dG = dG + beta * gam * bxX
    dv = beta[..., None] * dbv
    dbeta = dbeta + (dbv * vf).sum(-1)

    # X = k + lam q.
    dk = dk + dX
    dq = dq + lam[..., None] * dX
    dlam = (dX * qf).sum(-1)
    return dq, dk, dv, dG, dbeta, dlam


# ----------------------------------------------------------------------------- custom_vjp core

# The floor of the log decay the chunked paths use (see qdelta_chunked).
G_FLOOR = -110.0

# Bytes of float32 temporaries the backward's local-gradient stage may hold at once.
_GRAD_GROUP_BYTES = 256 * 2**20


@partial(jax.custom_vjp, nondiff_argnums=(11,))
def chunked_core(q, k, v, G, beta, lam, h0, seg, reset, is_last, seq, scale):
    """The chunked op on the padded layout. ``q, k [B, Tp, H, K]``, ``v [B, Tp, H, V]``,
    ``G, beta, lam [B, Tp, H]`` (``G`` the cumulative log decay within each chunk and document,
    :func:`qdelta_jax.packing.chunk_cumsum`), ``h0 [N, H, K, V]`` float32, ``seg [B, Tp]``
    int32 document ids (``None`` when no document boundary lies inside a chunk), metadata
    ``[B, NC]``. Returns ``(o [B, Tp, H, V] in v's dtype, final [N, H, K, V] float32)``;
    differentiable w.r.t. its first 7 arguments."""
    return _forward(q, k, v, G, beta, lam, h0, seg, ChunkMeta(reset, is_last, seq), scale)


def _core_fwd(q, k, v, G, beta, lam, h0, seg, reset, is_last, seq, scale):
    out = _forward(q, k, v, G, beta, lam, h0, seg, ChunkMeta(reset, is_last, seq), scale)
    return out, (q, k, v, G, beta, lam, h0, seg, reset, is_last, seq)


def _core_bwd(scale, res, cts):
    q, k, v, G, beta, lam, h0, seg, reset, is_last, seq = res
    do, dfinal = jnp.asarray(cts[0]), jnp.asarray(cts[1])
    meta = ChunkMeta(reset, is_last, seq)
    dt = q.dtype
    F32 = _acc(dt)
    C = meta_chunk(q, meta)
    N = h0.shape[0]
    qs, ks, vs = _split(q, C), _split(k, C), _split(v, C)
    Gs, bs, ls = _split(G, C), _split(beta, C), _split(lam, C)
    sg = _seg_split(seg, C)
    dos = _split(do, C)
    loc = chunk_local(qs, ks, vs, Gs, bs, ls, sg)
    h_in, D, _ = state_pass(ks, loc.G, loc.W, loc.U, h0, meta, dt, sg)
    _, incl = _masks(C)
    P = _mm("...ik,...jk->...ij", qs, ks, dt) * _decay(loc.G, _within(incl, gates(loc.G, sg)))
    dD0 = (scale * _mm("...ij,...iv->...jv", P, dos, dt)).astype(dt)
    dh_out, dh0 = reverse_state_pass(
        ks, loc.G, loc.W, qs, dos, dD0, dfinal.astype(F32), meta, scale, N, dt, sg
    )
    # Sequences that own no chunk (empty in cu_seqlens) pass their initial state through.
    owns = jnp.zeros((N,), bool).at[seq.reshape(-1)].max(reset.reshape(-1))
    dh0 = dh0 + jnp.where(owns[:, None, None, None], 0.0, dfinal.astype(F32))
    primals = (q, k, v, G, beta, lam)

    def grads_of(xs):
        qc, kc, vc, bc, lc, loc_c, h_c, D_c, do_c, dh_c, dD0_c, sg_c = xs
        out = chunk_grads(qc, kc, vc, bc, lc, loc_c, h_c, D_c, do_c, dh_c, scale, dt, dD0_c,
                          sg_c)
        return tuple(x.astype(p.dtype) for x, p in zip(out, primals))

    # The local gradients are independent per chunk; computing them a group of chunks at a
    # time bounds the float32 temporaries (about a dozen [C, V]-sized arrays per chunk).
    xs = (qs, ks, vs, bs, ls, loc, h_in, D, dos, dh_out, dD0, sg)
    xs = jax.tree_util.tree_map(lambda x: jnp.moveaxis(x, 2, 0), xs)
    NC = qs.shape[2]
    per_chunk = qs.shape[0] * qs.shape[1] * C * (qs.shape[-1] + vs.shape[-1]) * 4 * 12
    group = max(1, min(NC, _GRAD_GROUP_BYTES // max(per_chunk, 1)))
    grads = lax.map(grads_of, xs, batch_size=group) if group < NC else jax.vmap(grads_of)(xs)
    dq, dk, dv, dG, db, dl = (_merge(jnp.moveaxis(x, 0, 2)) for x in grads)
    return dq, dk, dv, dG, db, dl, dh0.astype(h0.dtype), None, None, None, None


chunked_core.defvjp(_core_fwd, _core_bwd)


# ----------------------------------------------------------------------------- entry point


def qdelta_chunked(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T H K"],
    v: Float[Array, "B T H V"],
    g: Float[Array, "B T H"],
    beta: Float[Array, "B T H"],
    lam: Float[Array, "B T H"],
    *,
    scale: float,
    initial_state: Float[Array, "N H K V"] | None = None,
    output_final_state: bool = True,
    cu_seqlens: packing.Documents | Int[Array, "..."] | None = None,
    chunk_size: int = 64,
    core=None,
) -> tuple[Float[Array, "B T H V"], Float[Array, "N H K V"] | None]:
    """Chunked Q-Delta on already-normalised ``q, k`` (use :func:`qdelta_jax.qdelta_rule`, which
    checks its inputs; ``cu_seqlens`` a :class:`qdelta_jax.packing.Documents`, or offsets that
    :func:`qdelta_jax.packing.documents` takes).
    ``core`` replaces :func:`chunked_core` (the Pallas kernels plug in here; it is also told
    ``rows_are_sequences``).

    Packed documents use the row-aligned layout when no state goes in or out
    (``initial_state=None, output_final_state=False``), else the per-document layout (see
    :mod:`qdelta_jax.packing`). Returns ``o`` in ``v``'s dtype and the float32 final states
    (``None`` when not asked for)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    docs = None if cu_seqlens is None else packing.documents(cu_seqlens, B, T)
    per_document = docs is not None and (initial_state is not None or output_final_state)
    if per_document and B > 1:
        # Per-row documents with states: the one-row layout row by row (the batch axis stays).
        S = docs.offsets.shape[1] - 1
        h0 = initial_state
        if h0 is not None:
            h0 = h0.reshape((B, S) + h0.shape[1:])

        def row(q, k, v, g, beta, lam, docs, h0):
            one = lambda x: x[None]  # noqa: E731
            o, fin = qdelta_chunked(
                *map(one, (q, k, v, g, beta, lam)), scale=scale, initial_state=h0,
                output_final_state=True, cu_seqlens=jax.tree.map(one, docs), chunk_size=C,
                core=core,
            )
            return o[0], fin

        o, fin = jax.vmap(row)(q, k, v, g, beta, lam, docs, h0)
        return o, (fin.reshape((B * S,) + fin.shape[2:]) if output_final_state else None)

    layout = packing.make_layout(B, T, C, docs, per_document=per_document)
    dt = jnp.promote_types(q.dtype, k.dtype)
    F32 = _acc(dt)
    if docs is not None and not per_document:
        N = 1  # the row-aligned layout resets to zero: one zero state serves every document
    else:
        N = B if docs is None else docs.num_states
    h0 = jnp.zeros((N, H, K, V), F32) if initial_state is None else jnp.asarray(initial_state, F32)
    args = [packing.to_padded(x.astype(dt), layout) for x in (q, k)]
    args.append(packing.to_padded(v, layout))
    # exp(g) is exactly 0 in float32 from g = -104 on, so a floor there changes no decay but
    # keeps g = -inf (a full reset) from making exp(G_i - G_j) = exp(-inf + inf) a NaN.
    g = jnp.maximum(g.astype(F32), G_FLOOR)
    G = packing.chunk_cumsum(packing.to_padded(g, layout), C, layout.seg)
    args.append(G)
    args += [packing.to_padded(x.astype(F32), layout) for x in (beta, lam)]
    meta = layout.meta
    if core is None:
        o, final = chunked_core(*args, h0, layout.seg, meta.reset, meta.is_last, meta.seq, scale)
    else:  # a kernel core may take a faster path when every row is one sequence
        o, final = core(*args, h0, layout.seg, meta.reset, meta.is_last, meta.seq, scale,
                        rows_are_sequences=docs is None)
    if docs is not None and not per_document:
        final = None
    return packing.from_padded(o, layout, T), (final if output_final_state else None)
