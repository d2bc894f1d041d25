"""Forward kernels of the chunked Q-Delta op (docs/MATH.md section 2), Pallas with the Triton
lowering.

Four launches, on the padded layout of :mod:`qdelta_jax.xla` (``[B, Tp, H, *]``, Tp = NC C),
given ``G``, the cumulative log decay within each chunk (computed once by XLA, see
:mod:`.core`):

1. :func:`chunk_solve`, parallel over (batch, chunk, head): ``A`` by 16 x 16 blocks and
   ``T = (I + A)^-1`` in registers (see :mod:`._util`), written as float32.
2. :func:`chunk_wu`, parallel over (batch, chunk, head): ``W = T (beta gamma X)`` and
   ``U = T (beta V)`` as whole-chunk matmuls, written in the compute dtype.
3. :func:`state_pass`, one program per (batch row, head, V tile) looping over the chunks with
   the float32 state ``[K, BV]`` in registers: it resets to ``h0[seq]`` where a sequence starts,
   writes the chunk-entry state ``h_in`` and the writes ``D = U - W h``, and stores the final
   state of each sequence at its last chunk.
4. :func:`chunk_output`, parallel over (batch, chunk, head, V tile):
   ``O = scale ((gamma Q) h_in + (Q K^T o decay o causal) D)``.

Why not fuse the output into the state pass: the pass has only ``B H V / BV`` programs and is
latency bound; the output needs ``Q K^T`` (a ``[C, K] x [K, C]`` product independent of the
state), which a fused pass would recompute per V tile on its critical path. Three launches
read ``h_in`` and ``D`` back once from HBM instead, in a fully parallel kernel.

Every intermediate that crosses HBM is in the compute dtype, as the XLA path rounds it before
its next matmul; states, ``G`` and the solve stay float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from qdelta_jax.pallas import _util as u
from qdelta_jax.pallas._util import params, seg_args, spec_rows
from qdelta_jax.pallas.config import StageConfig

F32 = jnp.float32


# ----------------------------------------------------------------------------- 1. local


def _solve_kernel(q_ref, k_ref, G_ref, b_ref, l_ref, seg_ref, t_ref, *, BK, dt, hp):
    C, K = q_ref.shape
    nb = C // u.S
    Gs = [G_ref[u.rows(b)] for b in range(nb)]
    segs = [None if seg_ref is None else seg_ref[u.rows(b)] for b in range(nb)]
    beta = [b_ref[u.rows(b)].astype(F32) for b in range(nb)]
    lam = [l_ref[u.rows(b)].astype(F32) for b in range(nb)]
    # The blocks of X K^T on and below the diagonal (X = k + lam q), summed over K slices.
    acc = {}
    for kk in range(K // BK):
        ks = pl.ds(kk * BK, BK)
        kt = [k_ref[u.rows(c), ks] for c in range(nb)]
        for b in range(nb):
            x = kt[b].astype(F32) + lam[b][:, None] * q_ref[u.rows(b), ks].astype(F32)
            for c in range(b + 1):
                p = u.dot(x, kt[c], tb=True, dt=dt, hp=hp)
                acc[b, c] = p if kk == 0 else acc[b, c] + p
    strict, _ = u.masks(u.S)
    A = {(b, c): beta[b][:, None] * acc[b, c]
         * u.decay(Gs[b], Gs[c], u.within(strict if b == c else None, segs[b], segs[c]))
         for b in range(nb) for c in range(b + 1)}
    T = u.solve_blocks(A, nb, hp)
    z = jnp.zeros((u.S, u.S), F32)
    for b in range(nb):
        for c in range(nb):
            t_ref[u.rows(b), u.rows(c)] = (T[b, c] if c <= b else z).astype(t_ref.dtype)


def chunk_solve(q, k, G, beta, lam, seg=None, *, C: int, cfg: StageConfig, interpret: bool,
                t_dtype=F32):
    """``T = (I + A)^-1`` as ``[B, Tp, H, C]`` (row i of the chunk's ``T`` at token i), with
    ``A_ij = beta_i (x_i . k_j) exp(G_i - G_j)`` (i > j, else 0): one program per (batch,
    chunk, head) computes the 16 x 16 blocks of ``A`` by K slices of ``cfg.block_k`` and inverts
    them in registers (:func:`._util.solve_blocks`). ``t_dtype``: float32 where the backward
    reads ``T``; the compute dtype where only :func:`chunk_wu` does (it rounds ``T`` to that
    dtype before its matmuls, so W and U are the same bit for bit, for half the bytes)."""
    B, Tp, H, K = q.shape
    dt = q.dtype
    kernel = functools.partial(_solve_kernel, BK=min(cfg.block_k or K, K), dt=dt,
                               hp=u.f32_precision(interpret, dt))
    extra, extra_specs = seg_args(seg, C)
    return pl.pallas_call(
        u.with_seg(kernel, 5, seg is not None),
        out_shape=jax.ShapeDtypeStruct((B, Tp, H, C), t_dtype),
        grid=(B, Tp // C, H),
        in_specs=[spec_rows(C, K), spec_rows(C, K)] + [spec_rows(C, None)] * 3 + extra_specs,
        out_specs=spec_rows(C, C),
        interpret=interpret,
        compiler_params=params(cfg),
        name="qdelta_chunk_solve",
    )(q, k, G, beta, lam, *extra)


def _wu_kernel(q_ref, k_ref, v_ref, G_ref, b_ref, l_ref, t_ref, seg_ref, w_ref, u_ref, *, BK, BV,
               dt, hp):
    K, V = q_ref.shape[-1], v_ref.shape[-1]
    T = t_ref[...].astype(dt)
    beta = b_ref[...].astype(F32)
    bg = beta * u.gam_of(G_ref[...], None if seg_ref is None else seg_ref[...])
    lam = l_ref[...].astype(F32)
    for kk in range(K // BK):  # W = T (beta gamma X)
        ks = pl.ds(kk * BK, BK)
        x = k_ref[:, ks].astype(F32) + lam[:, None] * q_ref[:, ks].astype(F32)
        w_ref[:, ks] = u.dot(T, bg[:, None] * x, dt=dt, hp=hp).astype(w_ref.dtype)
    for j in range(V // BV):  # U = T (beta V)
        vs = pl.ds(j * BV, BV)
        bv = beta[:, None] * v_ref[:, vs].astype(F32)
        u_ref[:, vs] = u.dot(T, bv, dt=dt, hp=hp).astype(u_ref.dtype)


def chunk_wu(q, k, v, G, beta, lam, Tinv, seg=None, *, C: int, cfg: StageConfig,
             interpret: bool):
    """``W = T (beta gamma X) [B, Tp, H, K]`` and ``U = T (beta V) [B, Tp, H, V]`` in the
    compute dtype: whole-chunk matmuls by K and V tiles (``cfg.block_k``, ``cfg.block_v``)."""
    B, Tp, H, K = q.shape
    V = v.shape[-1]
    dt = q.dtype
    kernel = functools.partial(
        _wu_kernel, BK=min(cfg.block_k or K, K), BV=min(cfg.block_v or V, V), dt=dt,
        hp=u.f32_precision(interpret, dt),
    )
    extra, extra_specs = seg_args(seg, C)
    return pl.pallas_call(
        u.with_seg(kernel, 7, seg is not None),
        out_shape=(jax.ShapeDtypeStruct((B, Tp, H, K), dt),
                   jax.ShapeDtypeStruct((B, Tp, H, V), dt)),
        grid=(B, Tp // C, H),
        in_specs=[spec_rows(C, K), spec_rows(C, K), spec_rows(C, V)]
        + [spec_rows(C, None)] * 3 + [spec_rows(C, C)] + extra_specs,
        out_specs=(spec_rows(C, K), spec_rows(C, V)),
        interpret=interpret,
        compiler_params=params(cfg),
        name="qdelta_chunk_wu",
    )(q, k, v, G, beta, lam, Tinv, *extra)


def chunk_local(q, k, v, G, beta, lam, seg=None, *, C: int, cfg: StageConfig, interpret: bool,
                cfg_solve: StageConfig | None = None, t_float32: bool = True):
    """``W [B, Tp, H, K]`` and ``U [B, Tp, H, V]`` in ``q``'s dtype and ``T = (I + A)^-1`` as
    ``[B, Tp, H, C]``, which the backward hands to :func:`backward.chunk_grads` instead of
    solving twice: float32, or with ``t_float32=False`` (no backward reads it) in ``q``'s
    dtype. Two launches: :func:`chunk_solve` (``cfg_solve``), then :func:`chunk_wu` (``cfg``).
    (One launch forming ``W, U`` from the register blocks of ``T`` by 16-row blocks was slower
    on an H200: forward 1.40 against 0.96 ms at the 340M layer.)"""
    Tinv = chunk_solve(q, k, G, beta, lam, seg, C=C, cfg=cfg_solve or cfg, interpret=interpret,
                       t_dtype=F32 if t_float32 else q.dtype)
    W, U = chunk_wu(q, k, v, G, beta, lam, Tinv, seg, C=C, cfg=cfg, interpret=interpret)
    return W, U, Tinv


# ----------------------------------------------------------------------------- 2. state pass


def _state_kernel(
    k_ref, w_ref, u_ref, G_ref, h0_ref, reset_ref, last_ref, seq_ref, _fin_in, seg_ref,
    hin_ref, d_ref, fin_ref, *, C, NC, BV, dt, hp,
):
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    vs = pl.ds(j * BV, BV)
    K = k_ref.shape[-1]

    def body(c, state):
        seq = seq_ref[b, c]
        state = lax.cond(
            reset_ref[b, c] != 0, lambda: h0_ref[seq, h, :, vs].astype(F32), lambda: state
        )
        hin_ref[b, c, h, :, vs] = state.astype(dt)
        t = pl.ds(c * C, C)
        G = G_ref[b, t, h]
        gC = G_ref[b, c * C + C - 1, h]
        seg = None if seg_ref is None else seg_ref[b, t]
        D = u_ref[b, t, h, vs].astype(F32) - u.dot(w_ref[b, t, h, :], state, dt=dt, hp=hp)
        d_ref[b, t, h, vs] = D.astype(dt)
        kd = k_ref[b, t, h, :].astype(F32) * u.e_of(G, gC, seg)[:, None]
        state = u.aC_of(gC, seg) * state + u.dot(kd, D, ta=True, dt=dt, hp=hp)

        @pl.when(last_ref[b, c] != 0)
        def _():
            fin_ref[seq, h, :, vs] = state

        return state

    lax.fori_loop(0, NC, body, jnp.zeros((K, BV), F32))


def state_pass(k, G, W, U, h0, reset, is_last, seq, seg=None, *, C: int, cfg: StageConfig,
               interpret):
    """Returns ``h_in [B, NC, H, K, V]`` (compute dtype), ``D [B, Tp, H, V]`` (compute dtype)
    and ``final [N, H, K, V]`` float32 (``h0`` for sequences that own no chunk)."""
    B, Tp, H, K = k.shape
    V = U.shape[-1]
    NC = Tp // C
    BV = cfg.block_v or V
    dt = k.dtype
    kernel = functools.partial(
        _state_kernel, C=C, NC=NC, BV=BV, dt=dt, hp=u.f32_precision(interpret, dt)
    )
    h0 = h0.astype(F32)
    extra = [] if seg is None else [seg.astype(jnp.int32)]
    return pl.pallas_call(
        u.with_seg(kernel, 9, seg is not None),
        out_shape=(
            jax.ShapeDtypeStruct((B, NC, H, K, V), dt),
            jax.ShapeDtypeStruct((B, Tp, H, V), dt),
            jax.ShapeDtypeStruct(h0.shape, F32),
        ),
        grid=(B, H, V // BV),
        in_specs=[pl.BlockSpec()] * (9 + len(extra)),
        out_specs=(pl.BlockSpec(),) * 3,
        # ``final`` starts as h0: sequences that own no chunk (empty in cu_seqlens) keep it.
        input_output_aliases={8: 2},
        interpret=interpret,
        compiler_params=params(cfg),
        name="qdelta_state_pass",
    )(k, W, U, G, h0, reset.astype(jnp.int32), is_last.astype(jnp.int32), seq.astype(jnp.int32),
      h0, *extra)


# ----------------------------------------------------------------------------- 3. output


def _output_kernel(q_ref, k_ref, G_ref, hin_ref, d_ref, seg_ref, o_ref, *, scale, BK, dt, hp):
    C, K = q_ref.shape
    _, incl = u.masks(C)
    G = u.g_vec(G_ref[...], dt)
    seg = None if seg_ref is None else seg_ref[...]
    incl = u.within(incl, seg)
    if BK == K:
        q = q_ref[...]
        P = u.dot(q, k_ref[...], tb=True, dt=dt, hp=hp) * u.decay(G, G, incl)
        qg = q.astype(F32) * u.gam_of(G, seg)[:, None]
        o = u.dot(qg, hin_ref[...], dt=dt, hp=hp) + u.dot(P, d_ref[...], dt=dt, hp=hp)
    else:  # by K slices (float32 at K 256: whole-K operands do not fit shared memory)
        gam = u.gam_of(G, seg)[:, None]
        P = o = None
        for kk in range(K // BK):
            ks = pl.ds(kk * BK, BK)
            q = q_ref[:, ks]
            p = u.dot(q, k_ref[:, ks], tb=True, dt=dt, hp=hp)
            oq = u.dot(q.astype(F32) * gam, hin_ref[ks, :], dt=dt, hp=hp)
            P = p if P is None else P + p
            o = oq if o is None else o + oq
        o = o + u.dot(P * u.decay(G, G, incl), d_ref[...], dt=dt, hp=hp)
    o_ref[...] = (scale * o).astype(o_ref.dtype)


def chunk_output(q, k, G, h_in, D, seg=None, *, scale: float, out_dtype, C: int,
                 cfg: StageConfig, interpret):
    """``O [B, Tp, H, V]`` in ``out_dtype``."""
    B, Tp, H, K = q.shape
    V = D.shape[-1]
    BV = cfg.block_v or V
    dt = q.dtype
    kernel = functools.partial(
        _output_kernel, scale=scale, BK=cfg.block_k or K, dt=dt,
        hp=u.f32_precision(interpret, dt),
    )
    vspec = pl.BlockSpec((None, C, None, BV), lambda b, c, h, j: (b, c, h, j))
    extra, extra_specs = seg_args(seg, C)
    return pl.pallas_call(
        u.with_seg(kernel, 5, seg is not None),
        out_shape=jax.ShapeDtypeStruct((B, Tp, H, V), out_dtype),
        grid=(B, Tp // C, H, V // BV),
        in_specs=[
            spec_rows(C, K), spec_rows(C, K), spec_rows(C, None),
            pl.BlockSpec((None, None, None, K, BV), lambda b, c, h, j: (b, c, h, 0, j)),
            vspec,
        ] + extra_specs,
        out_specs=vspec,
        interpret=interpret,
        compiler_params=params(cfg),
        name="qdelta_chunk_output",
    )(q, k, G, h_in, D, *extra)
