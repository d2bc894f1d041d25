"""Mosaic GPU (``plgpu``) kernels of the backward: the state-side gradients
(:func:`chunk_dqkw`, the contract of :func:`qdelta_jax.pallas.backward.chunk_dqkw`, one
warpgroup per (batch row, chunk, head, K tile) with its four products as wgmmas accumulating in
registers) and the products of the K-side local gradients (:func:`grads_k_products`,
the contract of :func:`qdelta_jax.pallas.backward.grads_k_products_xla`; see its docstring).

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

Numerics as :mod:`.backward`: every product accumulates in float32 from operands in the
compute dtype, the decays applied in float32 after the products.

Status: lowered for CUDA on the CPU in CI (``tests/test_mosaic.py``); on the GPU
``benchmarks/mosaic_dev.py --dqkw`` checks it against the Triton kernel and times both (on an
H200 it matches it to 3e-5 and is 1.1x to 1.5x faster at the benchmark shapes, BENCHMARKS.md).
:mod:`.core` calls it in the backward of ``implementation="pallas-mosaic"`` unless
``Config(mosaic_dqkw=False)``. Unpacked rows only (``seg`` not taken),
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
    dt = jnp.dtype(dtype)
    if dt not in m.DTYPES:
        raise ValueError(f"the Mosaic GPU dqkw kernel takes bfloat16 or float16, got {dt.name}")
    if C != m.CHUNK:
        raise ValueError(f"the Mosaic GPU dqkw kernel needs chunk_size={m.CHUNK}, got {C}")
    if block_k != C or K % block_k:
        raise ValueError(f"the Mosaic GPU dqkw kernel needs K a multiple of block_k=64, got "
                         f"K={K}, block_k={block_k}")
    if block_v not in (32, 64, 128) or V % block_v:
        raise ValueError(f"block_v must be 32, 64 or 128 dividing V={V}, got {block_v}")
    need = smem_bytes(C, block_k, block_v, dt.itemsize, steps)
    if need > m.SMEM_BYTES:
        raise ValueError(f"block_v={block_v}, steps={steps} need {need} bytes of shared memory"
                         f" per CTA, more than {m.SMEM_BYTES}")


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
    zeros = lambda n: plgpu.layout_cast(jnp.full((C, n), 0, F32), wg)  # noqa: E731
    hd0 = plgpu.layout_cast(jnp.full((BK,), 0, F32), wg.reduce(1))

    def step(_, hin_s, dho_s, do_s, d_s, dd_s, carry):
        doh, dkd, dw, dp, hd = carry

        def products(accs):
            a_doh, a_dkd, a_dw, a_dp = accs
            plgpu.wgmma(a_doh, do_s, hin_s.T)
            plgpu.wgmma(a_dkd, d_s, dho_s.T)
            plgpu.wgmma(a_dw, dd_s, hin_s.T)
            plgpu.wgmma(a_dp, do_s, d_s.T)

        doh, dkd, dw, dp = pl.run_state(products)(
            tuple(plgpu.ACC.init(x) for x in (doh, dkd, dw, dp)))
        hv = m._load(hin_s, wg).astype(F32)
        dv = m._load(dho_s, wg).astype(F32)
        return doh, dkd, dw, dp, hd + jnp.sum(hv * dv, axis=1)

    state_rows = lambda j: (((b * NC + c) * H + h) * nk + kt, j)  # noqa: E731
    tv = m._transforms(BV, dt)
    in_specs = [
        plgpu.BlockSpec((BK, BV), state_rows, transforms=tv),  # h_in as [B NC H K, V]
        plgpu.BlockSpec((BK, BV), state_rows, transforms=tv),  # dh_out
    ] + [plgpu.BlockSpec((None, C, None, BV), lambda j: (b, c, h, j), transforms=tv)] * 3
    doh, dkd, dw, dp, hd = plgpu.emit_pipeline(
        step, grid=(nv,), in_specs=in_specs, max_concurrent_steps=steps,
        init_carry=(zeros(BK), zeros(BK), zeros(BK), zeros(C), hd0),
    )(hin_ref, dho_ref, do_ref, d_ref, dd_ref)

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
        diff = jnp.where(mask, m._rows(Gi, (C, C)) - m._cols(Gj, (C, C)), 0.0)
        dps = jnp.where(mask, scale * dp * jnp.exp(diff), 0.0)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        f_s[...] = dps
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(f_s, dps_ref.at[b, rows, h, :])

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
    call = plgpu.kernel(
        kernel, out_type=out_type, scratch_types=scratch, grid=(B, NC, H, nk),
        grid_names=("b", "c", "h", "kt"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
    )
    dqp, dkp, dW, dg, de, hd, dPs = call(
        q, k, jnp.swapaxes(G.astype(F32), 1, 2), h_in.reshape(B * NC * H * K, V),
        dh_out.reshape(B * NC * H * K, V), do, D, dD)
    # The chunk's last row also gets sum(de) and exp(G_C) sum(h_in o dh_out), summed here.
    dg, de = jnp.sum(dg, axis=0), jnp.sum(de, axis=0)  # over K tiles: [B, H, Tp]
    last = (jnp.sum(de.reshape(B, H, NC, C), axis=-1)
            + jnp.swapaxes(jnp.sum(hd, axis=-1), 1, 2))  # [B, H, NC]
    dg = dg.reshape(B, H, NC, C).at[..., C - 1].add(last).reshape(B, H, Tp)
    return dqp, dkp, dW, jnp.swapaxes(dg, 1, 2), dPs


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
    for i, (src, dst) in enumerate(loads):
        plgpu.copy_gmem_to_smem(src, dst, bars.at[i])
    for i in range(len(loads)):
        plgpu.barrier_wait(bars.at[i])

    wg = plgpu.Layout.WGMMA
    # T is kept in float32 for the V side's dA; its products here take it in the compute
    # dtype, as the Triton kernel's do.
    t_s[...] = m._load(t32_s, wg).astype(dt)
    plgpu.commit_smem()
    zeros = plgpu.layout_cast(jnp.full((C, BK), 0, F32), wg)

    def products(accs):
        a_bx, a_dq, a_dk = accs
        plgpu.wgmma(a_bx, t_s.T, dw_s)  # dbx = T^T dW
        plgpu.wgmma(a_dq, m_s, k_s)  # + M k
        plgpu.wgmma(a_dk, s_s, k_s)  # + S k
        plgpu.wgmma(a_dk, m_s.T, q_s)  # + M^T q

    dbx, dq, dk = pl.run_state(products)((
        plgpu.ACC.init(zeros), plgpu.ACC.init(m._load(dqp_s, wg)),
        plgpu.ACC.init(m._load(dkp_s, wg))))
    lbg = m._load(lbg_s, wg.reduce(1))
    bg = m._load(bg_s, wg.reduce(1))
    # (T diag(s))^T dW = diag(s) dbx: the row terms of dq and dk from the one product.
    oq_s[...] = (dq + m._rows(lbg, dbx.shape) * dbx).astype(dt)
    ok_s[...] = (dk + m._rows(bg, dbx.shape) * dbx).astype(dt)
    sq_s[...] = jnp.sum(dbx * m._load(q_s, wg).astype(F32), axis=1)
    sk_s[...] = jnp.sum(dbx * m._load(k_s, wg).astype(F32), axis=1)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(oq_s, dq_ref.at[b, rows, h, cols])
    plgpu.copy_smem_to_gmem(ok_s, dk_ref.at[b, rows, h, cols])
    plgpu.copy_smem_to_gmem(sq_s, sq_ref.at[kt, b, h, rows])
    plgpu.copy_smem_to_gmem(sk_s, sk_ref.at[kt, b, h, rows])
    plgpu.wait_smem_to_gmem(0)


def check_products_supported(*, K: int, C: int, dtype, block_k: int = 64) -> None:
    """Raises ``ValueError`` naming the first size or dtype :func:`grads_k_products` does not
    take."""
    dt = jnp.dtype(dtype)
    if dt not in m.DTYPES:
        raise ValueError(f"the Mosaic GPU K-side products take bfloat16 or float16, got "
                         f"{dt.name}")
    if C != m.CHUNK:
        raise ValueError(f"the Mosaic GPU K-side products need chunk_size={m.CHUNK}, got {C}")
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
    call = plgpu.kernel(
        functools.partial(_products_kernel, C=C, BK=BK, dt=dt), out_type=out_type,
        scratch_types=scratch, grid=(B, NC, H, nk), grid_names=("b", "c", "h", "kt"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
    )
    dq, dk, sq, sk = call(q, k, Tinv, dW, M, S, dq_part, dk_part,
                          jnp.swapaxes(lbg, 1, 2), jnp.swapaxes(bg, 1, 2))
    # Row sums over the K tiles, back to [B, Tp, H].
    return dq, dk, jnp.swapaxes(jnp.sum(sq, axis=0), 1, 2), jnp.swapaxes(jnp.sum(sk, axis=0), 1, 2)
