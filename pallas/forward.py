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


def _chunk_inverse(q_ref, k_ref, Gs, segs, beta, lam, *, BK, dt, hp):
    """``T = (I + A)^-1`` of one chunk as 16 x 16 float32 blocks ``{(b, c): T_bc}`` (c <= b):
    the blocks of ``A`` on and below the diagonal summed over K slices of ``BK``
    (``X = k + lam q``), then :func:`._util.solve_blocks`."""
    K = q_ref.shape[-1]
    nb = len(Gs)
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
    return u.solve_blocks(A, nb, hp)


def _block_rows(G_ref, b_ref, l_ref, seg_ref, nb):
    """The chunk's ``G``, document ids, ``beta`` and ``lam`` by 16-row blocks."""
    Gs = [G_ref[u.rows(b)] for b in range(nb)]
    segs = [None if seg_ref is None else seg_ref[u.rows(b)] for b in range(nb)]
    beta = [b_ref[u.rows(b)].astype(F32) for b in range(nb)]
    lam = [l_ref[u.rows(b)].astype(F32) for b in range(nb)]
    return Gs, segs, beta, lam


def _write_blocks(t_ref, T, nb):
    z = jnp.zeros((u.S, u.S), F32)
    for b in range(nb):
        for c in range(nb):
            t_ref[u.rows(b), u.rows(c)] = T[b, c] if c <= b else z


def _solve_kernel(q_ref, k_ref, G_ref, b_ref, l_ref, seg_ref, t_ref, *, BK, dt, hp):
    nb = q_ref.shape[0] // u.S
    Gs, segs, beta, lam = _block_rows(G_ref, b_ref, l_ref, seg_ref, nb)
    T = _chunk_inverse(q_ref, k_ref, Gs, segs, beta, lam, BK=BK, dt=dt, hp=hp)
    _write_blocks(t_ref, T, nb)


def chunk_solve(q, k, G, beta, lam, seg=None, *, C: int, cfg: StageConfig, interpret: bool):
    """``T = (I + A)^-1`` as ``[B, Tp, H, C]`` float32 (row i of the chunk's ``T`` at token i),
    with ``A_ij = beta_i (x_i . k_j) exp(G_i - G_j)`` (i > j, else 0): one program per
    (batch, chunk, head) computes the 16 x 16 blocks of ``A`` by K slices of ``cfg.block_k``
    and inverts them in registers (:func:`._util.solve_blocks`)."""
    B, Tp, H, K = q.shape
    dt = q.dtype
    kernel = functools.partial(_solve_kernel, BK=min(cfg.block_k or K, K), dt=dt,
                               hp=u.f32_precision(interpret, dt))
    extra, extra_specs = seg_args(seg, C)
    return pl.pallas_call(
        u.with_seg(kernel, 5, seg is not None),
        out_shape=jax.ShapeDtypeStruct((B, Tp, H, C), F32),
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


def _solve_wu_kernel(*refs, BK, BV, dt, hp, with_t):
    q_ref, k_ref, v_ref, G_ref, b_ref, l_ref, seg_ref, w_ref, u_ref = refs[:9]
    C, K = q_ref.shape
    V = v_ref.shape[-1]
    nb = C // u.S
    Gs, segs, beta, lam = _block_rows(G_ref, b_ref, l_ref, seg_ref, nb)
    T = _chunk_inverse(q_ref, k_ref, Gs, segs, beta, lam, BK=BK, dt=dt, hp=hp)
    if with_t:
        _write_blocks(refs[9], T, nb)
    # W and U by block rows: row block b of T Y is sum_{c <= b} T_bc Y_c, so T never has to be
    # assembled into one [C, C] tile (the Triton lowering cannot concatenate register tiles).
    # T meets X and V in the compute dtype, as in chunk_wu.
    Td = {bc: t.astype(dt) for bc, t in T.items()}
    if seg_ref is None:
        gam = [jnp.exp(g) for g in Gs]
    else:  # gamma holds for the chunk's first document only
        first = jnp.min(seg_ref[...])
        gam = [jnp.where(sg == first, jnp.exp(jnp.where(sg == first, g, 0.0)), 0.0)
               for g, sg in zip(Gs, segs)]

    def by_blocks(out_ref, cols, Y):
        for b in range(nb):
            acc = u.dot(Td[b, 0], Y[0], dt=dt, hp=hp)
            for c in range(1, b + 1):
                acc = acc + u.dot(Td[b, c], Y[c], dt=dt, hp=hp)
            out_ref[u.rows(b), cols] = acc.astype(out_ref.dtype)

    for kk in range(K // BK):  # W = T (beta gamma X)
        ks = pl.ds(kk * BK, BK)
        by_blocks(w_ref, ks, [
            ((beta[c] * gam[c])[:, None] * (k_ref[u.rows(c), ks].astype(F32)
                                            + lam[c][:, None] * q_ref[u.rows(c), ks].astype(F32))
             ).astype(dt) for c in range(nb)])
    for j in range(V // BV):  # U = T (beta V)
        vs = pl.ds(j * BV, BV)
        by_blocks(u_ref, vs, [(beta[c][:, None] * v_ref[u.rows(c), vs].astype(F32)).astype(dt)
                              for c in range(nb)])


def chunk_solve_wu(q, k, v, G, beta, lam, seg=None, *, C: int, cfg: StageConfig,
                   interpret: bool, with_t: bool = True):
    """:func:`chunk_solve` and :func:`chunk_wu` in one launch: ``(W, U, T)`` (``T`` None
    without ``with_t``). One program per (batch, chunk, head) inverts ``I + A`` in registers as
    :func:`chunk_solve` does, then forms ``W`` and ``U`` by 16-row blocks from the register
    blocks of ``T`` (K tiles of ``cfg.block_k``, V tiles of ``cfg.block_v``), so ``T`` crosses
    HBM only when the backward needs it and ``q, k`` are read by one kernel instead of two."""
    B, Tp, H, K = q.shape
    V = v.shape[-1]
    dt = q.dtype
    kernel = functools.partial(
        _solve_wu_kernel, BK=min(cfg.block_k or K, K), BV=min(cfg.block_v or V, V), dt=dt,
        hp=u.f32_precision(interpret, dt), with_t=with_t,
    )
    extra, extra_specs = seg_args(seg, C)
    out_shape = [jax.ShapeDtypeStruct((B, Tp, H, K), dt), jax.ShapeDtypeStruct((B, Tp, H, V), dt)]
    out_specs = [spec_rows(C, K), spec_rows(C, V)]
    if with_t:
        out_shape.append(jax.ShapeDtypeStruct((B, Tp, H, C), F32))
        out_specs.append(spec_rows(C, C))
    out = pl.pallas_call(
        u.with_seg(kernel, 6, seg is not None),
        out_shape=tuple(out_shape),
        grid=(B, Tp // C, H),
        in_specs=[spec_rows(C, K), spec_rows(C, K), spec_rows(C, V)]
        + [spec_rows(C, None)] * 3 + extra_specs,
        out_specs=tuple(out_specs),
        interpret=interpret,
        compiler_params=params(cfg),
        name="qdelta_chunk_solve_wu",
    )(q, k, v, G, beta, lam, *extra)
    return out[0], out[1], (out[2] if with_t else None)


def chunk_local(q, k, v, G, beta, lam, seg=None, *, C: int, cfg: StageConfig, interpret: bool,
                cfg_solve: StageConfig | None = None, fused: bool = False,
                with_t: bool = True):
    """``W [B, Tp, H, K]`` and ``U [B, Tp, H, V]`` in ``q``'s dtype and ``T = (I + A)^-1`` as
    ``[B, Tp, H, C]`` float32, which the backward hands to :func:`backward.chunk_grads` instead
    of solving twice. Two launches: :func:`chunk_solve` (``cfg_solve``), then :func:`chunk_wu`
    (``cfg``); with ``fused``, one: :func:`chunk_solve_wu` (``cfg_solve``), which returns
    ``T`` only ``with_t`` (else None)."""
    if fused:
        return chunk_solve_wu(q, k, v, G, beta, lam, seg, C=C, cfg=cfg_solve or cfg,
                              interpret=interpret, with_t=with_t)
    Tinv = chunk_solve(q, k, G, beta, lam, seg, C=C, cfg=cfg_solve or cfg, interpret=interpret)
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
