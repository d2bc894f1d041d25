"""Mosaic GPU (``plgpu``) kernels of the backward: the state-side gradients
(:func:`chunk_dqkw`, the contract of :func:`qdelta_jax.pallas.backward.chunk_dqkw`, one
warpgroup per (batch row, chunk, head, K tile) with its four products as wgmmas accumulating in
registers), the products of the K-side local gradients (:func:`grads_k_products`, the contract
of :func:`qdelta_jax.pallas.backward.grads_k_products_xla`; see its docstring), and the fused
pair that replaces both with the V side (:func:`grads_v_from_d`, then :func:`dqkw_products`).

Why: the Triton ``chunk_dqkw`` (0.40 ms at B8 T4096 H6 K128 V256 bf16 on an H200) moves about
1.1 GB, a floor of about 0.24 ms; it runs at 255 registers and 12.5% occupancy with its
``mma`` operands loaded synchronously. Here :func:`plgpu.emit_pipeline` streams the chunk's
V tiles of ``h_in, dh_out`` (``[BK, BV]``) and ``dO, D, dD`` (``[C, BV]``) in by TMA while the
wgmmas of the previous tile run:

* ``dO h_in^T``, ``D dh_out^T`` and ``dD h_in^T`` (``[C, BV] x [BV, BK]``) and
  ``dP = dO D^T`` (``[C, BV] x [BV, C]``), every product reading ``h_in`` / ``dh_out`` / ``D``
  transposed from shared memory;
* the row sums of ``h_in o dh_out`` (the carried state's ``dG`` term), in registers.

The epilogue scales by the chunk's decays and writes ``dq_part, dk_part`` (float32), ``dW``
(compute dtype), ``dPs = scale dP o decay o causal`` (float32, by the first K tile) and the
per-row ``dG`` parts. Two sums that would need a whole-tile reduction to a scalar in the
kernel (``sum(de)`` over the chunk and ``sum(h_in o dh_out)``) leave it as a ``[C]`` and a
``[BK]`` vector; :func:`chunk_dqkw` adds them to the chunk's last row in XLA (a few MB).

The fused pair: the K side's products need ``M, S`` from the K side's ``[C, C]`` part, which
needs ``dA``, which the V side forms from ``dW``, which the state side forms. ``dA`` does not
need ``dW``: with ``D = T (beta V - beta gamma X h_in)``, the V side's ``dT = dW (beta gamma
X)^T + dD (beta V)^T = dD D^T (I + A)^T`` and ``dA = -T^T dT T^T = -T^T (dD D^T)``. So
:func:`grads_v_from_d` forms ``dv``, ``dA`` and ``dPs`` from ``D`` and ``dD`` first, the
Triton ``[C, C]`` part follows, and :func:`dqkw_products` runs the state-side V loop and then
the K side's products onto the state-side ``dq, dk`` parts still in registers: those float32
parts and ``dW`` never cross HBM. ``D`` is the forward's rounded one, so ``dA`` differs from
the one through ``dW`` by about the compute dtype's rounding (2e-3 relative in bf16 on an
H200, the same order as the products' operand roundings).

Numerics as :mod:`.backward`: every product accumulates in float32 from operands in the
compute dtype, the decays applied in float32 after the products; ``dA``'s ``[C, C]`` product
runs on the high and low bf16 halves of both operands (about 16 bits).

Status: lowered for CUDA on the CPU in CI (``tests/test_mosaic.py``), their wiring and
contracts checked there with XLA stand-ins; on the GPU ``benchmarks/mosaic_dev.py --dqkw``,
``--grads-k`` and ``--fused-local`` check each against its oracle or the Triton kernel and
time them (BENCHMARKS.md). :mod:`.core` calls them in the backward of
``implementation="pallas-mosaic"``: the fused pair by default on unpacked rows,
``Config(mosaic_fused_local=False)`` for :func:`chunk_dqkw` and :func:`grads_k_products`
apart, ``Config(mosaic_dqkw=False)`` / ``Config(mosaic_grads_k=False)`` for the Triton
kernels. Unpacked rows only, except :func:`grads_k_products` (no document ids of its own);
bfloat16 / float16, chunk 64, K a multiple of 64, V a multiple of ``block_v``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from qdelta_jax.pallas import mosaic as m

F32 = jnp.float32


def smem_bytes(C: int, BK: int, BV: int, itemsize: int, steps: int) -> int:
    """Shared memory of one CTA: ``steps`` buffers of ``h_in, dh_out`` (``[BK, BV]``) and
    ``dO, D, dD`` (``[C, BV]``); the ``q, k`` tiles and ``G``; one float32 ``[C, BK]`` buffer
    that stages ``dq``, ``dk`` and ``dPs`` in turn for their TMA copies, three float32 vectors
    and ``dW``. At the defaults (V tiles of 32, two in flight) about 81 KB: two CTAs a
    multiprocessor."""
    per_step = (2 * BK * BV + 3 * C * BV) * itemsize
    stage = 4 * (C * BK + 2 * C + BK) + C * BK * itemsize
    return steps * per_step + 2 * C * BK * itemsize + 4 * C + stage


def check_supported(*, K: int, V: int, C: int, dtype, block_k: int = 64, block_v: int = 32,
                    steps: int = 2) -> None:
    """Raises ``ValueError`` naming the first size or dtype this kernel does not take."""
    dt = m.check_dtype_and_chunk(dtype, C, "the Mosaic GPU dqkw kernel takes",
                                "the Mosaic GPU dqkw kernel needs")
    if block_k != C or K % block_k:
        raise ValueError(f"the Mosaic GPU dqkw kernel needs K a multiple of block_k=64, got "
                         f"K={K}, block_k={block_k}")
    if block_v not in (32, 64, 128) or V % block_v:
        raise ValueError(f"block_v must be 32, 64 or 128 dividing V={V}, got {block_v}")
    need = smem_bytes(C, block_k, block_v, dt.itemsize, steps)
    if need > m.SMEM_BYTES:
        raise ValueError(f"block_v={block_v}, steps={steps} need {need} bytes of shared memory"
                         f" per CTA, more than {m.SMEM_BYTES}")


def _state_side_loop(hin_ref, dho_ref, do_ref, d_ref, dd_ref, *, b, c, h, kt, NC, H, nk, C, BK,
                     BV, nv, steps, dt, with_dp):
    """The V loop of the state-side gradients: ``plgpu.emit_pipeline`` streams the chunk's V
    tiles of ``h_in, dh_out`` and ``dO, D, dD`` in while ``dO h_in^T``, ``D dh_out^T``, ``dD
    h_in^T`` (and, ``with_dp``, ``dO D^T``) accumulate in registers, with the row sums of
    ``h_in o dh_out``. Returns the four accumulators (``dp`` None without it) and the sums."""
    plgpu = m.plgpu
    wg = plgpu.Layout.WGMMA
    zeros = lambda n: plgpu.layout_cast(jnp.full((C, n), 0, F32), wg)  # noqa: E731
    hd0 = plgpu.layout_cast(jnp.full((BK,), 0, F32), wg.reduce(1))

    def step(_, hin_s, dho_s, do_s, d_s, dd_s, carry):
        doh, dkd, dw, dp, hd = carry

        def products(accs):
            a_doh, a_dkd, a_dw, *a_dp = accs
            plgpu.wgmma(a_doh, do_s, hin_s.T)
            plgpu.wgmma(a_dkd, d_s, dho_s.T)
            plgpu.wgmma(a_dw, dd_s, hin_s.T)
            if a_dp:
                plgpu.wgmma(a_dp[0], do_s, d_s.T)

        accs = (doh, dkd, dw) + ((dp,) if with_dp else ())
        doh, dkd, dw, *dp = pl.run_state(products)(tuple(plgpu.ACC.init(x) for x in accs))
        hv = m._load(hin_s, wg).astype(F32)
        dv = m._load(dho_s, wg).astype(F32)
        return doh, dkd, dw, dp[0] if with_dp else None, hd + jnp.sum(hv * dv, axis=1)

    state_rows = lambda j: (((b * NC + c) * H + h) * nk + kt, j)  # noqa: E731
    tv = m._transforms(BV, dt)
    in_specs = [
        plgpu.BlockSpec((BK, BV), state_rows, transforms=tv),  # h_in as [B NC H K, V]
        plgpu.BlockSpec((BK, BV), state_rows, transforms=tv),  # dh_out
    ] + [plgpu.BlockSpec((None, C, None, BV), lambda j: (b, c, h, j), transforms=tv)] * 3
    return plgpu.emit_pipeline(
        step, grid=(nv,), in_specs=in_specs, max_concurrent_steps=steps,
        init_carry=(zeros(BK), zeros(BK), zeros(BK), zeros(C) if with_dp else None, hd0),
    )(hin_ref, dho_ref, do_ref, d_ref, dd_ref)


def _with_seg_refs(kernel, n_in: int, n_out: int, segmented: bool):
    """``kernel`` with its document ids as keyword refs: with ``segmented`` the call's last
    input is ``seg`` (``[B, Tp]``) and its last scratch before the barriers ``seg_s`` (``[C]``
    int32); without, both are None and the call has neither."""
    def call(*refs):
        if not segmented:
            return kernel(*refs, seg_ref=None, seg_s=None)
        ins, outs, scr = refs[:n_in], refs[n_in:n_in + n_out], refs[n_in + n_out:]
        return kernel(*ins[:-1], *outs, *scr[:-2], scr[-1], seg_ref=ins[-1], seg_s=scr[-2])
    return call


def _write_dps(dp, Gi, Gj, mask, scale, stage_s, dst):
    """``dPs = scale dP o exp(G_i - G_j)`` on the mask's pairs (``dP = dO D^T`` ``[C, C]`` in
    registers) to ``dst`` through the float32 staging tile ``stage_s``, once the copies before
    have read it."""
    plgpu = m.plgpu
    C = dp.shape[0]
    # exp(G_i - G_j) only where the mask holds, so the exponent never overflows
    diff = jnp.where(mask, m._rows(Gi, (C, C)) - m._cols(Gj, (C, C)), 0.0)
    dps = jnp.where(mask, scale * dp * jnp.exp(diff), 0.0)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    stage_s[...] = dps
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(stage_s, dst)


def _kernel(q_ref, k_ref, g_ref, hin_ref, dho_ref, do_ref, d_ref, dd_ref,
            dq_ref, dk_ref, dw_ref, dg_ref, de_ref, hd_ref, dps_ref,
            q_s, k_s, g_s, f_s, dw_s, dg_s, de_s, hd_s, bars,
            *, C, NC, H, nk, BK, BV, nv, scale, steps, dt):
    plgpu = m.plgpu
    b, c, h, kt = (lax.axis_index(n) for n in ("b", "c", "h", "kt"))
    rows, cols = pl.ds(c * C, C), pl.ds(kt * BK, BK)
    plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h, cols], q_s, bars.at[0])
    plgpu.copy_gmem_to_smem(k_ref.at[b, rows, h, cols], k_s, bars.at[1])
    plgpu.copy_gmem_to_smem(g_ref.at[b, h, rows], g_s, bars.at[2])

    wg = plgpu.Layout.WGMMA
    doh, dkd, dw, dp, hd = _state_side_loop(hin_ref, dho_ref, do_ref, d_ref, dd_ref, b=b, c=c,
                                            h=h, kt=kt, NC=NC, H=H, nk=nk, C=C, BK=BK, BV=BV,
                                            nv=nv, steps=steps, dt=dt, with_dp=True)

    for i in range(3):
        plgpu.barrier_wait(bars.at[i])
    causal = m._causal(C)
    Gi, Gj, gam, e, aC, mask, _ = m._gates(g_s, None, None, causal)
    qv = m._load(q_s, wg).astype(F32)
    kv = m._load(k_s, wg).astype(F32)
    # One float32 staging buffer for dq, dk and dPs in turn (each refilled once the copy
    # before has read it): it keeps the CTA small enough for two a multiprocessor.
    f_s[...] = scale * m._rows(gam, doh.shape) * doh
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(f_s, dq_ref.at[b, rows, h, cols])
    dw_s[...] = (-dw).astype(dt)
    de = jnp.sum(dkd * kv, axis=1) * e
    de_s[...] = de
    dg_s[...] = scale * gam * jnp.sum(doh * qv, axis=1) - de
    hd_s[...] = hd * aC
    dk = m._rows(e, dkd.shape) * dkd
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    f_s[...] = dk
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(f_s, dk_ref.at[b, rows, h, cols])
    plgpu.copy_smem_to_gmem(dw_s, dw_ref.at[b, rows, h, cols])
    plgpu.copy_smem_to_gmem(dg_s, dg_ref.at[kt, b, h, rows])
    plgpu.copy_smem_to_gmem(de_s, de_ref.at[kt, b, h, rows])
    plgpu.copy_smem_to_gmem(hd_s, hd_ref.at[b, c, h, cols])

    @pl.when(kt == 0)
    def _():
        _write_dps(dp, Gi, Gj, mask, scale, f_s, dps_ref.at[b, rows, h, :])

    plgpu.wait_smem_to_gmem(0)


def chunk_dqkw(q, k, G, h_in, dh_out, do, D, dD, seg=None, *, scale: float, C: int = 64,
               block_k: int = 64, block_v: int = 32, steps: int = 2):
    """:func:`qdelta_jax.pallas.backward.chunk_dqkw` on Mosaic GPU: ``dq_part, dk_part
    [B, Tp, H, K]`` float32, ``dW`` in the compute dtype, ``dG_part [B, Tp, H]`` float32 and
    ``dPs [B, Tp, H, C]`` float32, from ``q, k [B, Tp, H, K]``, ``G [B, Tp, H]``,
    ``h_in, dh_out [B, NC, H, K, V]``, ``do, D, dD [B, Tp, H, V]`` (one sequence per row).

    Raises ``RuntimeError`` without Mosaic GPU, ``ValueError`` for what it does not take."""
    m._require_plgpu()
    plgpu = m.plgpu
    if seg is not None:
        raise ValueError("the Mosaic GPU dqkw kernel takes unpacked rows only (seg=None)")
    B, Tp, H, K = q.shape
    V = do.shape[-1]
    dt = jnp.dtype(q.dtype)
    check_supported(K=K, V=V, C=C, dtype=dt, block_k=block_k, block_v=block_v, steps=steps)
    if Tp % C:
        raise ValueError(f"q has {Tp} time steps, not a multiple of chunk_size={C}")
    NC, BK, BV = Tp // C, block_k, block_v
    nk, nv = K // BK, V // BV
    state, rows = (B, NC, H, K, V), (B, Tp, H, V)
    m.check_args((("k", k, q.shape), ("G", G, (B, Tp, H)), ("h_in", h_in, state),
                  ("dh_out", dh_out, state), ("do", do, rows), ("D", D, rows), ("dD", dD, rows)),
                 dt, (("k", k), ("h_in", h_in), ("dh_out", dh_out), ("do", do), ("D", D),
                      ("dD", dD)))
    tk = m._transforms(BK, dt)
    smem = lambda shape, dtype, t=(): plgpu.SMEM(shape, dtype, transforms=t)  # noqa: E731
    scratch = [
        smem((C, BK), dt, tk), smem((C, BK), dt, tk), smem((C,), F32),  # q, k, G
        smem((C, BK), F32, m._transforms(BK, F32)),  # dq, dk, dPs in turn (BK == C)
        smem((C, BK), dt, tk),  # dW
        smem((C,), F32), smem((C,), F32), smem((BK,), F32),  # dG part, de, hd
        plgpu.Barrier(num_barriers=3),
    ]
    out_type = (
        jax.ShapeDtypeStruct((B, Tp, H, K), F32), jax.ShapeDtypeStruct((B, Tp, H, K), F32),
        jax.ShapeDtypeStruct((B, Tp, H, K), dt),
        jax.ShapeDtypeStruct((nk, B, H, Tp), F32), jax.ShapeDtypeStruct((nk, B, H, Tp), F32),
        jax.ShapeDtypeStruct((B, NC, H, K), F32), jax.ShapeDtypeStruct((B, Tp, H, C), F32),
    )
    kernel = functools.partial(_kernel, C=C, NC=NC, H=H, nk=nk, BK=BK, BV=BV, nv=nv,
                               scale=float(scale), steps=min(steps, nv), dt=dt)
    dqp, dkp, dW, dg, de, hd, dPs = m.call_kernel(
        kernel,
        (q, k, jnp.swapaxes(G.astype(F32), 1, 2), h_in.reshape(B * NC * H * K, V),
         dh_out.reshape(B * NC * H * K, V), do, D, dD),
        out_type=out_type, scratch_types=scratch, grid=(B, NC, H, nk),
        grid_names=("b", "c", "h", "kt"), compiler_params=m.lane_params())
    return dqp, dkp, dW, _dg_part(dg, de, hd, C), dPs


def _dg_part(dg, de, hd, C):
    """The state-side ``dG`` part ``[B, Tp, H]`` from a kernel's per-K-tile row terms ``dg, de
    [nk, B, H, Tp]`` and ``hd = aC sum(h_in o dh_out)`` ``[B, NC, H, K]``: the chunk's last row
    also gets ``sum(de)`` and ``sum(hd)``, summed here."""
    _, B, H, Tp = dg.shape
    NC = Tp // C
    dg, de = jnp.sum(dg, axis=0), jnp.sum(de, axis=0)  # over K tiles: [B, H, Tp]
    last = (jnp.sum(de.reshape(B, H, NC, C), axis=-1)
            + jnp.swapaxes(jnp.sum(hd, axis=-1), 1, 2))  # [B, H, NC]
    dg = dg.reshape(B, H, NC, C).at[..., C - 1].add(last).reshape(B, H, Tp)
    return jnp.swapaxes(dg, 1, 2)


def _k_side_products(dq0, dk0, t_s, dw_s, m_s, s_s, q_s, k_s, lbg_s, bg_s, oq_s, ok_s, sq_s,
                     sk_s, dt, qv=None, kv=None):
    """The K side's products of one chunk, head and K tile: ``dbx = T^T dW``, ``M k``, ``S k``
    and ``M^T q`` as wgmmas onto accumulators that start from ``dq0``, ``dk0`` (``[C, BK]``
    float32 in registers); ``dq = dq0 + M k + lbg dbx``, ``dk = dk0 + S k + M^T q + bg dbx``
    into ``oq_s``, ``ok_s`` (compute dtype) and the row sums ``dbx . q``, ``dbx . k`` into
    ``sq_s``, ``sk_s`` (``qv``, ``kv``: ``q``, ``k`` already in registers, else loaded). The
    caller commits the shared memory."""
    plgpu = m.plgpu
    wg = plgpu.Layout.WGMMA

    def products(accs):
        a_bx, a_dq, a_dk = accs
        plgpu.wgmma(a_bx, t_s.T, dw_s)  # dbx = T^T dW
        plgpu.wgmma(a_dq, m_s, k_s)  # + M k
        plgpu.wgmma(a_dk, s_s, k_s)  # + S k
        plgpu.wgmma(a_dk, m_s.T, q_s)  # + M^T q

    dbx, dq, dk = pl.run_state(products)((
        plgpu.ACC.init(plgpu.layout_cast(jnp.full(dq0.shape, 0, F32), wg)),
        plgpu.ACC.init(dq0), plgpu.ACC.init(dk0)))
    lbg = m._load(lbg_s, wg.reduce(1))
    bg = m._load(bg_s, wg.reduce(1))
    # (T diag(s))^T dW = diag(s) dbx: the row terms of dq and dk from the one product.
    oq_s[...] = (dq + m._rows(lbg, dbx.shape) * dbx).astype(dt)
    ok_s[...] = (dk + m._rows(bg, dbx.shape) * dbx).astype(dt)
    qv = m._load(q_s, wg).astype(F32) if qv is None else qv
    kv = m._load(k_s, wg).astype(F32) if kv is None else kv
    sq_s[...] = jnp.sum(dbx * qv, axis=1)
    sk_s[...] = jnp.sum(dbx * kv, axis=1)


# ----------------------------------------------------------------------------- fused


def dqkw_products_smem_bytes(C: int, BK: int, BV: int, itemsize: int, steps: int) -> int:
    """Shared memory of one CTA of :func:`dqkw_products`: the V loop's buffers (as
    :func:`smem_bytes`), ``q, k, dW`` and the ``dq, dk`` staging tiles (``[C, BK]``), ``T, M,
    S`` (``[C, C]``, compute dtype) and eight ``[C]`` / ``[BK]`` vectors: about 105 KB at C 64,
    BK 64, V tiles of 32, two in flight, bf16 (two CTAs a multiprocessor)."""
    per_step = (2 * BK * BV + 3 * C * BV) * itemsize
    return steps * per_step + (5 * C * BK + 3 * C * C) * itemsize + 4 * (7 * C + BK)


def _dqkw_products_kernel(q_ref, k_ref, g_ref, hin_ref, dho_ref, do_ref, d_ref, dd_ref, t_ref,
                          m_ref, s_ref, lbg_ref, bg_ref,
                          dq_ref, dk_ref, dg_ref, de_ref, hd_ref, sq_ref, sk_ref,
                          q_s, k_s, g_s, t_s, m_s, s_s, lbg_s, bg_s, dw_s, oq_s, ok_s,
                          dg_s, de_s, hd_s, sq_s, sk_s, bars,
                          *, seg_ref, seg_s, C, NC, H, nk, BK, BV, nv, scale, steps, dt):
    plgpu = m.plgpu
    b, c, h, kt = (lax.axis_index(n) for n in ("b", "c", "h", "kt"))
    rows, cols = pl.ds(c * C, C), pl.ds(kt * BK, BK)
    # Everything but the V loop's operands is copied in while the loop runs.
    loads = ((q_ref.at[b, rows, h, cols], q_s), (k_ref.at[b, rows, h, cols], k_s),
             (g_ref.at[b, h, rows], g_s), (t_ref.at[b, rows, h, :], t_s),
             (m_ref.at[b, rows, h, :], m_s), (s_ref.at[b, rows, h, :], s_s),
             (lbg_ref.at[b, h, rows], lbg_s), (bg_ref.at[b, h, rows], bg_s))
    if seg_ref is not None:
        loads += ((seg_ref.at[b, rows], seg_s),)
    m.copy_in(loads, bars, wait=False)
    doh, dkd, dw, _, hd = _state_side_loop(hin_ref, dho_ref, do_ref, d_ref, dd_ref, b=b, c=c,
                                           h=h, kt=kt, NC=NC, H=H, nk=nk, C=C, BK=BK, BV=BV,
                                           nv=nv, steps=steps, dt=dt, with_dp=False)
    for i in range(len(loads)):
        plgpu.barrier_wait(bars.at[i])

    wg = plgpu.Layout.WGMMA
    # With documents: gamma zero past the chunk's first one, e before its last, aC zero where
    # one starts inside the chunk (the third argument only feeds the unused "keep").
    _, _, gam, e, aC, _, _ = m._gates(g_s, seg_s, seg_s, None)
    qv = m._load(q_s, wg).astype(F32)
    kv = m._load(k_s, wg).astype(F32)
    dw_s[...] = (-dw).astype(dt)  # dW = -dD h_in^T, rounded as the unfused kernel writes it
    plgpu.commit_smem()
    de = jnp.sum(dkd * kv, axis=1) * e
    de_s[...] = de
    dg_s[...] = scale * gam * jnp.sum(doh * qv, axis=1) - de
    hd_s[...] = hd * aC

    # The state-side parts dq_part = scale gamma dO h^T, dk_part = e D dh^T never leave the
    # registers: they start the accumulators of the K side's products.
    _k_side_products(scale * m._rows(gam, doh.shape) * doh, m._rows(e, dkd.shape) * dkd,
                     t_s, dw_s, m_s, s_s, q_s, k_s, lbg_s, bg_s, oq_s, ok_s, sq_s, sk_s, dt,
                     qv=qv, kv=kv)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(oq_s, dq_ref.at[b, rows, h, cols])
    plgpu.copy_smem_to_gmem(ok_s, dk_ref.at[b, rows, h, cols])
    plgpu.copy_smem_to_gmem(dg_s, dg_ref.at[kt, b, h, rows])
    plgpu.copy_smem_to_gmem(de_s, de_ref.at[kt, b, h, rows])
    plgpu.copy_smem_to_gmem(hd_s, hd_ref.at[b, c, h, cols])
    plgpu.copy_smem_to_gmem(sq_s, sq_ref.at[kt, b, h, rows])
    plgpu.copy_smem_to_gmem(sk_s, sk_ref.at[kt, b, h, rows])
    plgpu.wait_smem_to_gmem(0)


def check_dqkw_products_supported(*, K: int, V: int, C: int, dtype, block_k: int = 64,
                                  block_v: int = 32, steps: int = 2) -> None:
    """Raises ``ValueError`` naming the first size or dtype :func:`dqkw_products` does not
    take (those of :func:`chunk_dqkw`, within its larger shared memory)."""
    check_supported(K=K, V=V, C=C, dtype=dtype, block_k=block_k, block_v=block_v, steps=steps)
    need = dqkw_products_smem_bytes(C, block_k, block_v, jnp.dtype(dtype).itemsize, steps)
    if need > m.SMEM_BYTES:
        raise ValueError(f"block_v={block_v}, steps={steps} need {need} bytes of shared memory"
                         f" per CTA in the fused state-side and K-side kernel, more than "
                         f"{m.SMEM_BYTES}")


def dqkw_products(q, k, G, h_in, dh_out, do, D, dD, Tb, M, S, lbg, bg, seg=None, *,
                  scale: float, C: int = 64, block_k: int = 64, block_v: int = 32,
                  steps: int = 2):
    """:func:`chunk_dqkw` and :func:`grads_k_products` in one kernel (one warpgroup per batch
    row, chunk, head and K tile of 64): the state-side V loop, then ``dbx = T^T dW``, ``M k``,
    ``S k``, ``M^T q`` as wgmmas onto accumulators that start from the state-side ``dq, dk``
    parts in registers, so that those parts (float32) and ``dW`` never cross HBM. Needs the K
    side's ``[C, C]`` part first (``M, S`` from :func:`qdelta_jax.pallas.backward.
    chunk_grads_k_phase1`), hence a ``dA`` and ``dPs`` that do not need ``dW``:
    :func:`grads_v_from_d`.

    ``q, k [B, Tp, H, K]``, ``G [B, Tp, H]``, ``h_in, dh_out [B, NC, H, K, V]``, ``do, D, dD
    [B, Tp, H, V]``, ``Tb, M, S [B, Tp, H, C]`` in the compute dtype (``Tb``: ``T`` rounded),
    ``lbg = lam beta gamma``, ``bg = beta gamma`` ``[B, Tp, H]`` float32. Returns ``dq, dk``
    (compute dtype), the state-side ``dG`` part and the row sums ``dbx . q``, ``dbx . k``
    (``[B, Tp, H]`` float32): the contract of :func:`qdelta_jax.pallas.backward.
    dqkw_products_ref`. ``seg [B, Tp]``: document ids of packed rows (the chunk's decays cut
    at its documents, as the Triton kernel's). Chunk 64, K a multiple of 64. Status: lowered
    for CUDA in CI; on a GPU ``benchmarks/mosaic_dev.py --fused-local`` checks it on unpacked
    rows and ``qdelta-check --docs 32`` end to end on packed ones.

    Raises ``RuntimeError`` without Mosaic GPU, ``ValueError`` for what it does not take."""
    m._require_plgpu()
    plgpu = m.plgpu
    B, Tp, H, K = q.shape
    V = do.shape[-1]
    dt = jnp.dtype(q.dtype)
    check_dqkw_products_supported(K=K, V=V, C=C, dtype=dt, block_k=block_k, block_v=block_v,
                                  steps=steps)
    if Tp % C:
        raise ValueError(f"q has {Tp} time steps, not a multiple of chunk_size={C}")
    NC, BK, BV = Tp // C, block_k, block_v
    nk, nv = K // BK, V // BV
    state, rows, rows_c, vec = (B, NC, H, K, V), (B, Tp, H, V), (B, Tp, H, C), (B, Tp, H)
    m.check_args((("k", k, q.shape), ("G", G, vec), ("h_in", h_in, state),
                  ("dh_out", dh_out, state), ("do", do, rows), ("D", D, rows), ("dD", dD, rows),
                  ("Tb", Tb, rows_c), ("M", M, rows_c), ("S", S, rows_c), ("lbg", lbg, vec),
                  ("bg", bg, vec)) + ((("seg", seg, (B, Tp)),) if seg is not None else ()),
                 dt, (("k", k), ("h_in", h_in), ("dh_out", dh_out), ("do", do), ("D", D),
                      ("dD", dD), ("Tb", Tb), ("M", M), ("S", S)))
    m.check_args((), jnp.dtype(F32), (("lbg", lbg), ("bg", bg)))
    segmented = seg is not None
    tk, tc = m._transforms(BK, dt), m._transforms(C, dt)
    smem = lambda shape, dtype, t=(): plgpu.SMEM(shape, dtype, transforms=t)  # noqa: E731
    scratch = [
        smem((C, BK), dt, tk), smem((C, BK), dt, tk), smem((C,), F32),  # q, k, G
        smem((C, C), dt, tc), smem((C, C), dt, tc), smem((C, C), dt, tc),  # T, M, S
        smem((C,), F32), smem((C,), F32),  # lbg, bg
        smem((C, BK), dt, tk), smem((C, BK), dt, tk), smem((C, BK), dt, tk),  # dW, dq, dk
        smem((C,), F32), smem((C,), F32), smem((BK,), F32),  # dG part, de, hd
        smem((C,), F32), smem((C,), F32),  # the row sums
    ] + ([smem((C,), jnp.int32)] if segmented else []) + [  # document ids
        plgpu.Barrier(num_barriers=9 if segmented else 8),
    ]
    out_type = (
        jax.ShapeDtypeStruct((B, Tp, H, K), dt), jax.ShapeDtypeStruct((B, Tp, H, K), dt),
        jax.ShapeDtypeStruct((nk, B, H, Tp), F32), jax.ShapeDtypeStruct((nk, B, H, Tp), F32),
        jax.ShapeDtypeStruct((B, NC, H, K), F32),
        jax.ShapeDtypeStruct((nk, B, H, Tp), F32), jax.ShapeDtypeStruct((nk, B, H, Tp), F32),
    )
    body = functools.partial(_dqkw_products_kernel, C=C, NC=NC, H=H, nk=nk, BK=BK, BV=BV,
                             nv=nv, scale=float(scale), steps=min(steps, nv), dt=dt)
    sw = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731 - [B, Tp, H] <-> [B, H, Tp]
    dq, dk, dg, de, hd, sq, sk = m.call_kernel(
        body,
        (q, k, sw(G.astype(F32)), h_in.reshape(B * NC * H * K, V),
         dh_out.reshape(B * NC * H * K, V), do, D, dD, Tb, M, S, sw(lbg), sw(bg),
         *([seg.astype(jnp.int32)] if segmented else [])),
        wrap=lambda f: _with_seg_refs(f, 14 if segmented else 13, 7, segmented),
        out_type=out_type, scratch_types=scratch, grid=(B, NC, H, nk),
        grid_names=("b", "c", "h", "kt"), compiler_params=m.lane_params())
    return (dq, dk, _dg_part(dg, de, hd, C), sw(jnp.sum(sq, axis=0)), sw(jnp.sum(sk, axis=0)))


def grads_v_from_d_smem_bytes(C: int, BV: int, itemsize: int, steps: int) -> int:
    """Shared memory of one CTA of :func:`grads_v_from_d`: ``steps`` buffers of ``v, dD, dO,
    D, dv`` (``[C, BV]``), ``T`` in float32 (then the ``dA`` and ``dPs`` staging tile), the
    high and low halves of ``T`` and of ``D dD^T`` (``[C, C]``), three ``[C]`` vectors: about
    89 KB at V tiles of 32, two in flight, bf16."""
    return (5 * steps * C * BV + 4 * C * C) * itemsize + 4 * C * C + 3 * 4 * C


def _grads_v_from_d_kernel(v_ref, dd_ref, do_ref, d_ref, t_ref, g_ref, b_ref,
                           dv_ref, dbv_ref, da_ref, dps_ref, tb_ref,
                           t32_s, th_s, tl_s, xh_s, xl_s, g_s, b_s, db_s, bars,
                           *, seg_ref, seg_s, C, BV, nv, scale, steps, dt):
    plgpu = m.plgpu
    b, c, h = (lax.axis_index(n) for n in ("b", "c", "h"))
    rows = pl.ds(c * C, C)
    loads = ((t_ref.at[b, rows, h, :], t32_s), (g_ref.at[b, h, rows], g_s),
             (b_ref.at[b, h, rows], b_s))
    if seg_ref is not None:
        loads += ((seg_ref.at[b, rows], seg_s),)
    m.copy_in(loads, bars)

    wg = plgpu.Layout.WGMMA
    vec = wg.reduce(1)
    beta = m._load(b_s, vec)
    tf = m._load(t32_s, wg)
    th = tf.astype(dt)
    th_s[...] = th  # T as the products take it (the Triton kernels round it so too) ...
    tl_s[...] = (tf - th.astype(F32)).astype(dt)  # ... and the rest, for dA's product
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(th_s, tb_ref.at[b, rows, h, :])
    zeros = lambda n: plgpu.layout_cast(jnp.full((C, n), 0, F32), wg)  # noqa: E731

    def step(_, v_s, dd_s, do_s, d_s, dv_s, carry):
        ddd, dod, dbeta = carry

        def products(accs):
            a_ddd, a_dod, a_dbv = accs
            plgpu.wgmma(a_ddd, d_s, dd_s.T)  # (dD D^T)^T
            plgpu.wgmma(a_dod, do_s, d_s.T)  # dO D^T
            plgpu.wgmma(a_dbv, th_s.T, dd_s)  # T^T dD

        ddd, dod, dbv = pl.run_state(products)(
            (plgpu.ACC.init(ddd), plgpu.ACC.init(dod), plgpu.ACC.init(zeros(BV))))
        dv_s[...] = (m._rows(beta, dbv.shape) * dbv).astype(dv_s.dtype)
        vv = m._load(v_s, wg).astype(F32)
        return ddd, dod, dbeta + jnp.sum(dbv * vv, axis=1)

    tv = m._transforms(BV, dt)
    spec = plgpu.BlockSpec((None, C, None, BV), lambda j: (b, c, h, j), transforms=tv)
    ddd, dod, dbeta = plgpu.emit_pipeline(
        step, grid=(nv,), in_specs=[spec] * 4, out_specs=[spec], max_concurrent_steps=steps,
        init_carry=(zeros(C), zeros(C), plgpu.layout_cast(jnp.full((C,), 0, F32), vec)),
    )(v_ref, dd_ref, do_ref, d_ref, dv_ref)
    db_s[...] = dbeta

    # dA = -T^T dD D^T (strictly lower): the T^T dT T^T of the V side with dT = dD D^T
    # (I + A)^T, as D = T (beta V - beta gamma X h_in). Its product on the halves of both
    # operands (high x high + high x low + low x high, about 16 bits). The loop accumulated
    # (dD D^T)^T so that it enters here as a transposed (K-major) operand, the form the
    # [C, C] tiles' 64-byte swizzle at V tiles of 32 takes.
    hi = ddd.astype(dt)
    xh_s[...] = hi
    xl_s[...] = (ddd - hi.astype(F32)).astype(dt)
    plgpu.commit_smem()

    def left(acc):
        plgpu.wgmma(acc, th_s.T, xh_s.T)
        plgpu.wgmma(acc, th_s.T, xl_s.T)
        plgpu.wgmma(acc, tl_s.T, xh_s.T)

    y = pl.run_state(left)(plgpu.ACC.init(zeros(C)))
    row = plgpu.broadcasted_iota(jnp.int32, (C, C), 0, layout=wg)
    col = plgpu.broadcasted_iota(jnp.int32, (C, C), 1, layout=wg)
    t32_s[...] = jnp.where(row > col, -y, 0.0)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(t32_s, da_ref.at[b, rows, h, :])
    plgpu.copy_smem_to_gmem(db_s, dbv_ref.at[b, h, rows])
    # The mask: i >= j, in one document (the third argument only feeds the unused "keep").
    Gi, Gj, _, _, _, mask, _ = m._gates(g_s, seg_s, seg_s, m._causal(C))
    _write_dps(dod, Gi, Gj, mask, scale, t32_s, dps_ref.at[b, rows, h, :])
    plgpu.wait_smem_to_gmem(0)


def check_grads_v_from_d_supported(*, V: int, C: int, dtype, block_v: int = 32,
                                   steps: int = 2) -> None:
    """Raises ``ValueError`` naming the first size or dtype :func:`grads_v_from_d` does not
    take."""
    dt = m.check_dtype_and_chunk(dtype, C, "the Mosaic GPU V-side gradients take",
                                "the Mosaic GPU V-side gradients need")
    if block_v not in (32, 64) or V % block_v:
        raise ValueError(f"block_v must be 32 or 64 dividing V={V}, got {block_v}")
    need = grads_v_from_d_smem_bytes(C, block_v, dt.itemsize, steps)
    if need > m.SMEM_BYTES:
        raise ValueError(f"block_v={block_v}, steps={steps} need {need} bytes of shared memory"
                         f" per CTA, more than {m.SMEM_BYTES}")


def grads_v_from_d(v, Tinv, dD, do, D, G, beta, seg=None, *, scale: float, block_v: int = 32,
                   steps: int = 2):
    """The V side of the local gradients and ``dPs`` from ``D`` instead of ``dW``, on Mosaic
    GPU (one warpgroup per batch row, chunk and head; V tiles streamed in by
    :func:`plgpu.emit_pipeline`): ``dv = beta T^T dD`` (``v``'s dtype), the V part of
    ``dbeta`` (``sum_v (T^T dD) o V``), ``dA = -T^T (dD D^T)`` (strictly lower; equal to the
    V side's ``-T^T dT T^T``: ``dT = dD (beta V - beta gamma X h_in)^T = dD D^T (I + A)^T``),
    ``dPs = scale (dO D^T) o decay o causal`` (``chunk_dqkw``'s) and ``T`` rounded to the
    compute dtype, so that the K side's ``[C, C]`` part can run before the state-side
    gradients and :func:`dqkw_products` can fuse those with the K side's products.

    ``v, dD, do, D [B, Tp, H, V]`` in the compute dtype, ``Tinv [B, Tp, H, C]``, ``G, beta
    [B, Tp, H]`` float32. Returns ``dv``, ``dbv [B, Tp, H]``, ``dA, dPs [B, Tp, H, C]``
    float32 and ``Tb [B, Tp, H, C]`` (compute dtype): the contract of
    :func:`qdelta_jax.pallas.backward.grads_v_from_d_xla`. ``seg [B, Tp]``: document ids of
    packed rows (``dPs``'s decay cut at documents; ``dA`` needs none: ``T`` and ``D`` hold
    them). Chunk 64. Status: lowered for CUDA in CI; on a GPU ``benchmarks/mosaic_dev.py
    --fused-local`` checks it on unpacked rows and ``qdelta-check --docs 32`` end to end on
    packed ones.

    Raises ``RuntimeError`` without Mosaic GPU, ``ValueError`` for what it does not take."""
    m._require_plgpu()
    plgpu = m.plgpu
    B, Tp, H, V = v.shape
    C = Tinv.shape[-1]
    dt = jnp.dtype(v.dtype)
    check_grads_v_from_d_supported(V=V, C=C, dtype=dt, block_v=block_v, steps=steps)
    if Tp % C:
        raise ValueError(f"v has {Tp} time steps, not a multiple of chunk_size={C}")
    rows_v, rows_c, vecs = (B, Tp, H, V), (B, Tp, H, C), (B, Tp, H)
    m.check_args((("Tinv", Tinv, rows_c), ("dD", dD, rows_v), ("do", do, rows_v),
                  ("D", D, rows_v), ("G", G, vecs), ("beta", beta, vecs))
                 + ((("seg", seg, (B, Tp)),) if seg is not None else ()),
                 dt, (("dD", dD), ("do", do), ("D", D)))
    m.check_args((), jnp.dtype(F32), (("Tinv", Tinv), ("beta", beta)))
    segmented = seg is not None
    NC, BV = Tp // C, block_v
    nv = V // BV
    # With V tiles of 32 the [C, C] operands that meet [C, BV] ones (T^T dD) take their
    # 64-byte swizzle (both operands of a wgmma need the same); dA's products follow.
    tc = m._transforms(C, dt, cap=m._swizzle(BV, dt))
    smem = lambda shape, dtype, t=(): plgpu.SMEM(shape, dtype, transforms=t)  # noqa: E731
    scratch = [
        smem((C, C), F32, m._transforms(C, F32)),  # T, then dA, then dPs
        smem((C, C), dt, tc), smem((C, C), dt, tc),  # T high, low
        smem((C, C), dt, tc), smem((C, C), dt, tc),  # (dD D^T)^T high, low
        smem((C,), F32), smem((C,), F32), smem((C,), F32),  # G, beta, the dbeta part
    ] + ([smem((C,), jnp.int32)] if segmented else []) + [  # document ids
        plgpu.Barrier(num_barriers=4 if segmented else 3),
    ]
    out_type = (jax.ShapeDtypeStruct(rows_v, v.dtype), jax.ShapeDtypeStruct((B, H, Tp), F32),
                jax.ShapeDtypeStruct(rows_c, F32), jax.ShapeDtypeStruct(rows_c, F32),
                jax.ShapeDtypeStruct(rows_c, dt))
    body = functools.partial(_grads_v_from_d_kernel, C=C, BV=BV, nv=nv, scale=float(scale),
                             steps=min(steps, nv), dt=dt)
    sw = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731 - [B, Tp, H] <-> [B, H, Tp]
    dv, dbv, dA, dPs, Tb = m.call_kernel(
        body,
        (v, dD, do, D, Tinv, sw(G.astype(F32)), sw(beta),
         *([seg.astype(jnp.int32)] if segmented else [])),
        wrap=lambda f: _with_seg_refs(f, 8 if segmented else 7, 5, segmented),
        out_type=out_type, scratch_types=scratch, grid=(B, NC, H), grid_names=("b", "c", "h"),
        compiler_params=m.lane_params())
    return dv, sw(dbv), dA, dPs, Tb


# ----------------------------------------------------------------------------- K-side products


def products_smem_bytes(C: int, BK: int, itemsize: int) -> int:
    """Shared memory of one CTA of :func:`grads_k_products`: ``q, k, dW`` and the ``dq, dk``
    staging tiles (``[C, BK]``, compute dtype), ``T`` in float32 and in the compute dtype,
    ``M, S`` (``[C, C]``), ``dq_part, dk_part`` (``[C, BK]`` float32) and four ``[C]``
    vectors: about 113 KB at C 64, BK 64, bf16."""
    return ((5 * C * BK + 3 * C * C) * itemsize + 4 * C * C + 2 * 4 * C * BK + 4 * 4 * C)


def _products_kernel(q_ref, k_ref, t_ref, dw_ref, m_ref, s_ref, dqp_ref, dkp_ref, lbg_ref,
                     bg_ref, dq_ref, dk_ref, sq_ref, sk_ref,
                     q_s, k_s, dw_s, t32_s, t_s, m_s, s_s, dqp_s, dkp_s, lbg_s, bg_s,
                     oq_s, ok_s, sq_s, sk_s, bars, *, C, BK, dt):
    plgpu = m.plgpu
    b, c, h, kt = (lax.axis_index(n) for n in ("b", "c", "h", "kt"))
    rows, cols = pl.ds(c * C, C), pl.ds(kt * BK, BK)
    loads = ((q_ref.at[b, rows, h, cols], q_s), (k_ref.at[b, rows, h, cols], k_s),
             (dw_ref.at[b, rows, h, cols], dw_s), (t_ref.at[b, rows, h, :], t32_s),
             (m_ref.at[b, rows, h, :], m_s), (s_ref.at[b, rows, h, :], s_s),
             (dqp_ref.at[b, rows, h, cols], dqp_s), (dkp_ref.at[b, rows, h, cols], dkp_s),
             (lbg_ref.at[b, h, rows], lbg_s), (bg_ref.at[b, h, rows], bg_s))
    m.copy_in(loads, bars)

    wg = plgpu.Layout.WGMMA
    # T is kept in float32 for the V side's dA; its products here take it in the compute
    # dtype, as the Triton kernel's do.
    t_s[...] = m._load(t32_s, wg).astype(dt)
    plgpu.commit_smem()
    _k_side_products(m._load(dqp_s, wg), m._load(dkp_s, wg), t_s, dw_s, m_s, s_s, q_s, k_s,
                     lbg_s, bg_s, oq_s, ok_s, sq_s, sk_s, dt)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(oq_s, dq_ref.at[b, rows, h, cols])
    plgpu.copy_smem_to_gmem(ok_s, dk_ref.at[b, rows, h, cols])
    plgpu.copy_smem_to_gmem(sq_s, sq_ref.at[kt, b, h, rows])
    plgpu.copy_smem_to_gmem(sk_s, sk_ref.at[kt, b, h, rows])
    plgpu.wait_smem_to_gmem(0)


def check_products_supported(*, K: int, C: int, dtype, block_k: int = 64) -> None:
    """Raises ``ValueError`` naming the first size or dtype :func:`grads_k_products` does not
    take."""
    m.check_dtype_and_chunk(dtype, C, "the Mosaic GPU K-side products take",
                           "the Mosaic GPU K-side products need")
    if block_k != 64 or K % block_k:
        raise ValueError(f"the Mosaic GPU K-side products need K a multiple of 64, got K={K}")


def grads_k_products(q, k, Tinv, dW, M, S, dq_part, dk_part, lbg, bg, *, block_k: int = 64):
    """The matmul half of the K-side local gradients on Mosaic GPU, with the contract of
    :func:`qdelta_jax.pallas.backward.grads_k_products_xla`: one warpgroup per (batch row,
    chunk, head, K tile of 64); ``dbx = T^T dW``, ``M k``, ``S k`` and ``M^T q`` as wgmmas
    onto accumulators that start from ``dq_part``, ``dk_part``; then ``dq = dq_part + M k +
    lbg dbx``, ``dk = dk_part + S k + M^T q + bg dbx`` (compute dtype) and the row sums
    ``dbx . q``, ``dbx . k`` (float32; each K tile's part, summed here).

    ``q, k, dW [B, Tp, H, K]`` in the compute dtype, ``Tinv [B, Tp, H, C]`` float32,
    ``M, S [B, Tp, H, C]`` compute dtype (:func:`qdelta_jax.pallas.backward.
    chunk_grads_k_phase1`), ``dq_part, dk_part [B, Tp, H, K]`` float32, ``lbg, bg [B, Tp, H]``
    float32. Unpacked rows, chunk 64, K a multiple of 64. Status: lowered for CUDA in CI; on an
    H200 ``benchmarks/mosaic_dev.py --grads-k`` finds it within 3e-5 of the oracle (BENCHMARKS.md).
    :mod:`.core` calls it in the backward of ``implementation="pallas-mosaic"`` unless
    ``Config(mosaic_grads_k=False)``.

    Raises ``RuntimeError`` without Mosaic GPU, ``ValueError`` for what it does not take."""
    m._require_plgpu()
    plgpu = m.plgpu
    B, Tp, H, K = q.shape
    C = Tinv.shape[-1]
    dt = jnp.dtype(q.dtype)
    check_products_supported(K=K, C=C, dtype=dt, block_k=block_k)
    if Tp % C:
        raise ValueError(f"q has {Tp} time steps, not a multiple of chunk_size={C}")
    rows_k, rows_c, vec = (B, Tp, H, K), (B, Tp, H, C), (B, Tp, H)
    m.check_args((("k", k, rows_k), ("Tinv", Tinv, rows_c), ("dW", dW, rows_k),
                  ("M", M, rows_c), ("S", S, rows_c), ("dq_part", dq_part, rows_k),
                  ("dk_part", dk_part, rows_k), ("lbg", lbg, vec), ("bg", bg, vec)),
                 dt, (("k", k), ("dW", dW), ("M", M), ("S", S)))
    m.check_args((), jnp.dtype(F32), (("Tinv", Tinv), ("dq_part", dq_part),
                                      ("dk_part", dk_part), ("lbg", lbg), ("bg", bg)))
    NC, BK = Tp // C, block_k
    nk = K // BK
    tk, tc, tf = m._transforms(BK, dt), m._transforms(C, dt), m._transforms(BK, F32)
    smem = lambda shape, dtype, t=(): plgpu.SMEM(shape, dtype, transforms=t)  # noqa: E731
    scratch = [
        smem((C, BK), dt, tk), smem((C, BK), dt, tk), smem((C, BK), dt, tk),  # q, k, dW
        smem((C, C), F32, m._transforms(C, F32)), smem((C, C), dt, tc),  # T, T in dt
        smem((C, C), dt, tc), smem((C, C), dt, tc),  # M, S
        smem((C, BK), F32, tf), smem((C, BK), F32, tf),  # dq_part, dk_part
        smem((C,), F32), smem((C,), F32),  # lbg, bg
        smem((C, BK), dt, tk), smem((C, BK), dt, tk),  # dq, dk out
        smem((C,), F32), smem((C,), F32),  # the row sums out
        plgpu.Barrier(num_barriers=10),
    ]
    out_type = (jax.ShapeDtypeStruct(rows_k, dt), jax.ShapeDtypeStruct(rows_k, dt),
                jax.ShapeDtypeStruct((nk, B, H, Tp), F32),
                jax.ShapeDtypeStruct((nk, B, H, Tp), F32))
    body = functools.partial(_products_kernel, C=C, BK=BK, dt=dt)
    dq, dk, sq, sk = m.call_kernel(
        body,
        (q, k, Tinv, dW, M, S, dq_part, dk_part, jnp.swapaxes(lbg, 1, 2),
         jnp.swapaxes(bg, 1, 2)),
        out_type=out_type, scratch_types=scratch, grid=(B, NC, H, nk),
        grid_names=("b", "c", "h", "kt"), compiler_params=m.lane_params())
    # Row sums over the K tiles, back to [B, Tp, H].
    return dq, dk, jnp.swapaxes(jnp.sum(sq, axis=0), 1, 2), jnp.swapaxes(jnp.sum(sk, axis=0), 1, 2)
