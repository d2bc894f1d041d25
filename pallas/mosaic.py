"""Hopper-native (Mosaic GPU, ``plgpu``) kernels of the chunked Q-Delta op: the state pass
with the output fused into it (docs/MATH.md section 2, given ``W``, ``U`` and ``G``), and the
backward's reverse state pass.

Why this exists: the Triton-lowered forward (:mod:`.forward`) runs the state pass and the output
as two launches that cross HBM with ``h_in [B, NC, H, K, V]`` and ``D``, and its state pass
issues its matmuls as plain ``mma`` with synchronous loads. On sm_90 the tensor cores are fed
by ``wgmma`` from shared memory with the accumulator in registers, and TMA copies complete on
barriers without holding threads: here one CTA (one warpgroup) per (batch row, head, V tile)
keeps the float32 state ``h [K, BV]`` in registers across all chunks and, per chunk,

1. ``W h``, ``Q h`` (``[C, K] x [K, BV]``) and ``Q K^T`` (``[C, K] x [K, C]``): three wgmmas
   issued together, reading ``h`` from shared memory in the compute dtype;
2. ``D = U - W h``; ``O = scale (gamma o (Q h) + (Q K^T o decay o causal) D)``, the second
   product with ``P`` from registers;
3. ``h' = gamma_C h + K^T (exp(G_C - G) o D)``: a ``[K, C] x [C, BV]`` wgmma (``K`` read
   transposed from shared memory) accumulating onto ``gamma_C h``;

while :func:`plgpu.emit_pipeline` streams the next chunks' ``Q, K, W, U, G`` in by TMA
(``max_concurrent_steps`` buffers) and ``O`` out. For inference neither ``h_in`` nor ``D``
touches HBM; for training (``residuals=True``) ``h`` and ``D`` are written into the pipeline's
output buffers, which the wgmmas read and TMA then stores as the backward's ``h_in`` and ``D``.
:func:`reverse_state_pass` is the same loop run backwards for ``dh`` (two accumulators, the
decayed ``K``, ``Q`` and ``-W`` rounded in their own pipeline buffers), forming the chunk's
``dD0 = scale P^T dO`` from ``K Q^T`` itself unless it is given.

Numerics: the same rounding points as :func:`qdelta_jax.xla.state_pass` and
:func:`qdelta_jax.xla.chunk_output` (the state and every accumulation in float32, matmul
operands in the compute dtype: ``h`` is rounded before ``W h`` and ``Q h``, ``D`` before
``P D``). By default two reassociations keep the float32 factors out of the rounded operands:
``gamma`` scales ``Q h`` after the product instead of ``Q`` before it, and the chunk-end decay
``exp(G_C - G)`` scales the rows of ``D`` instead of those of ``K``;
``MosaicConfig(scale_operands=True)`` scales ``Q`` and ``K`` instead, as the XLA path does.

Packed documents: ``seg`` (the row-aligned layout of :mod:`qdelta_jax.packing`) masks the
decays, the intra-chunk products and the carried state at every change of document id, in
registers; the state (and in the reverse pass its gradient) is zero across a chunk boundary
where a document starts.

Backend: needs ``jax.experimental.pallas.mosaic_gpu`` (jax >= 0.10) and, to run, an sm_90 GPU.
Importing this module never fails; calling a kernel without Mosaic GPU raises
``RuntimeError``. Off the GPU the kernels can be lowered (``jax.jit(f).trace(...).lower(
lowering_platforms=("cuda",))`` runs the whole Mosaic GPU lowering, register layouts included)
but not run: Mosaic GPU interpret mode (jax 0.11.2) does not simulate a wgmma whose left operand
is in registers (``P`` here) nor accumulators initialised through ``pl.run_state``.
Supported: chunk size 64 (the wgmma M of the ``[C, *]`` products), K a multiple
of 64 up to 256, V tiles of 32, 64 or 128 dividing V, bfloat16 or float16 inputs, one sequence per
batch row (the state starts from ``h0[b]`` at chunk 0 and ends at the last chunk) or the
row-aligned packed layout; not the per-document layout (``cu_seqlens`` with states in or out).
:func:`check_supported` says why a shape is not.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # Mosaic GPU ships with jax >= 0.10; the module must import on any jax.
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError as e:  # pragma: no cover - depends on the installed jax
    plgpu = None
    _IMPORT_ERROR: Exception | None = e
else:
    _IMPORT_ERROR = None

F32 = jnp.float32
CHUNK = 64  # wgmma's M for the [C, *] accumulators of one warpgroup
SMEM_BYTES = 227 * 1024  # shared memory a CTA may use on an H100 / H200
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SEMANTICS = ("lane", "warpgroup")


def available() -> bool:
    """Whether ``jax.experimental.pallas.mosaic_gpu`` imported (not whether a GPU is present)."""
    return plgpu is not None


def _require_plgpu():
    if plgpu is None:
        raise RuntimeError(
            "the Mosaic GPU kernels need jax.experimental.pallas.mosaic_gpu, which failed to"
            f" import with jax {jax.__version__}: {_IMPORT_ERROR!r}"
        )


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Launch settings of :func:`state_output`.

    ``block_v``: the V tile of one CTA (32, 64 or 128; the grid is ``B x H x V / block_v``;
    with 32 the ``[C, K]`` operands take the 64-byte swizzle of the ``[*, 32]`` ones).
    ``max_concurrent_steps``: chunks in flight in the TMA pipeline (1: the next chunk's loads
    start only after this chunk's math; 2 or more: they overlap it).
    ``lowering_semantics``: ``"lane"`` (register layouts as the kernel states them) or
    ``"warpgroup"`` (Pallas infers them; jax 0.11.2 finds no solution for this kernel, after
    minutes of search).
    ``scale_operands``: where the float32 decays meet the rounded matmul operands. ``False``:
    ``gamma`` scales the product ``Q h`` and ``exp(G_C - G)`` the rows of ``D`` (a second
    ``[C, BV]`` buffer). ``True``: they scale ``Q`` and ``K`` before rounding, in their pipeline
    buffers once ``Q K^T`` has read them, the rounding points of :mod:`.forward` and
    :mod:`qdelta_jax.xla` (``O``, ``h_in``, ``D`` as theirs up to float32 summation order)."""

    block_v: int = 64
    max_concurrent_steps: int = 2
    lowering_semantics: str = "lane"
    scale_operands: bool = False

    def __post_init__(self):
        if self.block_v not in (32, 64, 128):
            raise ValueError(f"block_v must be 32, 64 or 128, got {self.block_v}")
        if not isinstance(self.max_concurrent_steps, int) or self.max_concurrent_steps < 1:
            raise ValueError(
                f"max_concurrent_steps must be an int >= 1, got {self.max_concurrent_steps!r}"
            )
        if not isinstance(self.scale_operands, bool):
            raise ValueError(f"scale_operands must be a bool, got {self.scale_operands!r}")
        if self.lowering_semantics not in SEMANTICS:
            raise ValueError(
                f"lowering_semantics must be one of {SEMANTICS}, got {self.lowering_semantics!r}"
            )


def smem_bytes(K: int, C: int, BV: int, itemsize: int, steps: int, out_itemsize: int,
               residuals: bool = False, segmented: bool = False,
               scale_operands: bool = False) -> int:
    """Shared memory of one CTA: ``steps`` pipeline buffers of ``Q, K, W`` (``[C, K]``), ``U``
    and ``O`` (``[C, BV]``), ``G`` (``[C]`` float32) and with ``segmented`` the two ``[C]``
    int32 id vectors; ``h`` (``[K, BV]``) and ``D`` (``[C, BV]``) in the compute dtype, once as
    scratch or, with ``residuals``, ``steps`` times as output buffers; the decayed ``D`` (not
    with ``scale_operands``); the float32 ``[K, BV]`` buffer that carries ``h0`` in and the
    final state out lives in scopes of its own before and after the pipeline, reusing the
    pipeline buffers' bytes (at ``steps=1`` and ``block_v=64`` the CTA fits twice on a
    multiprocessor)."""
    hd = (K * BV + C * BV) * itemsize
    per_step = 3 * C * K * itemsize + C * BV * (itemsize + out_itemsize) + 4 * C
    per_step += 8 * C if segmented else 0
    per_step += hd if residuals else 0
    dd = 0 if scale_operands else C * BV * itemsize
    return (0 if residuals else hd) + dd + max(steps * per_step, 4 * K * BV)


def check_supported(*, K: int, V: int, C: int, dtype, out_dtype=None,
                    cfg: MosaicConfig | None = None, residuals: bool = False,
                    segmented: bool = False) -> None:
    """Raises ``ValueError`` naming the first size, dtype or setting this kernel does not take
    (see the module docstring)."""
    cfg = cfg or MosaicConfig()
    dt = jnp.dtype(dtype)
    if dt not in DTYPES:
        raise ValueError(
            f"the Mosaic GPU kernel takes bfloat16 or float16 inputs (wgmma of 16-bit operands),"
            f" got dtype={dt.name}"
        )
    if C != CHUNK:
        raise ValueError(f"the Mosaic GPU kernel needs chunk_size={CHUNK}, got chunk_size={C}")
    if K % 64 or not 64 <= K <= 256:
        raise ValueError(f"the Mosaic GPU kernel needs K a multiple of 64 up to 256, got K={K}")
    if V % cfg.block_v:
        raise ValueError(f"V={V} is not a multiple of block_v={cfg.block_v}")
    osz = jnp.dtype(out_dtype or dt).itemsize
    need = smem_bytes(K, C, cfg.block_v, dt.itemsize, cfg.max_concurrent_steps, osz,
                      residuals, segmented, cfg.scale_operands)
    if need > SMEM_BYTES:
        raise ValueError(
            f"K={K}, block_v={cfg.block_v}, max_concurrent_steps={cfg.max_concurrent_steps}"
            f"{', residuals' if residuals else ''}{', seg' if segmented else ''} need"
            f" {need} bytes of shared memory per CTA, more than {SMEM_BYTES}"
        )


def check_args(shapes, dt, same_dtype) -> None:
    """Raises ``ValueError`` naming the first argument of a kernel call whose shape is not the
    expected one (``shapes``: ``(name, array, shape)``) or, among ``same_dtype`` (``(name,
    array)``), whose dtype is not ``dt``."""
    for name, x, shape in shapes:
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")
    for name, x in same_dtype:
        if jnp.dtype(x.dtype) != dt:
            raise ValueError(f"{name} has dtype {jnp.dtype(x.dtype).name}, expected {dt.name}")


_KERNELS: dict = {}


def copy_in(loads, bars, wait: bool = True) -> None:
    """Starts one TMA copy per ``(gmem source, smem destination)`` of ``loads``, each on its own
    barrier of ``bars``, all in flight together; with ``wait``, waits for all of them."""
    for i, (src, dst) in enumerate(loads):
        plgpu.copy_gmem_to_smem(src, dst, bars.at[i])
    if wait:
        for i in range(len(loads)):
            plgpu.barrier_wait(bars.at[i])


def lane_params():
    """The compiler parameters of the kernels that state their register layouts (lane-level
    lowering semantics)."""
    return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane)


def check_dtype_and_chunk(dtype, C: int, takes: str, needs: str):
    """The checks the chunk-parallel kernels share: ``dtype`` bfloat16 or float16 (returned as
    a ``jnp.dtype``) and chunk 64; ``takes`` / ``needs`` start the messages."""
    dt = jnp.dtype(dtype)
    if dt not in DTYPES:
        raise ValueError(f"{takes} bfloat16 or float16, got {dt.name}")
    if C != CHUNK:
        raise ValueError(f"{needs} chunk_size={CHUNK}, got {C}")
    return dt


def call_kernel(body, args, *, wrap=None, **kw):
    """``plgpu.kernel(wrap(body), **kw)(*args)`` through one ``jax.jit`` per kernel: per
    ``body`` (a ``functools.partial`` of the kernel function: the function and the settings it
    was built with), ``kw`` and the arguments' shapes and dtypes. ``wrap`` (default: none)
    adapts the body's signature; what it does must follow from the arguments (as
    ``mosaic_backward._with_seg_refs`` follows from whether document ids are passed).

    Why: a model calls the same kernel in every layer. Called directly, each call lowers its
    own copy of the kernel's Mosaic GPU module (about 0.4 MB of serialized IR in the custom
    call), and with jax 0.11 the copies differ by layer (different kernel hashes), so jaxlib
    compiles every copy: the unrolled 340m training step's compile grew by about 7 s a layer
    on an H200. Through one jitted function per kernel the calls share one traced jaxpr, which
    the lowering emits once and calls from every layer: one module, one hash, one compile."""
    key = (body.func, tuple(sorted(body.keywords.items())), repr(sorted(kw.items())),
           tuple((tuple(a.shape), jnp.dtype(a.dtype).name) for a in args))
    fn = _KERNELS.get(key)
    if fn is None:
        fn = _KERNELS[key] = jax.jit(plgpu.kernel(body if wrap is None else wrap(body), **kw))
    return fn(*args)


def _swizzle(minor: int, dt) -> int:
    """The widest shared-memory swizzle (bytes) a row of ``minor`` elements takes."""
    return plgpu.find_swizzle(minor * jnp.dtype(dt).itemsize * 8)


def _transforms(minor: int, dt, cap: int | None = None):
    """Tiling and swizzle of a wgmma operand whose minor dimension holds ``minor`` elements;
    ``cap`` bounds the swizzle (bytes). Why a bound: both shared-memory operands of one wgmma
    need the same swizzle, so with V tiles of 32 (64-byte rows) the ``[C, K]`` operands that
    meet ``[*, BV]`` ones (``W h``, ``Q h``, ``K^T D``) take 64 bytes too."""
    swizzle = _swizzle(minor, dt)
    if cap is not None:
        swizzle = min(swizzle, cap)
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dt).itemsize)),
            plgpu.SwizzleTransform(swizzle))


def _load(ref, layout):
    """``ref[...]`` in registers with ``layout`` (jax 0.10's ``plgpu.load`` takes the index as
    a required argument, jax 0.11 deprecates it)."""
    try:
        return plgpu.load(ref, layout=layout)
    except TypeError:  # pragma: no cover - jax 0.10
        return plgpu.load(ref, (), layout=layout)


def _load_f32_tile(src, bar):
    """A float32 ``[K, BV]`` tile of ``src`` (gmem) in registers, through a shared-memory
    buffer that lives only for the copy: allocated in its own scope, it takes no room from the
    pipeline buffers that follow (scoped allocations reuse the same bytes), so the pipeline
    plus this tile ask for ``max`` rather than the sum of the two."""
    def body(f_s):
        plgpu.copy_gmem_to_smem(src, f_s, bar)
        plgpu.barrier_wait(bar)
        return _load(f_s, plgpu.Layout.WGMMA)

    return pl.run_scoped(body, plgpu.SMEM(src.shape, F32,
                                          transforms=_transforms(src.shape[-1], F32)))


def _store_f32_tile(x, dst):
    """Writes the float32 register tile ``x`` to ``dst`` (gmem) through a scoped buffer, as
    :func:`_load_f32_tile` reads one."""
    def body(f_s):
        f_s[...] = x
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(f_s, dst)
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(body, plgpu.SMEM(dst.shape, F32, transforms=_transforms(dst.shape[-1], F32)))


def _rows(x, shape):
    """A vector along the rows of a 2-D tile (``x[:, None]``, in a form the Mosaic GPU layouts
    take)."""
    return lax.broadcast_in_dim(x, shape, [0])


def _cols(x, shape):
    """A vector along the columns of a 2-D tile (``x[None, :]``)."""
    return lax.broadcast_in_dim(x, shape, [1])


def _gates(g_s, seg_s, segp_s, causal):
    """The decays of one chunk from its ``G`` (and document ids) in shared memory, in the
    layouts of a ``[C, *]`` accumulator: ``G`` along its rows and along its columns, ``gam``
    (``exp(G)``, zero past the first document), ``e`` (``exp(G_C - G)``, zero before the last
    document), the scalar ``aC`` (``exp(G_C)``, zero when a document starts inside the chunk),
    the ``[C, C]`` mask of pairs ``i >= j`` in one document, and ``keep`` (None without
    documents): 0.0 where a document starts exactly at the chunk start (no state crosses into
    it), else 1.0."""
    C = g_s.shape[0]
    Gi = _load(g_s, plgpu.Layout.WGMMA.reduce(1))
    Gj = _load(g_s, plgpu.Layout.WGMMA.reduce(0))
    gC = g_s[C - 1]
    if seg_s is None:
        return Gi, Gj, jnp.exp(Gi), jnp.exp(gC - Gi), jnp.exp(gC), causal, None
    # ``seg`` does not decrease: the chunk's first and last documents are at its ends.
    si = _load(seg_s, plgpu.Layout.WGMMA.reduce(1))
    sj = _load(seg_s, plgpu.Layout.WGMMA.reduce(0))
    s0, sC = seg_s[0], seg_s[C - 1]
    keep = jnp.where(segp_s[0] == s0, 1.0, 0.0).astype(F32)
    first, last = si == s0, si == sC
    gam = jnp.where(first, jnp.exp(jnp.where(first, Gi, 0.0)), 0.0)
    e = jnp.where(last, jnp.exp(jnp.where(last, gC - Gi, 0.0)), 0.0)
    aC = jnp.where(s0 == sC, jnp.exp(gC), 0.0).astype(F32)
    mask = None if causal is None else causal & (_rows(si, (C, C)) == _cols(sj, (C, C)))
    return Gi, Gj, gam, e, aC, mask, keep


def _causal(C, transposed: bool = False):
    """The ``i >= j`` mask (row ``i``, column ``j``; ``transposed``: ``i <= j``) in the layout
    of a ``[C, C]`` accumulator."""
    row = plgpu.broadcasted_iota(jnp.int32, (C, C), 0, layout=plgpu.Layout.WGMMA)
    col = plgpu.broadcasted_iota(jnp.int32, (C, C), 1, layout=plgpu.Layout.WGMMA)
    return row <= col if transposed else row >= col


def _kernel(*refs, C, NC, H, BV, scale, steps, dt, residuals, segmented, scale_operands):
    n_in = 7 if segmented else 5
    n_out = 4 if residuals else 2
    ins = refs[:n_in]
    h0_ref = refs[n_in]
    outs = refs[n_in + 1:n_in + 1 + n_out]
    o_ref, fin_ref = outs[:2]
    scratch = list(refs[n_in + 1 + n_out:])
    if not residuals:  # h and D only feed the wgmmas: scratch buffers instead of outputs
        h_scr, d_scr = scratch[:2]
        scratch = scratch[2:]
    dd_s = None if scale_operands else scratch.pop(0)
    (bar,) = scratch
    b, h, j = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
    K = ins[0].shape[-1]
    vs = pl.ds(j * BV, BV)
    state0 = _load_f32_tile(h0_ref.at[b, h, :, vs], bar)

    causal = _causal(C)

    def chunk(_, *refs):
        q_s, k_s, w_s, u_s, g_s = refs[:5]
        seg_s, segp_s = refs[5:7] if segmented else (None, None)
        o_s, *res_s = refs[n_in:n_in + n_out - 1]
        state = refs[-1]
        h_s, d_s = res_s if residuals else (h_scr, d_scr)
        Gi, Gj, gam, e, aC, mask, keep = _gates(g_s, seg_s, segp_s, causal)
        if keep is not None:
            state = state * keep
        h_s[...] = state.astype(dt)
        plgpu.commit_smem()  # h is read by wgmma (the async proxy) below
        if scale_operands:
            def products(acc_wh, acc_p):
                plgpu.wgmma(acc_wh, w_s, h_s)
                plgpu.wgmma(acc_p, q_s, k_s.T)
                return acc_wh[...], acc_p[...]

            wh, qk = pl.run_scoped(products, plgpu.ACC((C, BV), F32), plgpu.ACC((C, C), F32))
            # Q K^T has read q and k: their buffers now take gamma Q and exp(G_C - G) K.
            qv = _load(q_s, plgpu.Layout.WGMMA).astype(F32)
            kv = _load(k_s, plgpu.Layout.WGMMA).astype(F32)
            q_s[...] = (qv * _rows(gam, qv.shape)).astype(dt)
            k_s[...] = (kv * _rows(e, kv.shape)).astype(dt)
        else:
            def products(acc_wh, acc_qh, acc_p):
                plgpu.wgmma(acc_wh, w_s, h_s)
                plgpu.wgmma(acc_qh, q_s, h_s)
                plgpu.wgmma(acc_p, q_s, k_s.T)
                return acc_wh[...], acc_qh[...], acc_p[...]

            wh, qh, qk = pl.run_scoped(
                products, plgpu.ACC((C, BV), F32), plgpu.ACC((C, BV), F32),
                plgpu.ACC((C, C), F32)
            )
        D = _load(u_s, plgpu.Layout.WGMMA).astype(F32) - wh
        d_s[...] = D.astype(dt)
        if not scale_operands:
            dd_s[...] = (D * _rows(e, D.shape)).astype(dt)
        plgpu.commit_smem()
        # exp(G_i - G_j) only where the mask holds, so the exponent never overflows
        diff = jnp.where(mask, _rows(Gi, (C, C)) - _cols(Gj, (C, C)), 0.0)
        P = jnp.where(mask, qk * jnp.exp(diff), 0.0).astype(dt)

        if scale_operands:
            def updates(accs):
                acc_o, acc_h = accs
                plgpu.wgmma(acc_o, q_s, h_s)
                plgpu.wgmma(acc_o, P, d_s)
                plgpu.wgmma(acc_h, k_s.T, d_s)

            o0 = plgpu.ACC.init(
                plgpu.layout_cast(jnp.full((C, BV), 0, F32), plgpu.Layout.WGMMA))
        else:
            def updates(accs):
                acc_o, acc_h = accs
                plgpu.wgmma(acc_o, P, d_s)
                plgpu.wgmma(acc_h, k_s.T, dd_s)

            o0 = plgpu.ACC.init(_rows(gam, qh.shape) * qh)
        o, state = pl.run_state(updates)((o0, plgpu.ACC.init(aC * state)))
        o_s[...] = (scale * o).astype(o_s.dtype)
        return state

    tv = _transforms(BV, dt)
    tk = _transforms(K, dt, cap=_swizzle(BV, dt))
    rows_k = lambda c: (b, c, h, 0)  # noqa: E731
    rows_v = lambda c: (b, c, h, j)  # noqa: E731
    in_specs = [
        plgpu.BlockSpec((None, C, None, K), rows_k, transforms=tk),  # q
        plgpu.BlockSpec((None, C, None, K), rows_k, transforms=tk),  # k
        plgpu.BlockSpec((None, C, None, K), rows_k, transforms=tk),  # W
        plgpu.BlockSpec((None, C, None, BV), rows_v, transforms=tv),  # U
        plgpu.BlockSpec((None, None, C), lambda c: (b, h, c)),  # G, [B, H, Tp]
    ]
    if segmented:  # seg and seg shifted by one token, [B, Tp]
        in_specs += [plgpu.BlockSpec((None, C), lambda c: (b, c))] * 2
    out_specs = [plgpu.BlockSpec((None, C, None, BV), rows_v, transforms=tv)]  # O
    if residuals:
        out_specs += [
            # h_in as [B NC H K, V]: one 2-D TMA copy of [K, BV] per chunk
            plgpu.BlockSpec((K, BV), lambda c: ((b * NC + c) * H + h, j), transforms=tv),
            plgpu.BlockSpec((None, C, None, BV), rows_v, transforms=tv),  # D
        ]
    final = plgpu.emit_pipeline(
        chunk,
        grid=(NC,),
        in_specs=in_specs,
        out_specs=out_specs,
        max_concurrent_steps=steps,
        init_carry=state0,
    )(*ins, *outs[:1], *outs[2:])
    _store_f32_tile(final, fin_ref.at[b, h, :, vs])


def state_output(q, k, G, W, U, h0, seg=None, *, scale: float, out_dtype=None,
                 residuals: bool = False, C: int = CHUNK, cfg: MosaicConfig | None = None):
    """The fused state pass and output of the chunked forward.

    Args (the padded layout of :mod:`qdelta_jax.packing`, ``Tp = NC C``): ``q, k, W``
    ``[B, Tp, H, K]`` and ``U [B, Tp, H, V]`` in the compute dtype (bfloat16 or float16),
    ``G [B, Tp, H]`` float32 (the within-chunk cumulative log decay,
    :func:`qdelta_jax.packing.chunk_cumsum`, restarting at documents when ``seg`` is given),
    ``h0 [B, H, K, V]`` (the state of row ``b`` at chunk 0).
    ``seg``: ``None`` (one sequence per row) or ``[B, Tp]`` int32 document ids of the
    row-aligned packed layout (non-decreasing along each row): no decay, intra-chunk term or
    carried state crosses a change of id, and the state is zero entering a chunk whose first
    token starts a document (chunk 0 excepted: it starts from ``h0``, which is zero for packed
    rows). ``residuals``: also return what the backward needs.

    Returns ``(O, final)``, or ``(O, final, h_in, D)`` with ``residuals``: ``O [B, Tp, H, V]``
    in ``out_dtype`` (default: ``q``'s dtype), the state leaving the last chunk of each row
    ``final [B, H, K, V]`` float32, and as :func:`qdelta_jax.pallas.forward.state_pass` writes
    them, the chunk-entry states ``h_in [B, NC, H, K, V]`` and the writes
    ``D = U - W h [B, Tp, H, V]``, both in the compute dtype.

    Raises ``RuntimeError`` without Mosaic GPU, ``ValueError`` for shapes and dtypes it does
    not take (:func:`check_supported`)."""
    _require_plgpu()
    cfg = cfg or MosaicConfig()
    B, Tp, H, K = q.shape
    V = U.shape[-1]
    dt = jnp.dtype(q.dtype)
    out_dtype = jnp.dtype(out_dtype or dt)
    segmented = seg is not None
    check_supported(K=K, V=V, C=C, dtype=dt, out_dtype=out_dtype, cfg=cfg,
                    residuals=residuals, segmented=segmented)
    shapes = [("k", k, (B, Tp, H, K)), ("W", W, (B, Tp, H, K)), ("U", U, (B, Tp, H, V)),
              ("G", G, (B, Tp, H)), ("h0", h0, (B, H, K, V))]
    if segmented:
        shapes.append(("seg", seg, (B, Tp)))
    check_args(shapes, dt, (("k", k), ("W", W), ("U", U)))
    if segmented and not jnp.issubdtype(seg.dtype, jnp.integer):
        raise ValueError(f"seg must hold integer document ids, got dtype {seg.dtype}")
    if Tp % C:
        raise ValueError(f"q has {Tp} time steps, not a multiple of chunk_size={C}")
    NC, BV = Tp // C, cfg.block_v
    steps = min(cfg.max_concurrent_steps, NC)
    semantics = {"warpgroup": plgpu.LoweringSemantics.Warpgroup,
                 "lane": plgpu.LoweringSemantics.Lane}[cfg.lowering_semantics]
    kernel = functools.partial(_kernel, C=C, NC=NC, H=H, BV=BV, scale=float(scale),
                               steps=steps, dt=dt, residuals=residuals, segmented=segmented,
                               scale_operands=cfg.scale_operands)
    out_type = [jax.ShapeDtypeStruct((B, Tp, H, V), out_dtype),
                jax.ShapeDtypeStruct((B, H, K, V), F32)]
    scratch = [plgpu.Barrier()]  # h0 in and final out go through scoped buffers
    if not cfg.scale_operands:
        scratch.insert(0, plgpu.SMEM((C, BV), dt, transforms=_transforms(BV, dt)))  # e o D
    if residuals:  # h and D are written from the pipeline's output buffers
        out_type += [jax.ShapeDtypeStruct((B * NC * H * K, V), dt),
                     jax.ShapeDtypeStruct((B, Tp, H, V), dt)]
    else:
        scratch = [plgpu.SMEM((K, BV), dt, transforms=_transforms(BV, dt)),  # h
                   plgpu.SMEM((C, BV), dt, transforms=_transforms(BV, dt))] + scratch  # D
    launch = dict(out_type=tuple(out_type), scratch_types=scratch, grid=(B, H, V // BV),
                  grid_names=("b", "h", "v"),
                  compiler_params=plgpu.CompilerParams(lowering_semantics=semantics))
    # G time-minor, so that one chunk of it is one contiguous 256-byte TMA copy.
    args = [q, k, W, U, jnp.swapaxes(G.astype(F32), 1, 2)]
    if segmented:
        seg = seg.astype(jnp.int32)
        # The id of the token before each one (the first token's own at t = 0): a chunk whose
        # first token differs from its predecessor starts a document.
        segp = jnp.concatenate([seg[:, :1], seg[:, :-1]], axis=1)
        args += [seg, segp]
    out = call_kernel(kernel, args + [h0.astype(F32)], **launch)
    if residuals:
        o, final, h_in, D = out
        return o, final, h_in.reshape(B, NC, H, K, V), D
    return out


# ----------------------------------------------------------------------------- reverse pass


def reverse_smem_bytes(K: int, C: int, BV: int, itemsize: int, steps: int,
                       segmented: bool = False, fused_dd0: bool = False) -> int:
    """Shared memory of one CTA of :func:`reverse_state_pass`: ``steps`` pipeline buffers of
    ``Q, K, W`` (``[C, K]``), ``dO``, ``dD0`` (unless ``fused_dd0``) and ``dD`` (``[C, BV]``),
    ``dh_out`` (``[K, BV]``), ``G`` and the ids; the float32 ``[K, BV]`` buffer of ``dfinal``
    in and ``dh0`` out reuses their bytes before and after the pipeline."""
    per_step = ((3 * C * K + (2 if fused_dd0 else 3) * C * BV + K * BV) * itemsize + 4 * C
                + (8 * C if segmented else 0))
    return max(steps * per_step, 4 * K * BV)


def _reverse_kernel(*refs, C, NC, H, BV, scale, steps, dt, segmented, fused_dd0):
    n_in = (8 if segmented else 6) - int(fused_dd0)
    ins = refs[:n_in]
    dfin_ref, dhout_ref, dd_ref, dh0_ref, bar = refs[n_in:]
    b, h, j = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
    K = ins[0].shape[-1]
    vs = pl.ds(j * BV, BV)
    dh_last = _load_f32_tile(dfin_ref.at[b, h, :, vs], bar)

    # dD0 = scale P^T dO in the kernel: P^T = (K Q^T) o exp(G_i - G_j) over pairs j <= i
    # (row j, column i), the transpose of the forward's mask.
    anticausal = _causal(C, transposed=True)

    def chunk(_, *refs):
        q_s, k_s, w_s, g_s, do_s = refs[:5]
        dd0_s = None if fused_dd0 else refs[5]
        seg_s, segp_s = refs[n_in - 2:n_in] if segmented else (None, None)
        dh_s, dD_s = refs[n_in:n_in + 2]
        dh = refs[-1]
        Gi, Gj, gam, e, aC, mask, keep = _gates(g_s, seg_s, segp_s,
                                                anticausal if fused_dd0 else None)
        if fused_dd0:
            def kq_product(acc):
                plgpu.wgmma(acc, k_s, q_s.T)
                return acc[...]

            kq = pl.run_scoped(kq_product, plgpu.ACC((C, C), F32))
            # exp(G_i - G_j) only where the mask holds, so the exponent never overflows
            diff = jnp.where(mask, _cols(Gj, (C, C)) - _rows(Gi, (C, C)), 0.0)
            PT = jnp.where(mask, (scale * kq) * jnp.exp(diff), 0.0).astype(dt)
        dh_s[...] = dh.astype(dt)
        # The operands as the chain rule of the state pass meets them: exp(G_C - G) K (what
        # wrote into the state), gamma Q (what read it) and -W (negation is exact), rounded
        # in their pipeline buffers.
        kv = _load(k_s, plgpu.Layout.WGMMA).astype(F32)
        k_s[...] = (kv * _rows(e, kv.shape)).astype(dt)
        qv = _load(q_s, plgpu.Layout.WGMMA).astype(F32)
        q_s[...] = (qv * _rows(gam, qv.shape)).astype(dt)
        w_s[...] = -_load(w_s, plgpu.Layout.WGMMA)
        plgpu.commit_smem()

        def dd_update(acc):
            if fused_dd0:
                plgpu.wgmma(acc, PT, do_s)
            plgpu.wgmma(acc, k_s, dh_s)

        dD = pl.run_state(dd_update)(plgpu.ACC.init(
            plgpu.layout_cast(jnp.full((C, BV), 0, F32), plgpu.Layout.WGMMA) if fused_dd0
            else _load(dd0_s, plgpu.Layout.WGMMA).astype(F32)))
        dD_s[...] = dD.astype(dt)
        plgpu.commit_smem()

        def dh_update(accs):
            acc_q, acc_h = accs
            plgpu.wgmma(acc_q, q_s.T, do_s)
            plgpu.wgmma(acc_h, w_s.T, dD_s)

        zeros = plgpu.layout_cast(jnp.full((K, BV), 0, F32), plgpu.Layout.WGMMA)
        qdo, dh_in = pl.run_state(dh_update)((plgpu.ACC.init(zeros), plgpu.ACC.init(aC * dh)))
        dh_in = scale * qdo + dh_in
        # No gradient crosses back into the document before one that starts with this chunk.
        return dh_in if keep is None else dh_in * keep

    tv = _transforms(BV, dt)
    tk = _transforms(K, dt, cap=_swizzle(BV, dt))
    rows_k = lambda c: (b, NC - 1 - c, h, 0)  # noqa: E731
    rows_v = lambda c: (b, NC - 1 - c, h, j)  # noqa: E731
    in_specs = [plgpu.BlockSpec((None, C, None, K), rows_k, transforms=tk)] * 3  # q, k, W
    in_specs += [
        plgpu.BlockSpec((None, None, C), lambda c: (b, h, NC - 1 - c)),  # G, [B, H, Tp]
        plgpu.BlockSpec((None, C, None, BV), rows_v, transforms=tv),  # dO
    ]
    if not fused_dd0:
        in_specs.append(plgpu.BlockSpec((None, C, None, BV), rows_v, transforms=tv))  # dD0
    if segmented:
        in_specs += [plgpu.BlockSpec((None, C), lambda c: (b, NC - 1 - c))] * 2
    out_specs = [
        plgpu.BlockSpec((K, BV), lambda c: ((b * NC + NC - 1 - c) * H + h, j),
                        transforms=tv),  # dh_out as [B NC H K, V]
        plgpu.BlockSpec((None, C, None, BV), rows_v, transforms=tv),  # dD
    ]
    dh0 = plgpu.emit_pipeline(
        chunk, grid=(NC,), in_specs=in_specs, out_specs=out_specs,
        max_concurrent_steps=steps, init_carry=dh_last,
    )(*ins, dhout_ref, dd_ref)
    _store_f32_tile(dh0, dh0_ref.at[b, h, :, vs])


def reverse_state_pass(q, k, G, W, do, dD0, dfinal, seg=None, *, scale: float, C: int = CHUNK,
                       cfg: MosaicConfig | None = None):
    """The reverse pass over chunks of the backward (the state gradient), as
    :func:`qdelta_jax.pallas.backward.reverse_state_pass` computes it for one sequence per row
    (or the row-aligned packed layout with ``seg``), one CTA per (batch row, head, V tile)
    with the float32 ``dh [K, BV]`` in registers.

    Per chunk, from the last: ``dh_out = dh``; ``dD = dD0 + (exp(G_C - G) o K) dh``;
    ``dh <- scale (gamma o Q)^T dO + exp(G_C) dh - W^T dD`` (``[C, K] x [K, BV]`` and two
    ``[K, C] x [C, BV]`` wgmmas, with the decayed operands rounded to the compute dtype as
    :mod:`.backward` rounds them; ``cfg.scale_operands`` does not apply).

    Args (layout of :func:`state_output`): ``q, k, W [B, Tp, H, K]``, ``do`` and
    ``dD0 = scale P^T dO`` (:func:`qdelta_jax.pallas.backward.chunk_dd0`) ``[B, Tp, H, V]`` in
    the compute dtype, or ``dD0=None``: each CTA forms ``scale P^T dO`` for its V tile from
    ``K Q^T`` (one more ``[C, K] x [K, C]`` and one ``[C, C] x [C, BV]`` wgmma a chunk, in
    place of the ``chunk_dd0`` launch and of reading ``dD0``; ``P^T`` rounded to the compute
    dtype after the scale), ``G [B, Tp, H]`` float32, ``dfinal [B, H, K, V]`` (the gradient of the
    final state of each row; zeros for packed rows), ``seg [B, Tp]`` or ``None``.

    Returns ``dh_out [B, NC, H, K, V]`` (the gradient of the state leaving each chunk) and
    ``dD [B, Tp, H, V]`` in the compute dtype, and ``dh0 [B, H, K, V]`` float32 (the gradient
    of the state entering chunk 0)."""
    _require_plgpu()
    cfg = cfg or MosaicConfig()
    B, Tp, H, K = q.shape
    V = do.shape[-1]
    dt = jnp.dtype(q.dtype)
    check_supported(K=K, V=V, C=C, dtype=dt, cfg=dataclasses.replace(cfg, max_concurrent_steps=1))
    fused = dD0 is None
    shapes = [("k", k, (B, Tp, H, K)), ("W", W, (B, Tp, H, K)), ("G", G, (B, Tp, H)),
              ("do", do, (B, Tp, H, V)), ("dfinal", dfinal, (B, H, K, V))]
    same = [("k", k), ("W", W), ("do", do)]
    if not fused:
        shapes.append(("dD0", dD0, (B, Tp, H, V)))
        same.append(("dD0", dD0))
    if seg is not None:
        shapes.append(("seg", seg, (B, Tp)))
    check_args(shapes, dt, tuple(same))
    if Tp % C:
        raise ValueError(f"q has {Tp} time steps, not a multiple of chunk_size={C}")
    NC, BV = Tp // C, cfg.block_v
    steps = min(cfg.max_concurrent_steps, NC)
    need = reverse_smem_bytes(K, C, BV, dt.itemsize, steps, seg is not None, fused)
    if need > SMEM_BYTES:
        raise ValueError(
            f"K={K}, block_v={BV}, max_concurrent_steps={steps}: the reverse pass needs {need}"
            f" bytes of shared memory per CTA, more than {SMEM_BYTES}"
        )
    semantics = {"warpgroup": plgpu.LoweringSemantics.Warpgroup,
                 "lane": plgpu.LoweringSemantics.Lane}[cfg.lowering_semantics]
    kernel = functools.partial(_reverse_kernel, C=C, NC=NC, H=H, BV=BV, scale=float(scale),
                               steps=steps, dt=dt, segmented=seg is not None,
                               fused_dd0=fused)
    launch = dict(
        out_type=(jax.ShapeDtypeStruct((B * NC * H * K, V), dt),
                  jax.ShapeDtypeStruct((B, Tp, H, V), dt),
                  jax.ShapeDtypeStruct((B, H, K, V), F32)),
        scratch_types=[plgpu.Barrier()],  # dfinal in and dh0 out: scoped buffers
        grid=(B, H, V // BV),
        grid_names=("b", "h", "v"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=semantics),
    )
    args = [q, k, W, jnp.swapaxes(G.astype(F32), 1, 2), do] + ([] if fused else [dD0])
    if seg is not None:
        seg = seg.astype(jnp.int32)
        args += [seg, jnp.concatenate([seg[:, :1], seg[:, :-1]], axis=1)]
    dh_out, dD, dh0 = call_kernel(kernel, args + [dfinal.astype(F32)], **launch)
    return dh_out.reshape(B, NC, H, K, V), dD, dh0
