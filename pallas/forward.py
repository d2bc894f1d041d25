"""Forward kernels of the chunked Q-Delta op (SPEC section 2), Pallas with the Triton lowering.

Three launches, on the padded layout of :mod:`qdelta_jax.xla` (``[B, Tp, H, *]``, Tp = NC C):

1. :func:`chunk_local`, parallel over (batch, chunk, head): ``G``, ``A``, ``T = (I + A)^-1``
   (by 16-row blocks, see :mod:`._util`), ``W = T (beta gamma X)`` and ``U = T (beta V)`` (block
   by block), written in the compute dtype.
2. :func:`state_pass`, one program per (batch row, head, V tile) looping over the chunks with
   the float32 state ``[K, BV]`` in registers: it resets to ``h0[seq]`` where a sequence starts,
   writes the chunk-entry state ``h_in`` and the writes ``D = U - W h``, and stores the final
   state of each sequence at its last chunk.
3. :func:`chunk_output`, parallel over (batch, chunk, head, V tile):
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
from jax.experimental.pallas import triton as plgpu

from qdelta_jax.pallas import _util as u
from qdelta_jax.pallas.config import StageConfig

F32 = jnp.float32


def params(cfg: StageConfig):
    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def spec_rows(C: int, D: int | None):
    """BlockSpec of one chunk of a ``[B, Tp, H]`` (``D`` None) or ``[B, Tp, H, D]`` array for a
    grid ``(b, c, h, ...)``."""
    if D is None:
        return pl.BlockSpec((None, C, None), lambda b, c, h, *_: (b, c, h))
    return pl.BlockSpec((None, C, None, D), lambda b, c, h, *_: (b, c, h, 0))


# ----------------------------------------------------------------------------- 1. local


def _a_kernel(q_ref, k_ref, g_ref, b_ref, l_ref, a_ref, *, dt, hp):
    _, _, _, A = u.local(q_ref[...], k_ref[...], g_ref[...].astype(F32),
                         b_ref[...].astype(F32), l_ref[...].astype(F32), dt, hp)
    a_ref[...] = A


def _local_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, l_ref, a_ref, w_ref, u_ref, *t_ref, BV, dt,
                  hp):
    blk = u.chunk_blocks(a_ref, g_ref, b_ref, hp)
    nb = len(blk.G)
    T = blk.T

    # Row block b of W = sum_{c <= b} T_bc (beta gamma X)_c, of U likewise with beta V.
    def bx(c):
        return ((blk.beta[c] * jnp.exp(blk.G[c]))[:, None]
                * u.x_block(q_ref, k_ref, l_ref, c)).astype(dt)

    def bv(c, vs):
        return (blk.beta[c][:, None] * v_ref[u.rows(c), vs].astype(F32)).astype(dt)

    for b in range(nb):
        w = u.dot(T[b, 0], bx(0), dt=dt, hp=hp)
        for c in range(1, b + 1):
            w = w + u.dot(T[b, c], bx(c), dt=dt, hp=hp)
        w_ref[u.rows(b), :] = w.astype(w_ref.dtype)
        for j in range(v_ref.shape[-1] // BV):
            vs = pl.ds(j * BV, BV)
            uu = u.dot(T[b, 0], bv(0, vs), dt=dt, hp=hp)
            for c in range(1, b + 1):
                uu = uu + u.dot(T[b, c], bv(c, vs), dt=dt, hp=hp)
            u_ref[u.rows(b), vs] = uu.astype(u_ref.dtype)
    if t_ref:
        (t_ref,) = t_ref
        z = jnp.zeros((u.S, u.S), F32)
        for b in range(nb):
            for c in range(nb):
                t_ref[u.rows(b), u.rows(c)] = T[b, c] if c <= b else z


def chunk_a(q, k, g, beta, lam, *, C: int, cfg: StageConfig, interpret: bool):
    """``A_ij = beta_i (x_i . k_j) exp(G_i - G_j)`` (i > j, else 0) as ``[B, Tp, H, C]`` float32:
    one whole-chunk matmul per program, for :func:`chunk_local` to load back in blocks."""
    B, Tp, H, K = q.shape
    dt = q.dtype
    kernel = functools.partial(_a_kernel, dt=dt, hp=u.f32_precision(interpret, dt))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, Tp, H, C), F32),
        grid=(B, Tp // C, H),
        in_specs=[spec_rows(C, K), spec_rows(C, K)] + [spec_rows(C, None)] * 3,
        out_specs=spec_rows(C, C),
        interpret=interpret,
        compiler_params=params(cfg),
        name="qdelta_chunk_a",
    )(q, k, g, beta, lam)


def chunk_local(q, k, v, g, beta, lam, *, C: int, cfg: StageConfig, interpret: bool,
                with_t: bool = False, cfg_a: StageConfig | None = None):
    """``W [B, Tp, H, K]`` and ``U [B, Tp, H, V]`` in ``q``'s dtype; with ``with_t`` also
    ``T = (I + A)^-1`` as ``[B, Tp, H, C]`` float32 (row i of the chunk's T at token i), which
    the backward's recompute hands to :func:`backward.chunk_grads` instead of solving twice.
    Two launches: :func:`chunk_a`, then the blocked solve and ``W, U``."""
    B, Tp, H, K = q.shape
    V = v.shape[-1]
    dt = q.dtype
    A = chunk_a(q, k, g, beta, lam, C=C, cfg=cfg_a or cfg, interpret=interpret)
    kernel = functools.partial(
        _local_kernel, BV=cfg.block_v or V, dt=dt, hp=u.f32_precision(interpret, dt)
    )
    out_shape = [jax.ShapeDtypeStruct((B, Tp, H, K), dt), jax.ShapeDtypeStruct((B, Tp, H, V), dt)]
    out_specs = [spec_rows(C, K), spec_rows(C, V)]
    if with_t:
        out_shape.append(jax.ShapeDtypeStruct((B, Tp, H, C), F32))
        out_specs.append(spec_rows(C, C))
    return pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=(B, Tp // C, H),
        in_specs=[spec_rows(C, K), spec_rows(C, K), spec_rows(C, V)] + [spec_rows(C, None)] * 3
        + [spec_rows(C, C)],
        out_specs=tuple(out_specs),
        interpret=interpret,
        compiler_params=params(cfg),
        name="qdelta_chunk_local",
    )(q, k, v, g, beta, lam, A)


# ----------------------------------------------------------------------------- 2. state pass


def _state_kernel(
    k_ref, w_ref, u_ref, g_ref, h0_ref, reset_ref, last_ref, seq_ref, _fin_in,
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
        g = g_ref[b, t, h]
        G = u.cumsum(g)
        gC = jnp.sum(g)
        D = u_ref[b, t, h, vs].astype(F32) - u.dot(w_ref[b, t, h, :], state, dt=dt, hp=hp)
        d_ref[b, t, h, vs] = D.astype(dt)
        kd = k_ref[b, t, h, :].astype(F32) * jnp.exp(gC - G)[:, None]
        state = jnp.exp(gC) * state + u.dot(kd, D, ta=True, dt=dt, hp=hp)

        @pl.when(last_ref[b, c] != 0)
        def _():
            fin_ref[seq, h, :, vs] = state

        return state

    lax.fori_loop(0, NC, body, jnp.zeros((K, BV), F32))


def state_pass(k, g, W, U, h0, reset, is_last, seq, *, C: int, cfg: StageConfig, interpret):
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
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((B, NC, H, K, V), dt),
            jax.ShapeDtypeStruct((B, Tp, H, V), dt),
            jax.ShapeDtypeStruct(h0.shape, F32),
        ),
        grid=(B, H, V // BV),
        in_specs=[pl.BlockSpec()] * 9,
        out_specs=(pl.BlockSpec(),) * 3,
        # ``final`` starts as h0: sequences that own no chunk (empty in cu_seqlens) keep it.
        input_output_aliases={8: 2},
        interpret=interpret,
        compiler_params=params(cfg),
        name="qdelta_state_pass",
    )(k, W, U, g, h0, reset.astype(jnp.int32), is_last.astype(jnp.int32), seq.astype(jnp.int32),
      h0)


# ----------------------------------------------------------------------------- 3. output


def _output_kernel(q_ref, k_ref, g_ref, hin_ref, d_ref, o_ref, *, scale, BK, dt, hp):
    C, K = q_ref.shape
    _, incl = u.masks(C)
    G = u.cumsum(g_ref[...].astype(F32))
    if BK == K:
        q = q_ref[...]
        P = u.dot(q, k_ref[...], tb=True, dt=dt, hp=hp) * u.decay(G, G, incl)
        qg = q.astype(F32) * jnp.exp(G)[:, None]
        o = u.dot(qg, hin_ref[...], dt=dt, hp=hp) + u.dot(P, d_ref[...], dt=dt, hp=hp)
    else:  # by K slices (float32 at K 256: whole-K operands do not fit shared memory)
        gam = jnp.exp(G)[:, None]
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


def chunk_output(q, k, g, h_in, D, *, scale: float, out_dtype, C: int, cfg: StageConfig,
                 interpret):
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
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, Tp, H, V), out_dtype),
        grid=(B, Tp // C, H, V // BV),
        in_specs=[
            spec_rows(C, K), spec_rows(C, K), spec_rows(C, None),
            pl.BlockSpec((None, None, None, K, BV), lambda b, c, h, j: (b, c, h, 0, j)),
            vspec,
        ],
        out_specs=vspec,
        interpret=interpret,
        compiler_params=params(cfg),
        name="qdelta_chunk_output",
    )(q, k, g, h_in, D)
