"""The forward's chunk-local stage on Mosaic GPU: ``A``, ``T = (I + A)^-1``, ``W`` and ``U`` of
every chunk in one kernel (docs/MATH.md section 2), in place of the Triton solve and W/U
launches (:func:`qdelta_jax.pallas.forward.chunk_local`).

One warpgroup per (batch row, chunk, head). The chunk's ``q, k, v`` arrive by TMA as tiles of
64 columns (the 128-byte swizzle every wgmma operand here shares), ``G, beta, lam`` as float32
vectors. Then, in registers and on the tensor cores:

1. ``X = k + lam q`` rounded to the compute dtype (the XLA path's rounding point) and
   ``X K^T`` as wgmmas with ``X`` from registers; ``A = beta_i (X K^T)_ij exp(G_i - G_j)`` on
   the strictly lower pairs within one document.
2. ``T = (I + A)^-1`` by recursive doubling of the block size: with ``T_s`` the inverse of
   ``A``'s diagonal blocks of size ``s`` (``T_1 = I``), ``T_2s = T_s - T_s L_s T_s`` where
   ``L_s`` holds ``A`` in the lower-left ``s x s`` block of every diagonal ``2s`` block
   (``[[T11, 0], [-T22 A21 T11, T22]]`` for all blocks at once); five levels of two ``[C, C]``
   products for ``C = 64``. Unlike a Neumann series, no intermediate grows beyond the entries
   of ``T`` itself. Each product runs on the high and low bf16 halves of both operands (high x
   high + high x low + low x high: about 16 bits of mantissa, where the Triton solve's float32
   products on the tensor cores keep tf32's 10).
3. ``W = T (beta gamma X)`` and ``U = T (beta V)`` with ``T`` rounded to the compute dtype (as
   the Triton W/U kernel rounds it) from registers, 64 columns a wgmma, written back into the
   operand tiles and stored by TMA; ``T`` itself in float32 only when the backward needs it.

``gamma`` is ``exp(G)`` on the chunk's first document and zero past it (packed rows), as in
:func:`qdelta_jax.xla.gates`. Status: lowered for CUDA in CI (Mosaic GPU's interpret mode does
not run wgmmas with register operands); checked on a GPU by ``benchmarks/mosaic_dev.py
--local`` against :func:`qdelta_jax.xla.chunk_local` and the Triton kernels (on an H200 at
the 340M layer: ``T`` 5.7e-7 from the float32 oracle against the Triton solve's 1.9e-5; ``W``,
``U`` 6e-5 against 2.2e-4; 0.211 against 0.284 ms).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from qdelta_jax.pallas import mosaic as m

F32 = jnp.float32
TILE = 64  # columns of one q / k / v / W / U tile: 128 bytes of bf16, the widest swizzle


def smem_bytes(K: int, V: int, C: int, itemsize: int, with_t: bool) -> int:
    """Shared memory of one CTA: the ``q``, ``k``, ``v`` tiles (then ``W``, ``U``), the high
    and low halves of two ``[C, C]`` operands during the inversion (or the float32 ``T``
    staging tile after it, whichever is larger) and the vectors: about 97 KB at K 128, V 256,
    bf16."""
    scoped = max(4 * C * C * itemsize, 4 * C * C if with_t else 0)
    return (2 * K + V) * C * itemsize + scoped + 4 * 4 * C


def check_supported(*, K: int, V: int, C: int, dtype, with_t: bool = True) -> None:
    """Raises ``ValueError`` naming the first size or dtype the kernel does not take."""
    dt = m.check_dtype_and_chunk(dtype, C, "the Mosaic GPU local stage takes",
                                 "the Mosaic GPU local stage needs")
    for name, n in (("K", K), ("V", V)):
        if n % TILE or n < TILE:
            raise ValueError(f"the Mosaic GPU local stage needs {name} a multiple of {TILE}, "
                             f"got {name}={n}")
    need = smem_bytes(K, V, C, dt.itemsize, with_t)
    if need > m.SMEM_BYTES:
        raise ValueError(f"K={K}, V={V} need {need} bytes of shared memory per CTA in the "
                         f"Mosaic GPU local stage, more than {m.SMEM_BYTES}")


def _level_mask(row, col, s: int):
    """Pairs ``(i, j)`` in one diagonal block of size ``2s``, ``i`` in its lower half and ``j``
    in its upper half (``s`` a power of two)."""
    sh = s.bit_length() - 1
    same = lax.shift_right_logical(row, sh + 1) == lax.shift_right_logical(col, sh + 1)
    lower = lax.bitwise_and(lax.shift_right_logical(row, sh), 1) == 1
    upper = lax.bitwise_and(lax.shift_right_logical(col, sh), 1) == 0
    return same & lower & upper


def _split(x, dt):
    """The high half of ``x`` in ``dt`` and the low half (what the rounding lost)."""
    hi = x.astype(dt)
    return hi, (x - hi.astype(F32)).astype(dt)


def _invert(A, row, col, dt):
    """``(I + A)^-1`` of a strictly lower ``[C, C]`` float32 matrix in the WGMMA layout, by
    recursive doubling (module docstring), its products on bf16 halves through scoped shared
    memory."""
    plgpu = m.plgpu
    C = A.shape[0]
    wg = plgpu.Layout.WGMMA
    zeros = plgpu.layout_cast(jnp.full((C, C), 0, F32), wg)
    # Level 1: the 2 x 2 blocks' inverses [[1, 0], [-a, 1]].
    T = jnp.where(row == col, 1.0, 0.0) - jnp.where(_level_mask(row, col, 1), A, 0.0)

    def levels(th_s, tl_s, yh_s, yl_s):
        t = T
        s = 2
        while s < C:
            L = jnp.where(_level_mask(row, col, s), A, 0.0)
            th, tl = _split(t, dt)
            th_s[...] = th
            tl_s[...] = tl
            plgpu.commit_smem()
            lh, ll = _split(L, dt)

            def left(acc, lh=lh, ll=ll):  # Y = L T
                plgpu.wgmma(acc, lh, th_s)
                plgpu.wgmma(acc, lh, tl_s)
                plgpu.wgmma(acc, ll, th_s)

            y = pl.run_state(left)(plgpu.ACC.init(zeros))
            yh, yl = _split(y, dt)
            yh_s[...] = yh
            yl_s[...] = yl
            plgpu.commit_smem()

            def right(acc, th=th, tl=tl):  # T Y
                plgpu.wgmma(acc, th, yh_s)
                plgpu.wgmma(acc, th, yl_s)
                plgpu.wgmma(acc, tl, yh_s)

            t = t - pl.run_state(right)(plgpu.ACC.init(zeros))
            s *= 2
        return t

    tc = m._transforms(C, dt)
    return pl.run_scoped(levels, *[plgpu.SMEM((C, C), dt, transforms=tc) for _ in range(4)])


def _local_kernel(*refs, C, nk, nv, dt, with_t, segmented):
    plgpu = m.plgpu
    n_in = 7 if segmented else 6
    q_ref, k_ref, v_ref, g_ref, b_ref, l_ref = refs[:6]
    seg_ref = refs[6] if segmented else None
    outs = refs[n_in:n_in + (3 if with_t else 2)]
    w_ref, u_ref = outs[:2]
    t_ref = outs[2] if with_t else None
    scr = list(refs[n_in + len(outs):])
    q_s, k_s, v_s = scr[:nk], scr[nk:2 * nk], scr[2 * nk:2 * nk + nv]
    g_s, b_s, l_s = scr[2 * nk + nv:2 * nk + nv + 3]
    seg_s = scr[2 * nk + nv + 3] if segmented else None
    bars = scr[-1]

    b, c, h = (lax.axis_index(n) for n in ("b", "c", "h"))
    rows = pl.ds(c * C, C)
    cols = lambda t: pl.ds(t * TILE, TILE)  # noqa: E731
    loads = ([(q_ref.at[b, rows, h, cols(t)], q_s[t]) for t in range(nk)]
             + [(k_ref.at[b, rows, h, cols(t)], k_s[t]) for t in range(nk)]
             + [(v_ref.at[b, rows, h, cols(t)], v_s[t]) for t in range(nv)]
             + [(g_ref.at[b, h, rows], g_s), (b_ref.at[b, h, rows], b_s),
                (l_ref.at[b, h, rows], l_s)])
    if segmented:
        loads.append((seg_ref.at[b, rows], seg_s))
    m.copy_in(loads, bars)

    wg = plgpu.Layout.WGMMA
    vec = wg.reduce(1)
    beta = m._load(b_s, vec)
    lam = m._load(l_s, vec)
    row = plgpu.broadcasted_iota(jnp.int32, (C, C), 0, layout=wg)
    col = plgpu.broadcasted_iota(jnp.int32, (C, C), 1, layout=wg)
    # The strictly lower pairs within one document (the third argument feeds only "keep").
    Gi, Gj, gam, _, _, strict, _ = m._gates(g_s, seg_s, seg_s, row > col)
    bg = beta * gam

    # X = k + lam q, rounded, into registers; its q tile then takes beta gamma X (W's operand)
    # and the v tiles beta V (U's): nothing reads q or v after this.
    xs = []
    for t in range(nk):
        qv = m._load(q_s[t], wg).astype(F32)
        kv = m._load(k_s[t], wg).astype(F32)
        x = kv + m._rows(lam, kv.shape) * qv
        xs.append(x.astype(dt))
        q_s[t][...] = (m._rows(bg, x.shape) * x).astype(dt)
    for t in range(nv):
        vv = m._load(v_s[t], wg).astype(F32)
        v_s[t][...] = (m._rows(beta, vv.shape) * vv).astype(dt)
    plgpu.commit_smem()

    def xk(acc):
        for t in range(nk):
            plgpu.wgmma(acc, xs[t], k_s[t].T)

    zeros = lambda n: plgpu.layout_cast(jnp.full((C, n), 0, F32), wg)  # noqa: E731
    xkt = pl.run_state(xk)(plgpu.ACC.init(zeros(C)))
    # exp(G_i - G_j) only where the mask holds, so the exponent never overflows
    diff = jnp.where(strict, m._rows(Gi, (C, C)) - m._cols(Gj, (C, C)), 0.0)
    A = jnp.where(strict, m._rows(beta, (C, C)) * xkt * jnp.exp(diff), 0.0)
    T = _invert(A, row, col, dt)
    th = T.astype(dt)

    def products(tiles, dsts):
        # Two tiles at a time: both wgmmas in flight, 64 accumulator registers a thread.
        for i in range(0, len(tiles), 2):
            pair = tiles[i:i + 2]

            def mm(accs, pair=pair):
                for acc, src in zip(accs, pair):
                    plgpu.wgmma(acc, th, src)

            outs_ = pl.run_state(mm)(tuple(plgpu.ACC.init(zeros(TILE)) for _ in pair))
            for src, o in zip(pair, outs_):
                src[...] = o.astype(dt)  # the tile's operand has been read: it takes the result
        plgpu.commit_smem()
        for src, dst in zip(tiles, dsts):
            plgpu.copy_smem_to_gmem(src, dst)

    products(q_s, [w_ref.at[b, rows, h, cols(t)] for t in range(nk)])
    products(v_s, [u_ref.at[b, rows, h, cols(t)] for t in range(nv)])
    if with_t:
        def store_t(t32_s):
            t32_s[...] = T
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(t32_s, t_ref.at[b, rows, h, :])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(store_t, plgpu.SMEM((C, C), F32, transforms=m._transforms(C, F32)))
    plgpu.wait_smem_to_gmem(0)


def chunk_local(q, k, v, G, beta, lam, seg=None, *, C: int = m.CHUNK, with_t: bool = True):
    """``W [B, Tp, H, K]`` and ``U [B, Tp, H, V]`` in ``q``'s dtype and, with ``with_t``,
    ``T = (I + A)^-1`` as ``[B, Tp, H, C]`` float32 (row ``i`` of the chunk's ``T`` at token
    ``i``; ``None`` without): the contract of :func:`qdelta_jax.pallas.forward.chunk_local`.

    ``q, k [B, Tp, H, K]``, ``v [B, Tp, H, V]`` bfloat16 or float16, ``G [B, Tp, H]`` float32
    (the within-chunk cumulative log decay, restarting at documents), ``beta, lam [B, Tp, H]``,
    ``seg [B, Tp]`` int32 document ids of the row-aligned packed layout or ``None``. Chunk 64,
    K and V multiples of 64.

    Raises ``RuntimeError`` without Mosaic GPU, ``ValueError`` for what it does not take."""
    m._require_plgpu()
    plgpu = m.plgpu
    B, Tp, H, K = q.shape
    V = v.shape[-1]
    dt = jnp.dtype(q.dtype)
    check_supported(K=K, V=V, C=C, dtype=dt, with_t=with_t)
    vec = (B, Tp, H)
    m.check_args((("k", k, q.shape), ("v", v, (B, Tp, H, V)), ("G", G, vec),
                  ("beta", beta, vec), ("lam", lam, vec))
                 + ((("seg", seg, (B, Tp)),) if seg is not None else ()),
                 dt, (("k", k), ("v", v)))
    if Tp % C:
        raise ValueError(f"q has {Tp} time steps, not a multiple of chunk_size={C}")
    NC, nk, nv = Tp // C, K // TILE, V // TILE
    segmented = seg is not None
    tt = m._transforms(TILE, dt)
    scratch = ([plgpu.SMEM((C, TILE), dt, transforms=tt) for _ in range(2 * nk + nv)]
               + [plgpu.SMEM((C,), F32) for _ in range(3)]
               + ([plgpu.SMEM((C,), jnp.int32)] if segmented else [])
               + [plgpu.Barrier(num_barriers=2 * nk + nv + 3 + int(segmented))])
    out_type = [jax.ShapeDtypeStruct((B, Tp, H, K), dt), jax.ShapeDtypeStruct((B, Tp, H, V), dt)]
    if with_t:
        out_type.append(jax.ShapeDtypeStruct((B, Tp, H, C), F32))
    kernel = functools.partial(_local_kernel, C=C, nk=nk, nv=nv, dt=dt, with_t=with_t,
                               segmented=segmented)
    sw = lambda x: jnp.swapaxes(x.astype(F32), 1, 2)  # noqa: E731 - [B, Tp, H] -> [B, H, Tp]
    args = [q, k, v, sw(G), sw(beta), sw(lam)]
    if segmented:
        args.append(seg.astype(jnp.int32))
    out = m.call_kernel(kernel, args, out_type=tuple(out_type), scratch_types=scratch,
                        grid=(B, NC, H), grid_names=("b", "c", "h"),
                        compiler_params=m.lane_params())
    return out[0], out[1], (out[2] if with_t else None)

