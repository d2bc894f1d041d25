"""Backward kernels of the chunked Q-Delta op, Pallas with the Triton lowering.

The backward takes ``W, T``, the chunk-entry states ``h_in`` and the writes ``D`` from the
forward (``Config.save_residuals``, the default) or recomputes them (:func:`forward.chunk_local`,
:func:`forward.state_pass`). Then, after ``dD0 = scale P^T dO`` (:func:`chunk_dd0`):

1. :func:`reverse_state_pass`, one program per (batch row, head, V tile) looping over the
   chunks backwards with the float32 state gradient in registers. Per chunk it writes
   ``dh_out`` (the gradient w.r.t. the state leaving the chunk) and
   ``dD = scale P^T dO + (K o e) dh_out`` (the gradient w.r.t. the writes), and it stores
   ``dh0[seq]`` at the chunk that starts a sequence. ``dh0`` starts as ``dfinal``, so a sequence
   that owns no chunk passes its final-state gradient through, as in the XLA path.
2. :func:`chunk_dqkw`, parallel over (batch, chunk, head, K tile), looping over V tiles: the
   state-side terms ``dO h^T`` (into ``dq``, ``dG``), ``D dh_out^T`` (into ``dk``, ``dG``) and
   ``dW = -dD h^T``.
3. :func:`chunk_grads`, two launches parallel over (batch, chunk, head). It reads ``T`` written
   by ``chunk_solve`` (no second solve) and recomputes ``A`` (one matmul); the V
   side writes ``dv``, ``dPs`` and ``dA = -T^T dT T^T``, the K side the rest (``dR``, ``dX``),
   adds the partial results of 2 and writes ``dq, dk, dG, dbeta, dlam`` (``dG`` w.r.t. the
   chunk's cumulative log decay: the sum back to ``g`` is XLA's, :mod:`qdelta_jax.packing`).

The names and the math follow :func:`qdelta_jax.xla.chunk_grads`, which is the oracle of each
kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from qdelta_jax import xla
from qdelta_jax.pallas import _util as u
from qdelta_jax.pallas._util import params, seg_args, spec_rows
from qdelta_jax.pallas.config import StageConfig

F32 = jnp.float32

# ----------------------------------------------------------------------------- 1. reverse pass


def _dd0_kernel(q_ref, k_ref, G_ref, do_ref, seg_ref, dd0_ref, *, BV, scale, dt, hp):
    _, incl = u.masks(q_ref.shape[0])
    incl = u.within(incl, None if seg_ref is None else seg_ref[...])
    G = u.g_vec(G_ref[...], dt)
    P = (u.dot(q_ref[...], k_ref[...], tb=True, dt=dt, hp=hp) * u.decay(G, G, incl)).astype(dt)
    for j in range(do_ref.shape[-1] // BV):
        vs = pl.ds(j * BV, BV)
        dd0_ref[:, vs] = (scale * u.dot(P, do_ref[:, vs], ta=True, dt=dt, hp=hp)).astype(dt)


def chunk_dd0(q, k, G, do, seg=None, *, scale: float, C: int, cfg: StageConfig, interpret):
    """``dD0 = scale P^T dO [B, Tp, H, V]`` in the compute dtype (``P = Q K^T o decay o
    causal``): the state-independent part of ``dD``, parallel over (batch, chunk, head) with a
    loop over V tiles, so that the reverse pass keeps only the K x V products in its loop."""
    B, Tp, H, K = q.shape
    V = do.shape[-1]
    dt = q.dtype
    kernel = functools.partial(
        _dd0_kernel, BV=cfg.block_v or V, scale=scale, dt=dt, hp=u.f32_precision(interpret, dt)
    )
    extra, extra_specs = seg_args(seg, C)
    return pl.pallas_call(
        u.with_seg(kernel, 4, seg is not None),
        out_shape=jax.ShapeDtypeStruct((B, Tp, H, V), dt),
        grid=(B, Tp // C, H),
        in_specs=[spec_rows(C, K), spec_rows(C, K), spec_rows(C, None), spec_rows(C, V)]
        + extra_specs,
        out_specs=spec_rows(C, V),
        interpret=interpret,
        compiler_params=params(cfg),
        name="qdelta_chunk_dd0",
    )(q, k, G, do.astype(dt), *extra)


def _reverse_kernel(
    q_ref, k_ref, w_ref, G_ref, do_ref, dd0_ref, dfin_ref, reset_ref, last_ref, seq_ref, _dh0_in,
    seg_ref, dhout_ref, dd_ref, dh0_ref, *, C, NC, BV, scale, dt, hp,
):
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    vs = pl.ds(j * BV, BV)
    K = k_ref.shape[-1]

    def body(i, dh):
        c = NC - 1 - i
        seq = seq_ref[b, c]
        dh = lax.cond(last_ref[b, c] != 0, lambda: dfin_ref[seq, h, :, vs].astype(F32),
                      lambda: dh)
        dhout_ref[b, c, h, :, vs] = dh.astype(dt)
        t = pl.ds(c * C, C)
        G = u.g_vec(G_ref[b, t, h], dt)
        gC = G_ref[b, c * C + C - 1, h]
        seg = None if seg_ref is None else seg_ref[b, t]
        # On the chain dh -> dD -> dh_in: two [C, K] x [K / C, BV] products. The
        # state-independent dD0 = scale P^T dO comes from chunk_dd0.
        kd = k_ref[b, t, h, :].astype(F32) * u.e_of(G, gC, seg)[:, None]
        dD = dd0_ref[b, t, h, vs].astype(F32) + u.dot(kd, dh, dt=dt, hp=hp)
        dd_ref[b, t, h, vs] = dD.astype(dt)
        qg = q_ref[b, t, h, :].astype(F32) * u.gam_of(G, seg)[:, None]
        dh_in = (
            scale * u.dot(qg, do_ref[b, t, h, vs], ta=True, dt=dt, hp=hp)
            + u.aC_of(gC, seg) * dh
            - u.dot(w_ref[b, t, h, :], dD, ta=True, dt=dt, hp=hp)
        )
        reset = reset_ref[b, c] != 0

        @pl.when(reset)
        def _():
            dh0_ref[seq, h, :, vs] = dh_in

        return jnp.where(reset, 0.0, dh_in)

    lax.fori_loop(0, NC, body, jnp.zeros((K, BV), F32))


def reverse_state_pass(q, k, G, W, do, dD0, dfinal, reset, is_last, seq, seg=None, *,
                       scale: float, C: int, cfg: StageConfig, interpret):
    """Returns ``dh_out [B, NC, H, K, V]`` and ``dD [B, Tp, H, V]`` in the compute dtype and
    ``dh0 [N, H, K, V]`` float32; ``dD0`` from :func:`chunk_dd0`."""
    B, Tp, H, K = k.shape
    V = do.shape[-1]
    NC = Tp // C
    BV = cfg.block_v or V
    dt = q.dtype
    dfinal = dfinal.astype(F32)
    kernel = functools.partial(
        _reverse_kernel, C=C, NC=NC, BV=BV, scale=scale, dt=dt, hp=u.f32_precision(interpret, dt)
    )
    extra = [] if seg is None else [seg.astype(jnp.int32)]
    return pl.pallas_call(
        u.with_seg(kernel, 11, seg is not None),
        out_shape=(
            jax.ShapeDtypeStruct((B, NC, H, K, V), dt),
            jax.ShapeDtypeStruct((B, Tp, H, V), dt),
            jax.ShapeDtypeStruct(dfinal.shape, F32),
        ),
        grid=(B, H, V // BV),
        in_specs=[pl.BlockSpec()] * (11 + len(extra)),
        out_specs=(pl.BlockSpec(),) * 3,
        input_output_aliases={10: 2},
        interpret=interpret,
        compiler_params=params(cfg),
        name="qdelta_reverse_state_pass",
    )(q, k, W, G, do, dD0.astype(dt), dfinal, reset.astype(jnp.int32),
      is_last.astype(jnp.int32), seq.astype(jnp.int32), dfinal, *extra)


# ----------------------------------------------------------------------------- 2. state-side


def _dqkw_kernel(
    q_ref, k_ref, G_ref, hin_ref, dhout_ref, do_ref, d_ref, dd_ref, seg_ref,
    dqp_ref, dkp_ref, dw_ref, dgp_ref, dps_ref, *, nv, BV, scale, dt, hp,
):
    C, BK = q_ref.shape

    def body(j, carry):
        doh, dkd, dw, hd, dP = carry
        vs = pl.ds(j * BV, BV)
        hin = hin_ref[:, vs]
        dho = dhout_ref[:, vs]
        do = do_ref[:, vs]
        d = d_ref[:, vs]
        doh = doh + u.dot(do, hin, tb=True, dt=dt, hp=hp)
        dkd = dkd + u.dot(d, dho, tb=True, dt=dt, hp=hp)
        dw = dw - u.dot(dd_ref[:, vs], hin, tb=True, dt=dt, hp=hp)
        hd = hd + jnp.sum(hin.astype(F32) * dho.astype(F32))
        # The output's intra-chunk term, from the same dO and D tiles: dP = dO D^T.
        dP = dP + u.dot(do, d, tb=True, dt=dt, hp=hp)
        return doh, dkd, dw, hd, dP

    z = jnp.zeros((C, BK), F32)
    doh, dkd, dw, hd, dP = lax.fori_loop(
        0, nv, body, (z, z, z, jnp.zeros((), F32), jnp.zeros((C, C), F32))
    )
    G = u.g_vec(G_ref[...], dt)
    seg = None if seg_ref is None else seg_ref[...]

    # dPs = scale dP o decay o causal, written once (by the first K tile).
    @pl.when(pl.program_id(3) == 0)
    def _():
        _, incl = u.masks(C)
        dps_ref[...] = scale * dP * u.decay(G, G, u.within(incl, seg))

    gC = G_ref[C - 1]
    gam = u.gam_of(G, seg)
    e = u.e_of(G, gC, seg)
    q = q_ref[...].astype(F32)
    k = k_ref[...].astype(F32)
    dqp_ref[...] = scale * gam[:, None] * doh
    dkp_ref[...] = e[:, None] * dkd
    dw_ref[...] = dw.astype(dw_ref.dtype)
    de = jnp.sum(dkd * k, axis=1) * e
    is_last = lax.broadcasted_iota(jnp.int32, (C,), 0) == C - 1
    dG = scale * gam * jnp.sum(doh * q, axis=1) - de
    dgp_ref[...] = dG + jnp.where(is_last, jnp.sum(de) + u.aC_of(gC, seg) * hd, 0.0)


def chunk_dqkw(q, k, G, h_in, dh_out, do, D, dD, seg=None, *, scale: float, C: int,
               cfg: StageConfig, interpret):
    """State-side gradient terms: ``dq_part, dk_part [B, Tp, H, K]`` float32, ``dW`` in the
    compute dtype, ``dG_part [B, Tp, H]`` float32 (summed over K tiles), and the output's
    intra-chunk term ``dPs = scale (dO D^T) o decay o causal [B, Tp, H, C]`` float32."""
    B, Tp, H, K = q.shape
    V = do.shape[-1]
    BK = cfg.block_k or K
    BV = cfg.block_v or V
    nk = K // BK
    dt = q.dtype
    kernel = functools.partial(
        _dqkw_kernel, nv=V // BV, BV=BV, scale=scale, dt=dt, hp=u.f32_precision(interpret, dt)
    )
    kspec = pl.BlockSpec((None, C, None, BK), lambda b, c, h, kk: (b, c, h, kk))
    vspec = spec_rows(C, V)
    sspec = pl.BlockSpec((None, None, None, BK, V), lambda b, c, h, kk: (b, c, h, kk, 0))
    extra, extra_specs = seg_args(seg, C)
    dqp, dkp, dW, dgp, dPs = pl.pallas_call(
        u.with_seg(kernel, 8, seg is not None),
        out_shape=(
            jax.ShapeDtypeStruct((B, Tp, H, K), F32),
            jax.ShapeDtypeStruct((B, Tp, H, K), F32),
            jax.ShapeDtypeStruct((B, Tp, H, K), dt),
            jax.ShapeDtypeStruct((nk, B, Tp, H), F32),
            jax.ShapeDtypeStruct((B, Tp, H, C), F32),
        ),
        grid=(B, Tp // C, H, nk),
        in_specs=[kspec, kspec, spec_rows(C, None), sspec, sspec, vspec, vspec, vspec]
        + extra_specs,
        out_specs=(
            kspec, kspec, kspec,
            pl.BlockSpec((None, None, C, None), lambda b, c, h, kk: (kk, b, c, h)),
            pl.BlockSpec((None, C, None, C), lambda b, c, h, kk: (b, c, h, 0)),
        ),
        interpret=interpret,
        compiler_params=params(cfg),
        name="qdelta_chunk_dqkw",
    )(q, k, G, h_in, dh_out, do, D, dD, *extra)
    return dqp, dkp, dW, jnp.sum(dgp, axis=0), dPs


# ----------------------------------------------------------------------------- 3. local grads


def _grads_v_kernel(
    q_ref, k_ref, v_ref, G_ref, b_ref, l_ref, t_ref, dd_ref, dw_ref, seg_ref,
    dv_ref, dbv_ref, da_ref, *, BV, dt, hp,
):
    C = q_ref.shape[0]
    strict, _ = u.masks(C)
    beta = b_ref[...].astype(F32)
    G = u.g_vec(G_ref[...], dt)
    X = k_ref[...].astype(F32) + l_ref[...].astype(F32)[:, None] * q_ref[...].astype(F32)
    bx = (beta * u.gam_of(G, None if seg_ref is None else seg_ref[...]))[:, None] * X
    T = t_ref[...]

    # By V tiles: dT = dW bx^T + dU (beta V)^T with dU = dD; dv = beta T^T dU.
    dT = u.dot(dw_ref[...], bx, tb=True, dt=dt, hp=hp)
    dbeta = jnp.zeros((C,), F32)
    for j in range(v_ref.shape[-1] // BV):
        vs = pl.ds(j * BV, BV)
        dD = dd_ref[:, vs]
        vf = v_ref[:, vs].astype(F32)
        dT = dT + u.dot(dD, beta[:, None] * vf, tb=True, dt=dt, hp=hp)
        dbv = u.dot(T, dD, ta=True, dt=dt, hp=hp)
        dv_ref[:, vs] = (beta[:, None] * dbv).astype(dv_ref.dtype)
        dbeta = dbeta + jnp.sum(dbv * vf, axis=1)
    dbv_ref[...] = dbeta
    # T = (I + A)^-1: dA = -T^T dT T^T (float32), strictly lower.
    dA = -u.dot(u.dot(T, dT, ta=True, hp=hp), T, tb=True, hp=hp)
    da_ref[...] = jnp.where(strict, dA, 0.0)


def _grads_k_phase1(dps_ref, da_ref, dbv_ref, QK, Rd, A, G, beta, lam, strict, seg):
    """The [C, C] part of the K-side gradients, shared by both K-side kernels. G enters the
    output through Q K^T o decay and A = beta_i (X K^T) o decay (strictly lower). X = k + lam q
    never lives as a [C, K] float32 tile: with dX = dR k + bg dbx,
      dq = dqp + dPs k + lam dX          = dqp + M k + lam bg dbx,          M = dPs + lam dR
      dk = dkp + dR^T X + dPs^T q + dX   = dkp + (dR + dR^T) k + M^T q + bg dbx
      dlam_i = dX_i . q_i                = sum_j dR_ij (QK)_ij + bg_i dbx_i . q_i
    Returns the [C] partial ``dG``, ``dbeta``, ``dlam`` and the [C, C] ``M`` and ``S = dR + dR^T``.
    """
    dPs = dps_ref[...]
    ZP = dPs * QK
    dG = jnp.sum(ZP, axis=1) - jnp.sum(ZP, axis=0)
    dA = da_ref[...]
    ZA = dA * A
    dG = dG + jnp.sum(ZA, axis=1) - jnp.sum(ZA, axis=0)
    dbeta = dbv_ref[...] + jnp.sum(dA * Rd, axis=1)
    dR = dA * beta[:, None] * u.decay(G, G, u.within(strict, seg))
    dl = jnp.sum(dR * QK, axis=1)
    return dG, dbeta, dl, dPs + lam[:, None] * dR, dR + dR.T


def _k_side_tiles(q_ref, k_ref, G_ref, b_ref, l_ref, seg_ref, dt, hp):
    """What both K-side kernels start from: the strict mask, ``q, k``, float32 ``beta, lam,
    G``, the document ids (or None), ``Rd, A`` (:func:`qdelta_jax.pallas._util.local`) and
    ``Q K^T``."""
    strict, _ = u.masks(q_ref.shape[0])
    q, k = q_ref[...], k_ref[...]
    beta = b_ref[...].astype(F32)
    lam = l_ref[...].astype(F32)
    G = u.g_vec(G_ref[...], dt)
    seg = None if seg_ref is None else seg_ref[...]
    Rd, A = u.local(q, k, G, beta, lam, dt, hp, seg)
    QK = u.dot(q, k, tb=True, dt=dt, hp=hp)
    return strict, q, k, beta, lam, G, seg, Rd, A, QK


def _grads_k_kernel(
    q_ref, k_ref, G_ref, b_ref, l_ref, t_ref, dw_ref, dps_ref, da_ref, dbv_ref, dqp_ref,
    dkp_ref, dgp_ref, seg_ref, dq_ref, dk_ref, dg_ref, db_ref, dl_ref, *, dt, hp,
):
    strict, q, k, beta, lam, G, seg, Rd, A, QK = _k_side_tiles(q_ref, k_ref, G_ref, b_ref,
                                                               l_ref, seg_ref, dt, hp)
    gam = u.gam_of(G, seg)
    bg = beta * gam

    # Phase 1, [C, C] tiles only.
    dG, dbeta, dl, M, S = _grads_k_phase1(dps_ref, da_ref, dbv_ref, QK, Rd, A, G, beta, lam,
                                          strict, seg)

    # Phase 2. W = T (beta gamma X): dbx = T^T dW. q and k are loaded again after a store
    # (not kept live from phase 1); dbx is not kept live either: its row terms in dq and dk
    # are one more matmul each, (T diag(s))^T dW = diag(s) dbx.
    db_ref[...] = dbeta
    q, k = q_ref[...], k_ref[...]
    T = t_ref[...]
    dW = dw_ref[...]
    dbx = u.dot(T, dW, ta=True, dt=dt, hp=hp)
    bxq = jnp.sum(dbx * q.astype(F32), axis=1)
    bxX = jnp.sum(dbx * k.astype(F32), axis=1) + lam * bxq
    db_ref[...] = dbeta + gam * bxX
    dG = dG + bg * bxX
    dl_ref[...] = dl + bg * bxq
    dq = (dqp_ref[...] + u.dot(M, k, dt=dt, hp=hp)
          + u.dot(T * (lam * bg)[None, :], dW, ta=True, dt=dt, hp=hp))
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk = (
        dkp_ref[...] + u.dot(S, k, dt=dt, hp=hp) + u.dot(M, q, ta=True, dt=dt, hp=hp)
        + u.dot(T * bg[None, :], dW, ta=True, dt=dt, hp=hp)
    )
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dg_ref[...] = dG + dgp_ref[...]


def _grads_k_split_kernel(
    q_ref, k_ref, G_ref, b_ref, l_ref, t_ref, dw_ref, dps_ref, da_ref, dbv_ref, dqp_ref,
    dkp_ref, dgp_ref, seg_ref, dq_ref, dk_ref, dg_ref, db_ref, dl_ref, *, BK, dt, hp,
):
    """:func:`_grads_k_kernel` by K slices of BK (for float32 at K 256, whose whole-K operands
    do not fit shared memory); the same algebra, summed or written slice by slice."""
    C, K = q_ref.shape
    nk = K // BK
    strict, _ = u.masks(C)
    beta = b_ref[...].astype(F32)
    lam = l_ref[...].astype(F32)
    G = u.g_vec(G_ref[...], dt)
    seg = None if seg_ref is None else seg_ref[...]
    gam = u.gam_of(G, seg)
    bg = beta * gam

    # Phase 1, [C, C] tiles only: Q K^T and Rd = (X K^T) o decay (strictly lower),
    # X = k + lam q, summed over the K slices; A = beta_i Rd.
    QK = XK = None
    for kk in range(nk):
        ks = pl.ds(kk * BK, BK)
        q, k = q_ref[:, ks], k_ref[:, ks]
        X = k.astype(F32) + lam[:, None] * q.astype(F32)
        qk = u.dot(q, k, tb=True, dt=dt, hp=hp)
        xk = u.dot(X, k, tb=True, dt=dt, hp=hp)
        QK = qk if QK is None else QK + qk
        XK = xk if XK is None else XK + xk
    Rd = XK * u.decay(G, G, u.within(strict, seg))
    A = beta[:, None] * Rd
    dG, dbeta, dl, M, S = _grads_k_phase1(dps_ref, da_ref, dbv_ref, QK, Rd, A, G, beta, lam,
                                          strict, seg)

    # Phase 2, by K slices. W = T (beta gamma X): dbx = T^T dW; its row terms in dq and dk are
    # one more matmul each, (T diag(s))^T dW = diag(s) dbx. q and k are loaded again after a
    # store (not kept live from phase 1).
    db_ref[...] = dbeta
    T = t_ref[...]
    bxq = bxk = None
    for kk in range(nk):
        ks = pl.ds(kk * BK, BK)
        q, k = q_ref[:, ks], k_ref[:, ks]
        dW = dw_ref[:, ks]
        dbx = u.dot(T, dW, ta=True, dt=dt, hp=hp)
        sq = jnp.sum(dbx * q.astype(F32), axis=1)
        sk = jnp.sum(dbx * k.astype(F32), axis=1)
        bxq = sq if bxq is None else bxq + sq
        bxk = sk if bxk is None else bxk + sk
        dq = (dqp_ref[:, ks] + u.dot(M, k, dt=dt, hp=hp)
              + u.dot(T * (lam * bg)[None, :], dW, ta=True, dt=dt, hp=hp))
        dq_ref[:, ks] = dq.astype(dq_ref.dtype)
        dk = (
            dkp_ref[:, ks] + u.dot(S, k, dt=dt, hp=hp) + u.dot(M, q, ta=True, dt=dt, hp=hp)
            + u.dot(T * bg[None, :], dW, ta=True, dt=dt, hp=hp)
        )
        dk_ref[:, ks] = dk.astype(dk_ref.dtype)
    bxX = bxk + lam * bxq
    db_ref[...] = dbeta + gam * bxX
    dG = dG + bg * bxX
    dl_ref[...] = dl + bg * bxq
    dg_ref[...] = dG + dgp_ref[...]


def _grads_k_phase1_kernel(q_ref, k_ref, G_ref, b_ref, l_ref, dps_ref, da_ref, dbv_ref, seg_ref,
                           m_ref, s_ref, dg_ref, db_ref, dl_ref, *, dt, hp):
    """The ``[C, C]`` part of :func:`_grads_k_kernel` alone: ``M``, ``S`` (compute dtype, as
    the K-side kernel rounds them for its matmuls) and the partial ``dG, dbeta, dlam``."""
    strict, _, _, beta, lam, G, seg, Rd, A, QK = _k_side_tiles(q_ref, k_ref, G_ref, b_ref,
                                                               l_ref, seg_ref, dt, hp)
    dG, dbeta, dl, M, S = _grads_k_phase1(dps_ref, da_ref, dbv_ref, QK, Rd, A, G, beta, lam,
                                          strict, seg)
    m_ref[...] = M.astype(m_ref.dtype)
    s_ref[...] = S.astype(s_ref.dtype)
    dg_ref[...] = dG
    db_ref[...] = dbeta
    dl_ref[...] = dl


def chunk_grads_k_phase1(q, k, G, beta, lam, dPs, dA, dbv, seg=None, *, C: int,
                         cfg: StageConfig, interpret):
    """The ``[C, C]`` half of the K-side local gradients (the products of the other half run
    on Mosaic GPU, :func:`qdelta_jax.pallas.mosaic_backward.grads_k_products`): ``M = dPs +
    lam dR`` and ``S = dR + dR^T`` ``[B, Tp, H, C]`` in the compute dtype and the partial
    ``dG, dbeta, dlam [B, Tp, H]`` float32, from ``dPs`` (:func:`chunk_dqkw`), ``dA`` and the
    V part of ``dbeta`` (``chunk_grads``' V side)."""
    B, Tp, H, K = q.shape
    dt = q.dtype
    hp = u.f32_precision(interpret, dt)
    ks, ss, cs = spec_rows(C, K), spec_rows(C, None), spec_rows(C, C)
    extra, extra_specs = seg_args(seg, C)
    vec = jax.ShapeDtypeStruct((B, Tp, H), F32)
    return pl.pallas_call(
        u.with_seg(functools.partial(_grads_k_phase1_kernel, dt=dt, hp=hp), 8, seg is not None),
        out_shape=(jax.ShapeDtypeStruct((B, Tp, H, C), dt),
                   jax.ShapeDtypeStruct((B, Tp, H, C), dt), vec, vec, vec),
        grid=(B, Tp // C, H),
        in_specs=[ks, ks, ss, ss, ss, cs, cs, ss] + extra_specs,
        out_specs=(cs, cs, ss, ss, ss),
        interpret=interpret,
        compiler_params=params(cfg),
        name="qdelta_chunk_grads_k_phase1",
    )(q, k, G, beta, lam, dPs, dA, dbv, *extra)


def chunk_gamma(G, seg, C: int):
    """``gamma = exp(G)`` ``[B, Tp, H]`` float32 as the kernels form it per chunk
    (:func:`qdelta_jax.pallas._util.gam_of`): zero past the chunk's first document."""
    return xla._merge(xla.gates(xla._split(G.astype(F32), C), xla._seg_split(seg, C)).gam)


def grads_k_finish(gam, bg, lam, bxq, bxk, dG1, db1, dl1, dG_part):
    """``dg, dbeta, dlam`` of the K side from the phase-1 partials and the row sums
    ``bxq = dbx . q``, ``bxk = dbx . k`` (``dbx = T^T dW``), as :func:`_grads_k_kernel` ends;
    ``gam`` (:func:`chunk_gamma`), ``bg = beta gam``. All ``[B, Tp, H]`` float32."""
    bxX = bxk + lam * bxq
    return dG1 + bg * bxX + dG_part, db1 + gam * bxX, dl1 + bg * bxq


def grads_k_products_xla(q, k, Tinv, dW, M, S, dq_part, dk_part, lbg, bg):
    """The oracle of :func:`qdelta_jax.pallas.mosaic_backward.grads_k_products` in XLA, with
    its rounding: ``dbx = T^T dW`` (``T`` in the compute dtype), ``dq = dq_part + M k +
    lbg dbx``, ``dk = dk_part + S k + M^T q + bg dbx`` (compute dtype) and the row sums
    ``dbx . q``, ``dbx . k`` (float32). ``[B, Tp, H, *]`` layouts; ``lbg = lam beta gamma``,
    ``bg = beta gamma`` ``[B, Tp, H]``."""
    C = Tinv.shape[-1]
    dt = q.dtype
    sp, mm = (lambda x: xla._split(x, C)), (lambda eq, a, b: xla._mm(eq, a, b, dt))  # noqa: E731
    qc, kc, Tc, dWc, Mc, Sc = (sp(x) for x in (q, k, Tinv, dW, M, S))
    dbx = mm("...ji,...jk->...ik", Tc, dWc)
    dq = sp(dq_part) + mm("...ij,...jk->...ik", Mc, kc) + sp(lbg)[..., None] * dbx
    dk = (sp(dk_part) + mm("...ij,...jk->...ik", Sc, kc) + mm("...ji,...jk->...ik", Mc, qc)
          + sp(bg)[..., None] * dbx)
    sq = jnp.sum(dbx * qc.astype(F32), axis=-1)
    sk = jnp.sum(dbx * kc.astype(F32), axis=-1)
    return (xla._merge(dq).astype(dt), xla._merge(dk).astype(dt), xla._merge(sq),
            xla._merge(sk))


def grads_v_from_d_xla(v, Tinv, dD, do, D, G, beta, seg=None, *, scale: float):
    """The oracle of :func:`qdelta_jax.pallas.mosaic_backward.grads_v_from_d` in XLA, with its
    rounding (product operands in the compute dtype, ``dA`` from float32 ``T``): ``dv = beta
    T^T dD``, ``sum_v (T^T dD) o V``, ``dA = -T^T (dD D^T)`` (strictly lower), ``dPs = scale
    (dO D^T) o decay o causal`` (within documents, ``seg [B, Tp]``) and ``T`` in the compute
    dtype."""
    C = Tinv.shape[-1]
    dt = v.dtype
    sp, mm = (lambda x: xla._split(x, C)), (lambda eq, a, b: xla._mm(eq, a, b, dt))  # noqa: E731
    vc, Tc, dDc, doc, Dc = (sp(x) for x in (v, Tinv, dD, do, D))
    Gc = sp(G.astype(F32))
    strict, incl = xla._masks(C)
    dbv = mm("...ji,...jv->...iv", Tc, dDc)
    dA = -jnp.einsum("...ji,...jk->...ik", Tc, mm("...iv,...jv->...ij", dDc, Dc),
                     precision=lax.Precision.HIGHEST)
    dA = jnp.where(strict, dA, 0.0)
    within = xla._within(incl, xla.gates(Gc, xla._seg_split(seg, C)))
    dPs = scale * mm("...iv,...jv->...ij", doc, Dc) * xla._decay(Gc, within)
    return (xla._merge(sp(beta.astype(F32))[..., None] * dbv).astype(dt),
            xla._merge(jnp.sum(dbv * vc.astype(F32), -1)), xla._merge(dA), xla._merge(dPs),
            Tinv.astype(dt))


def dqkw_products_ref(q, k, G, h_in, dh_out, do, D, dD, Tb, M, S, lbg, bg, seg=None, *,
                      scale: float, C: int = 64, cfg: StageConfig | None = None,
                      interpret: bool = False):
    """The contract of :func:`qdelta_jax.pallas.mosaic_backward.dqkw_products` by its two
    unfused parts: the Triton :func:`chunk_dqkw` and :func:`grads_k_products_xla`. Returns
    ``dq, dk``, the state-side ``dG`` part and the row sums ``dbx . q``, ``dbx . k``."""
    dqp, dkp, dW, dGp, _ = chunk_dqkw(q, k, G, h_in, dh_out, do, D, dD, seg, scale=scale, C=C,
                                      cfg=cfg or StageConfig(num_warps=4), interpret=interpret)
    dq, dk, sq, sk = grads_k_products_xla(q, k, Tb, dW, M, S, dqp, dkp, lbg, bg)
    return dq, dk, dGp, sq, sk


def local_grads_from_d(q, k, v, G, beta, lam, Tinv, h_in, dh_out, do, D, dD, seg=None, *,
                       scale: float, C: int, cfg_k: StageConfig, interpret, v_side, dqkw_k):
    """The backward after the reverse pass with the state-side gradients and the K side's
    products in one kernel: ``v_side`` (the contract of :func:`grads_v_from_d_xla`: ``dv``,
    the V part of ``dbeta``, ``dA`` and ``dPs`` from ``D`` rather than ``dW``), then the K
    side's ``[C, C]`` part (:func:`chunk_grads_k_phase1`), then ``dqkw_k`` (the contract of
    :func:`dqkw_products_ref`). Returns ``dq, dk, dv`` in the input dtypes and ``dg, dbeta,
    dlam`` float32. ``seg``: document ids of packed rows, or None."""
    beta32 = beta.astype(F32)
    dv, dbv, dA, dPs, Tb = v_side(v, Tinv, dD, do, D, G, beta32, seg, scale=scale)
    M, S, dG1, db1, dl1 = chunk_grads_k_phase1(q, k, G, beta, lam, dPs, dA, dbv, seg, C=C,
                                               cfg=cfg_k, interpret=interpret)
    gam = chunk_gamma(G, seg, C)
    bg = beta32 * gam
    dq, dk, dGp, sq, sk = dqkw_k(q, k, G, h_in, dh_out, do, D, dD, Tb, M, S, lam * bg, bg, seg,
                                 scale=scale)
    dg, db, dl = grads_k_finish(gam, bg, lam, sq, sk, dG1, db1, dl1, dGp)
    return dq, dk, dv, dg, db, dl


def _grads_v_launch(q, k, v, G, beta, lam, Tinv, dD, dW, seg, *, C: int, cfg: StageConfig,
                    interpret):
    """The Triton launch of :func:`chunk_grads`' V side: ``dv``, the V part of ``dbeta`` and
    ``dA``, from ``G`` and the document ids."""
    B, Tp, H, K = q.shape
    V = v.shape[-1]
    dt = q.dtype
    hp = u.f32_precision(interpret, dt)
    ks, vs, ss, cs = spec_rows(C, K), spec_rows(C, V), spec_rows(C, None), spec_rows(C, C)
    extra, extra_specs = seg_args(seg, C)
    return pl.pallas_call(
        u.with_seg(functools.partial(_grads_v_kernel, BV=cfg.block_v or V, dt=dt, hp=hp), 9,
                   seg is not None),
        out_shape=(
            jax.ShapeDtypeStruct((B, Tp, H, V), v.dtype),
            jax.ShapeDtypeStruct((B, Tp, H), F32),
            jax.ShapeDtypeStruct((B, Tp, H, C), F32),
        ),
        grid=(B, Tp // C, H),
        in_specs=[ks, ks, vs, ss, ss, ss, cs, vs, ks] + extra_specs,
        out_specs=(vs, ss, cs),
        interpret=interpret,
        compiler_params=params(cfg),
        name="qdelta_chunk_grads_v",
    )(q, k, v, G, beta, lam, Tinv, dD, dW, *extra)


def chunk_grads(q, k, v, G, beta, lam, Tinv, dD, dW, dq_part, dk_part, dG_part, dPs, seg=None,
                *, C: int, cfg: StageConfig, interpret, cfg_k: StageConfig | None = None,
                k_products=None):
    """All local gradients (the counterpart of :func:`qdelta_jax.xla.chunk_grads`, given the
    state-side terms and ``dPs`` of :func:`chunk_dqkw` and ``Tinv = (I + A)^-1 [B, Tp, H, C]``
    from ``forward.chunk_local``). Returns ``dq, dk, dv`` in the input dtypes
    and ``dg, dbeta, dlam`` float32, on the padded layout.

    Two launches, so that each holds few tiles live: the V side (``cfg``, loop over V tiles:
    ``dv``, the V part of ``dbeta`` and ``dA = -T^T dT T^T`` as ``[B, Tp, H, C]`` float32),
    then the K side (``cfg_k``: everything through ``A``, ``W`` and ``X``). ``k_products``:
    the K side as :func:`chunk_grads_k_phase1` and then this function, with the contract of
    :func:`grads_k_products_xla` (the Mosaic GPU kernel
    :func:`qdelta_jax.pallas.mosaic_backward.grads_k_products`, or that oracle)."""
    B, Tp, H, K = q.shape
    ks, ss, cs = spec_rows(C, K), spec_rows(C, None), spec_rows(C, C)
    dt = q.dtype
    hp = u.f32_precision(interpret, dt)
    bk_k = (cfg_k or cfg).block_k or K
    extra, extra_specs = seg_args(seg, C)
    dv, dbv, dA = _grads_v_launch(q, k, v, G, beta, lam, Tinv, dD, dW, seg, C=C, cfg=cfg,
                                  interpret=interpret)
    if k_products is not None:
        gam = chunk_gamma(G, seg, C)
        bg = beta.astype(F32) * gam
        M, S, dG1, db1, dl1 = chunk_grads_k_phase1(q, k, G, beta, lam, dPs, dA, dbv, seg, C=C,
                                                   cfg=cfg_k or cfg, interpret=interpret)
        dq, dk, bxq, bxk = k_products(q, k, Tinv, dW, M, S, dq_part, dk_part, lam * bg, bg)
        dg, db, dl = grads_k_finish(gam, bg, lam, bxq, bxk, dG1, db1, dl1, dG_part)
        return dq, dk, dv, dg, db, dl
    dq, dk, dg, db, dl = pl.pallas_call(
        u.with_seg(functools.partial(_grads_k_kernel, dt=dt, hp=hp) if bk_k == K
                   else functools.partial(_grads_k_split_kernel, BK=bk_k, dt=dt, hp=hp), 13,
                   seg is not None),
        out_shape=(
            jax.ShapeDtypeStruct((B, Tp, H, K), q.dtype),
            jax.ShapeDtypeStruct((B, Tp, H, K), k.dtype),
            jax.ShapeDtypeStruct((B, Tp, H), F32),
            jax.ShapeDtypeStruct((B, Tp, H), F32),
            jax.ShapeDtypeStruct((B, Tp, H), F32),
        ),
        grid=(B, Tp // C, H),
        in_specs=[ks, ks, ss, ss, ss, cs, ks, cs, cs, ss, ks, ks, ss] + extra_specs,
        out_specs=(ks, ks, ss, ss, ss),
        interpret=interpret,
        compiler_params=params(cfg_k or cfg),
        name="qdelta_chunk_grads_k",
    )(q, k, G, beta, lam, Tinv, dW, dPs, dA, dbv, dq_part, dk_part, dG_part, *extra)
    return dq, dk, dv, dg, db, dl
