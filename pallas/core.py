"""The Pallas chunked core: same contract as :func:`qdelta_jax.xla.chunked_core`, with a
``custom_vjp`` whose forward and backward are the kernels of :mod:`.forward` and
:mod:`.backward`. By default (``Config.save_residuals``) the forward keeps ``W, T, h_in, D``
for the backward; switched off, the backward recomputes them.

Packed documents: with ``seg`` (the row-aligned layout of :mod:`qdelta_jax.packing`) every
kernel also reads the chunk's document ids and stops decay, intra-chunk terms and the carried
state at boundaries inside a chunk; without it (no boundary inside any chunk) the kernels compile
without those loads and masks.

Head sizes: K up to 256 and V up to 512. The kernels need powers of two >= 16, so other sizes
are zero-padded here (zeros in the K or V padding are exact: they add nothing to any dot, and
the padded rows / columns of states and outputs are sliced off). Chunk sizes: 16, 32, 64.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp

from qdelta_jax.pallas import _util as u
from qdelta_jax.pallas import backward as bwd
from qdelta_jax.pallas import forward as fwd
from qdelta_jax.pallas import mosaic, mosaic_backward, mosaic_local
from qdelta_jax.pallas.config import Config, get_config, padded_size

log = logging.getLogger(__name__)
FORWARD_BACKENDS = ("auto", "mosaic", "triton")

F32 = jnp.float32
CHUNK_SIZES = (16, 32, 64)
MAX_K = 256
MAX_V = 512


def check_sizes(K: int, V: int, chunk_size: int) -> None:
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(
            f"the Pallas kernels support chunk_size in {CHUNK_SIZES}, got chunk_size={chunk_size}"
        )
    if not 1 <= K <= MAX_K:
        raise ValueError(
            f"the Pallas kernels support key head size K from 1 to {MAX_K} (padded to a power of"
            f" two >= 16), got K={K}"
        )
    if not 1 <= V <= MAX_V:
        raise ValueError(
            f"the Pallas kernels support value head size V from 1 to {MAX_V} (padded to a power"
            f" of two >= 16), got V={V}"
        )


def _states(q, k, v, G, beta, lam, h0, seg, reset, is_last, seq, cfg: Config, C, interp,
            keep_t: bool = True):
    """``(W, T, h_in, D)`` (what the backward needs) and the final states: the solve, W/U and
    the state pass, shared by the forward and the backward's recompute. ``keep_t``: ``T`` in
    float32 for the backward; else in the compute dtype (W/U reads it so)."""
    W, U, Tinv = fwd.chunk_local(q, k, v, G, beta, lam, seg, C=C, cfg=cfg.wu,
                                 interpret=interp, cfg_solve=cfg.solve, t_float32=keep_t)
    h_in, D, final = fwd.state_pass(
        k, G, W, U, h0, reset, is_last, seq, seg, C=C, cfg=cfg.state, interpret=interp
    )
    return (W, Tinv, h_in, D), final


def _forward(q, k, v, G, beta, lam, h0, seg, reset, is_last, seq, scale, cfg: Config, C,
             interp, keep_t: bool = True):
    """``(o, final)`` and the residuals ``(W, T, h_in, D)``."""
    res, final = _states(q, k, v, G, beta, lam, h0, seg, reset, is_last, seq, cfg, C, interp,
                         keep_t)
    _, _, h_in, D = res
    o = fwd.chunk_output(
        q, k, G, h_in, D, seg, scale=scale, out_dtype=v.dtype, C=C, cfg=cfg.output,
        interpret=interp,
    )
    return (o, final), res


@dataclasses.dataclass(frozen=True)
class MosaicUse:
    """Where the Mosaic GPU kernels serve a call: ``infer`` the forward where no gradient is
    taken; ``train`` also the differentiated forward (writing ``h_in, D`` for the backward) and
    the backward's reverse pass."""

    cfg: mosaic.MosaicConfig
    train: bool = False
    reverse_cfg: mosaic.MosaicConfig | None = None  # the reverse pass's (None: ``cfg``)


def _mosaic_h0(h0, seg, B):
    # Packed rows (row-aligned layout) start every document from zero: one zero state per row.
    return jnp.zeros((B,) + h0.shape[1:], F32) if seg is not None else h0


def _mosaic_local_stage(q, k, v, G, beta, lam, seg, cfg: Config, C, interp, residuals: bool):
    """``W, U, T`` for the Mosaic forward: on Mosaic GPU unless ``Config(mosaic_local=False)``,
    where the kernel takes the sizes (``T`` only with ``residuals``), else the Triton solve
    and W/U (the reason in the debug log)."""
    if cfg.mosaic_local is not False:
        try:
            mosaic_local.check_supported(K=q.shape[-1], V=v.shape[-1], C=C, dtype=q.dtype,
                                         with_t=residuals)
        except ValueError as e:
            log.debug("qdelta pallas forward: the Triton solve and W/U, not Mosaic GPU's: %s", e)
        else:
            return mosaic_local.chunk_local(q, k, v, G, beta, lam, seg, C=C, with_t=residuals)
    return fwd.chunk_local(q, k, v, G, beta, lam, seg, C=C, cfg=cfg.wu, interpret=interp,
                           cfg_solve=cfg.solve, t_float32=residuals)


def _mosaic_forward(q, k, v, G, beta, lam, h0, seg, scale, cfg: Config, C, interp, mcfg,
                    residuals: bool):
    W, U, Tinv = _mosaic_local_stage(q, k, v, G, beta, lam, seg, cfg, C, interp, residuals)
    out = mosaic.state_output(q, k, G, W, U, _mosaic_h0(h0, seg, q.shape[0]), seg, scale=scale,
                              out_dtype=v.dtype, residuals=residuals, C=C, cfg=mcfg.cfg)
    o, final = out[0], out[1]
    if seg is not None:  # no final state in the row-aligned layout (h0 passes through)
        final = h0
    return (o, final), ((W, Tinv, out[2], out[3]) if residuals else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(11, 12, 13, 14, 15))
def _core(q, k, v, G, beta, lam, h0, seg, reset, is_last, seq, scale, cfg, C, interp, mcfg):
    # The primal runs where no gradient is taken (inference, prefill); differentiated calls
    # run _core_fwd. With mcfg the Mosaic GPU kernel fuses the state pass and the output.
    if mcfg is not None:
        return _mosaic_forward(q, k, v, G, beta, lam, h0, seg, scale, cfg, C, interp, mcfg,
                               residuals=False)[0]
    return _forward(q, k, v, G, beta, lam, h0, seg, reset, is_last, seq, scale, cfg, C,
                    interp, keep_t=False)[0]


def _core_fwd(q, k, v, G, beta, lam, h0, seg, reset, is_last, seq, scale, cfg, C, interp, mcfg):
    inputs = (q, k, v, G, beta, lam, h0, seg, reset, is_last, seq)
    if mcfg is not None and mcfg.train:
        out, res = _mosaic_forward(q, k, v, G, beta, lam, h0, seg, scale, cfg, C, interp, mcfg,
                                   residuals=cfg.save_residuals)
    else:
        out, res = _forward(*inputs, scale, cfg, C, interp, keep_t=cfg.save_residuals)
    return out, (inputs, res if cfg.save_residuals else None)


def _core_bwd(scale, cfg: Config, C, interp, mcfg, res, cts):
    (q, k, v, G, beta, lam, h0, seg, reset, is_last, seq), saved = res
    do, dfinal = cts
    do = do.astype(q.dtype)
    if saved is None:  # save_residuals off: recompute W, T, h_in, D
        saved, _ = _states(q, k, v, G, beta, lam, h0, seg, reset, is_last, seq, cfg, C, interp)
    W, Tinv, h_in, D = saved
    mosaic_reverse = mcfg is not None and mcfg.train
    dD0 = (None if mosaic_reverse and cfg.mosaic_fused_dd0 is not False else
           bwd.chunk_dd0(q, k, G, do, seg, scale=scale, C=C, cfg=cfg.dd0, interpret=interp))
    if mosaic_reverse:
        B = q.shape[0]
        dfin = jnp.zeros((B,) + h0.shape[1:], F32) if seg is not None else dfinal
        dh_out, dD, dh0 = mosaic.reverse_state_pass(q, k, G, W, do, dD0, dfin.astype(F32), seg,
                                                    scale=scale, C=C,
                                                    cfg=mcfg.reverse_cfg or mcfg.cfg)
        if seg is not None:  # h0 is the layout's internal zero state; its gradient is unused
            dh0 = jnp.zeros_like(h0)
    else:
        dh_out, dD, dh0 = bwd.reverse_state_pass(
            q, k, G, W, do, dD0, dfinal, reset, is_last, seq, seg, scale=scale, C=C,
            cfg=cfg.reverse, interpret=interp,
        )
    dq, dk, dv, dG, db, dl = _local_grads(q, k, v, G, beta, lam, Tinv, h_in, dh_out, do, D,
                                          dD, seg, scale, cfg, C, interp, mcfg)
    return (
        dq, dk, dv, dG.astype(G.dtype), db.astype(beta.dtype), dl.astype(lam.dtype),
        dh0.astype(h0.dtype), None, None, None, None,
    )


def _local_grads(q, k, v, G, beta, lam, Tinv, h_in, dh_out, do, D, dD, seg, scale, cfg: Config,
                 C, interp, mcfg):
    """The backward after the reverse pass: ``dq, dk, dv, dG, dbeta, dlam`` from the states
    and their gradients, on the kernels ``cfg`` and the layout choose."""
    K, V = q.shape[-1], do.shape[-1]
    # The state side fused with the K side's products (after a V side from D) unless any of
    # the three is switched off, packed rows too (the kernels take the document ids).
    fused = (cfg.mosaic_fused_local is not False and cfg.mosaic_dqkw is not False
             and cfg.mosaic_grads_k is not False)
    if _mosaic_backward_kernel(
            fused, mcfg, None,
            "separate state-side and K-side kernels, not the fused ones",
            lambda: (mosaic_backward.check_dqkw_products_supported(K=K, V=V, C=C,
                                                                   dtype=q.dtype),
                     mosaic_backward.check_grads_v_from_d_supported(V=V, C=C, dtype=q.dtype))):
        return bwd.local_grads_from_d(
            q, k, v, G, beta, lam, Tinv, h_in, dh_out, do, D, dD, seg, scale=scale, C=C,
            cfg_k=cfg.grads_k, interpret=interp, v_side=mosaic_backward.grads_v_from_d,
            dqkw_k=mosaic_backward.dqkw_products)
    # The state-side gradients and the K side's products on Mosaic GPU unless
    # Config(mosaic_dqkw=False) / Config(mosaic_grads_k=False).
    if _mosaic_backward_kernel(
            cfg.mosaic_dqkw is not False, mcfg, seg, "the Triton chunk_dqkw, not Mosaic GPU's",
            lambda: mosaic_backward.check_supported(K=K, V=V, C=C, dtype=q.dtype)):
        dqp, dkp, dW, dGp, dPs = mosaic_backward.chunk_dqkw(
            q, k, G, h_in, dh_out, do, D, dD, scale=scale, C=C)
    else:
        dqp, dkp, dW, dGp, dPs = bwd.chunk_dqkw(
            q, k, G, h_in, dh_out, do, D, dD, seg, scale=scale, C=C, cfg=cfg.dqkw,
            interpret=interp)
    # The K-side products take no document ids (the document masks are in the Triton [C, C]
    # part and in gamma): packed rows take them too.
    mosaic_k = _mosaic_backward_kernel(
        cfg.mosaic_grads_k is not False, mcfg, None,
        "the Triton chunk_grads_k, not the Mosaic GPU products",
        lambda: mosaic_backward.check_products_supported(K=K, C=C, dtype=q.dtype))
    return bwd.chunk_grads(
        q, k, v, G, beta, lam, Tinv, dD, dW, dqp, dkp, dGp, dPs, seg, C=C, cfg=cfg.grads_v,
        interpret=interp, cfg_k=cfg.grads_k,
        k_products=mosaic_backward.grads_k_products if mosaic_k else None,
    )


_core.defvjp(_core_fwd, _core_bwd)


def _mosaic_backward_kernel(wanted: bool, mcfg, seg, fallback: str, check) -> bool:
    """Whether one of the backward's Mosaic GPU kernels runs: ``wanted`` (its ``Config``
    switch), in a backward on the Mosaic kernels, for sizes that ``check()`` (the kernel's size
    and dtype check, raising ``ValueError``) accepts and, for a kernel without document masks,
    unpacked rows (``seg`` None; a kernel that needs none is asked with None); else
    ``fallback`` (what runs instead) and the reason go to the debug log."""
    if not wanted or mcfg is None or not mcfg.train:
        return False
    if seg is not None:
        why = "packed rows"
    else:
        try:
            check()
            return True
        except ValueError as e:
            why = str(e)
    log.debug("qdelta pallas backward: %s: %s", fallback, why)
    return False


def sequential_block_v(cfg: Config, programs_per_tile: int, V: int, sms: int | None) -> Config:
    """``cfg`` with the V tile of the two sequential passes (``state``, ``reverse``) halved, down
    to 16, while they would launch fewer programs than half the chip's multiprocessors.

    Those passes run one program per (batch row, head, V tile) looping over every chunk, so
    at small ``B H`` (B2 H6 at V 256 with tiles of 64: 48 programs for 132 SMs) most of the chip
    idles; a narrower tile gives more independent programs for the same work (each holds a
    narrower slice of the state), but too narrow a tile wastes the tensor cores. On an H200 at
    B2 T16384 H6 V256: state pass 0.635 / 0.510 / 0.606 ms and reverse pass 1.21 / 0.88 /
    1.06 ms with tiles of 64 / 32 / 16 (48 / 96 / 192 programs), hence the half-chip target.
    ``sms``: the multiprocessor count (``None``: unknown, keep the tiles)."""
    if not sms:
        return cfg
    out = {}
    for name in ("state", "reverse"):
        sc = getattr(cfg, name)
        bv = sc.block_v or V
        while bv > 16 and 2 * programs_per_tile * (V // bv) < sms:
            bv //= 2
        if bv != (sc.block_v or V):
            out[name] = dataclasses.replace(sc, block_v=bv)
    return dataclasses.replace(cfg, **out) if out else cfg


def mosaic_block_v(ctas_per_tile: int, V: int, sms: int | None) -> int:
    """The V tile of the Mosaic GPU kernels: 64, or 32 where tiles of 64 would launch fewer
    CTAs (one per batch row, head and V tile; ``ctas_per_tile = B H``) than the chip has
    multiprocessors and ``V`` splits into tiles of 32. Each CTA runs every chunk of its row in
    sequence with its state slice in registers, so at small ``B H`` (B2 H6 at V 256: 48 CTAs
    for 132 SMs) most of the chip idles; a tile of 32 doubles the CTAs, each recomputing the
    V-independent ``Q K^T``. ``sms`` ``None`` (unknown): 64."""
    if sms and V % 32 == 0 and ctas_per_tile * max(V // 64, 1) < sms:
        return 32
    return 64


def reverse_depth(block_v: int) -> int:
    """The reverse pass's default pipeline depth: 1 at V tiles of 64, where two of its CTAs
    then share a multiprocessor (81 KB of shared memory each, against 164 KB at depth 2): on
    an H200 0.322 against 0.379 ms at the 340M layer, 0.331 against 0.371 at H16, 0.340
    against 0.420 on packed rows; 2 at tiles of 32 (small grids, B2 T16384: 0.666 against
    0.933 ms). The state pass keeps depth 2 (at 1 it is slower: 0.480 against 0.356 ms)."""
    return 1 if block_v == 64 else 2


def _sm_count() -> int | None:
    try:
        return int(getattr(jax.devices()[0], "core_count", 0)) or None
    except Exception:  # noqa: BLE001 - no device information: keep the configured tiles
        return None


def mosaic_reason(K: int, V: int, chunk_size: int, dtype, out_dtype, *, interpret: bool,
                  rows_are_sequences: bool, seg, train: bool = False,
                  cfg: mosaic.MosaicConfig | None = None) -> str | None:
    """Why the Mosaic GPU kernels cannot serve this call (``None``: they can). ``train``: also
    the differentiated forward and the reverse pass (they then write ``h_in, D``)."""
    if interpret:
        return "kernels run in interpret mode (no GPU)"
    if not mosaic.available():
        return "this jax has no Mosaic GPU (jax.experimental.pallas.mosaic_gpu)"
    cc = getattr(jax.devices()[0], "compute_capability", None)
    if cc != "9.0":
        return f"the device is not an sm_90 (Hopper) GPU (compute capability {cc})"
    if not rows_are_sequences and seg is None:
        return "the per-document layout (states in or out of packed documents)"
    try:
        mosaic.check_supported(K=K, V=V, C=chunk_size, dtype=dtype, out_dtype=out_dtype,
                               cfg=cfg, residuals=train, segmented=seg is not None)
    except ValueError as e:
        return str(e)
    return None


def choose_mosaic(forward_backend: str, K: int, V: int, chunk_size: int, dtype, out_dtype, *,
                  interpret: bool, rows_are_sequences: bool, seg,
                  block_v: int = 64, steps: int = 2,
                  reverse_steps: int | None = None) -> MosaicUse | None:
    """Where the Mosaic GPU kernels serve a call (``None``: the Triton kernels do).

    ``"auto"`` takes them wherever they support the call, training and packed rows included
    (the differentiated forward then writes the backward's residuals and the backward runs on
    Mosaic GPU too); where only the not-differentiated forward fits (unpacked rows), that; the
    Triton kernels elsewhere. On an H200 the op is faster on them at every benchmark shape and
    so is the 340m training step (110.6 against 116.2 ms, compiling in 64 against 61 s;
    BENCHMARKS.md). ``"mosaic"`` takes them wherever they can run and raises ValueError naming
    the reason elsewhere; ``"triton"`` never takes them. Every fallback's reason goes to this
    module's debug log.

    ``steps``: the pipeline depth of the state pass (and of the reverse pass unless
    ``reverse_steps`` is given)."""
    if forward_backend == "triton":
        return None
    mcfg = mosaic.MosaicConfig(block_v=block_v, max_concurrent_steps=steps)
    why = mosaic_reason(K, V, chunk_size, dtype, out_dtype, interpret=interpret,
                        rows_are_sequences=rows_are_sequences, seg=seg, train=True, cfg=mcfg)
    if why is None:
        rcfg = (None if reverse_steps in (None, steps) else
                dataclasses.replace(mcfg, max_concurrent_steps=reverse_steps))
        return MosaicUse(mcfg, train=True, reverse_cfg=rcfg)
    if forward_backend == "mosaic":
        raise ValueError(f"the Mosaic GPU forward cannot run this call: {why}")
    if seg is None and mosaic_reason(K, V, chunk_size, dtype, out_dtype, interpret=interpret,
                                     rows_are_sequences=rows_are_sequences, seg=None,
                                     cfg=mcfg) is None:
        log.debug("qdelta pallas: the Mosaic GPU forward where no gradient is taken, the "
                  "Triton kernels for training: %s", why)
        return MosaicUse(mcfg)
    log.debug("qdelta pallas forward: Triton kernels, not Mosaic GPU: %s", why)
    return None


def _pad_last(x, n: int):
    if x.shape[-1] == n:
        return x
    pad = [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])]
    return jnp.pad(x, pad)


def make_core(*, K: int, V: int, dtype, chunk_size: int, config: Config | None = None,
              interpret: bool | None = None, forward_backend: str = "auto"):
    """A core function ``(q, k, v, G, beta, lam, h0, seg, reset, is_last, seq, scale) ->
    (o, final)`` with the contract of :func:`qdelta_jax.xla.chunked_core`, differentiable
    w.r.t. its first 7 arguments. ``config`` (may be partial) is completed by :func:`get_config`;
    ``interpret`` defaults to "not on a GPU". ``forward_backend``: ``"auto"`` runs the Mosaic
    GPU kernels (:mod:`.mosaic`, :mod:`.mosaic_local`, :mod:`.mosaic_backward`) for every call
    they support, training and packed rows included (the forward then writes ``h_in, D`` from
    the fused pass and the backward runs on Mosaic GPU too), the Triton kernels elsewhere (see
    :func:`choose_mosaic`; the reason goes to this module's debug log); ``"mosaic"`` insists on
    the Mosaic kernels and raises ValueError naming the reason where they cannot run;
    ``"triton"`` never uses them. The core takes
    ``rows_are_sequences=True`` when each batch row is one sequence with its own ``h0`` entry.

    Raises ValueError for unsupported ``chunk_size``, head sizes or ``forward_backend``."""
    check_sizes(K, V, chunk_size)
    if forward_backend not in FORWARD_BACKENDS:
        raise ValueError(
            f"forward_backend must be one of {FORWARD_BACKENDS}, got {forward_backend!r}"
        )
    Kp, Vp = padded_size(K), padded_size(V)
    base = get_config(K, V, chunk_size, dtype, config)
    interp = u.interpret_default() if interpret is None else bool(interpret)
    # Stages a config gives are used as given; the defaults fit the sequential passes to the grid.
    sms = None if ((config is not None and config.sets_stages) or interp) else _sm_count()

    def core(q, k, v, G, beta, lam, h0, seg, reset, is_last, seq, scale, *,
             rows_are_sequences: bool = False):
        if q.shape[1] % chunk_size or q.shape[1] // chunk_size != reset.shape[1]:
            raise ValueError(
                f"q has {q.shape[1]} padded time steps; expected {reset.shape[1]} chunks of"
                f" chunk_size={chunk_size}"
            )
        if q.shape[-1] != K or v.shape[-1] != V:
            raise ValueError(f"core built for K={K}, V={V}; got q {q.shape}, v {v.shape}")
        cfg = sequential_block_v(base, q.shape[0] * q.shape[2], Vp, sms)
        qp, kp = _pad_last(q, Kp), _pad_last(k, Kp)
        vp = _pad_last(v, Vp)
        h0p = _pad_last(jnp.pad(h0.astype(F32), [(0, 0), (0, 0), (0, Kp - K), (0, 0)]), Vp)
        block_v = cfg.mosaic_block_v
        if block_v is None:
            # Packed rows on Mosaic keep tiles of 64: their document-masked kernels have not
            # been checked on a GPU with tiles of 32.
            block_v = (64 if forward_backend != "triton" and seg is not None else
                       mosaic_block_v(q.shape[0] * q.shape[2], Vp, sms or _sm_count()))
        mcfg = choose_mosaic(forward_backend, Kp, Vp, chunk_size, q.dtype, v.dtype,
                             interpret=interp, rows_are_sequences=rows_are_sequences, seg=seg,
                             block_v=block_v, steps=cfg.mosaic_steps or 2,
                             reverse_steps=cfg.mosaic_steps or reverse_depth(block_v))
        o, final = _core(
            qp, kp, vp, G.astype(F32), beta.astype(F32), lam.astype(F32), h0p, seg, reset,
            is_last, seq, float(scale), cfg, chunk_size, interp, mcfg,
        )
        return o[..., :V], final[:, :, :K, :V]

    return core
