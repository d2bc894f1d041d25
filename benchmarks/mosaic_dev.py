"""Device check and timing of the Mosaic GPU fused state pass + output (:mod:`qdelta_jax.pallas.
mosaic`) against the XLA stages and the Triton kernels, in one run.

Per shape, two cases:

* **unpacked** (one sequence per row, ``h0`` given): random inputs, ``W, U, G`` from
  :func:`qdelta_jax.xla.chunk_local`; the oracle is :func:`qdelta_jax.xla.state_pass` +
  :func:`qdelta_jax.xla.chunk_output`; the Triton ``state_pass`` + ``chunk_output``
  (:mod:`qdelta_jax.pallas.forward`) and every Mosaic variant run on the same ``W, U, G``.
* **packed** (row-aligned layout of :mod:`qdelta_jax.packing`: random documents per row, some
  starting exactly at a chunk start, others inside a chunk; ``seg`` per token, zero ``h0``):
  the same with ``seg`` everywhere (no final state is compared: the layout has none).

Variants named ``rev`` run the backward's reverse state pass
(:func:`qdelta_jax.pallas.mosaic.reverse_state_pass`) on random ``dO`` and final-state
gradients, checked against :func:`qdelta_jax.xla.reverse_state_pass` (``dh_out``, ``dh0``; ``dD``
from its formula) and timed against the Triton ``reverse_state_pass``.

Variant names: ``res`` also writes the backward's residuals ``h_in`` and ``D``, compared with
the XLA and Triton ``state_pass`` outputs; ``so``: ``MosaicConfig.scale_operands`` (the rounding
points of the XLA path); ``seg``: the packed case; ``bv``: the V tile; ``s``: TMA pipeline
depth. Prints the relative errors against the oracle (PASS when each
is within 3x the Triton kernels' error or the dtype's eps, whichever is larger) and the median
times of each variant and of the Triton pair it replaces. Each variant runs in its own
try/except: a failure prints its full error and the run goes on. Writes JSON to ``--out``
(default ``$OUT/mosaic_dev.json`` when ``OUT`` is set).

    python benchmarks/mosaic_dev.py               # B8 T4096 H6 K128 V256 bf16, then a small one
    python benchmarks/mosaic_dev.py --lower-only  # CPU: lower every variant for cuda only

``--grads-k`` also checks the local gradients with the K side's products on Mosaic GPU
(``mosaic_backward.grads_k_products``) against their XLA oracle and the Triton kernels, and
times both; ``--fused-local`` the fused local gradients' kernels
(``grads_v_from_d``, ``dqkw_products``) against their oracles and the kernels they replace;
``--local`` the forward's local stage on Mosaic GPU (``mosaic_local.chunk_local``) against
:func:`qdelta_jax.xla.chunk_local` and the Triton solve + W/U.

``--launch-cost N`` times, instead, ``N`` dependent calls in one jitted function at a shape of
one CTA (B1 T64 H1 K128 V64), the Mosaic fused pass against the Triton state pass + output:
the time a call costs beyond its work, what a model that calls the kernels in every layer pays
once a layer.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from pallas_dev import KERNEL_INPUTS  # the same inputs as the Triton stage checks

from qdelta_jax import packing, qdelta_rule, xla
from qdelta_jax.pallas import backward as pbwd
from qdelta_jax.pallas import config as pcfg
from qdelta_jax.pallas import forward as pfwd
from qdelta_jax.pallas import mosaic, mosaic_backward, mosaic_local
from qdelta_jax.testing import parse_shape, random_inputs, random_offsets, rel_err, time_fn

F32 = jnp.float32
C = 64


@dataclasses.dataclass(frozen=True)
class Variant:
    cfg: mosaic.MosaicConfig
    residuals: bool = False
    packed: bool = False  # runs in the packed case (with seg) instead of the unpacked one
    reverse: bool = False  # mosaic.reverse_state_pass instead of mosaic.state_output
    fused_dd0: bool = False  # the reverse pass forms dD0 itself (passed dD0=None)


def _variant(name: str) -> Variant:
    """``[seg_][rev_[fd_]|so_][res_]bv{32,64,128}_s{steps}[_wg]``: packed case, the reverse
    pass (``fd``: forming ``dD0`` itself), ``scale_operands``, ``residuals``, the V tile,
    ``max_concurrent_steps``, warpgroup lowering semantics."""
    parts = name.split("_")
    flags = set(parts[:-2]) if not name.endswith("_wg") else set(parts[:-3])
    bv, steps = (parts[-3], parts[-2]) if name.endswith("_wg") else (parts[-2], parts[-1])
    cfg = mosaic.MosaicConfig(block_v=int(bv[2:]), max_concurrent_steps=int(steps[1:]),
                              lowering_semantics="warpgroup" if name.endswith("_wg") else "lane",
                              scale_operands="so" in flags)
    return Variant(cfg, residuals="res" in flags, packed="seg" in flags, reverse="rev" in flags,
                   fused_dd0="fd" in flags)


VARIANTS = {name: _variant(name) for name in (
    "bv64_s2", "bv64_s1", "bv128_s1", "bv32_s2", "bv32_s3",
    "res_bv64_s2", "res_bv64_s1", "res_bv128_s1", "res_bv32_s2", "seg_bv32_s2",
    "so_bv64_s2", "so_res_bv64_s2", "so_res_bv64_s1", "so_res_bv128_s1",
    "seg_bv64_s2", "seg_res_bv64_s2", "seg_res_bv64_s1", "seg_so_res_bv64_s2",
    "rev_bv64_s2", "rev_bv64_s1", "rev_bv128_s1", "seg_rev_bv64_s2", "rev_bv32_s2",
    "rev_fd_bv64_s2", "rev_fd_bv32_s2", "seg_rev_fd_bv64_s2", "rev_fd_bv64_s1",
    "rev_fd_bv32_s1", "seg_rev_fd_bv64_s1", "seg_res_bv32_s1", "res_bv32_s1",
    # Not run by default: with jax 0.11.2 its layout inference searches for minutes (on a CPU)
    # and then finds no solution.
    "bv64_s2_wg",
)}
DEFAULT_VARIANTS = ("bv64_s2", "res_bv64_s2", "res_bv128_s1", "so_bv64_s2", "so_res_bv64_s2",
                    "seg_bv64_s2", "seg_res_bv64_s2", "seg_so_res_bv64_s2", "rev_bv64_s2",
                    "rev_bv64_s1", "seg_rev_bv64_s2")


def offsets(B, T, seed, docs=6):
    """``[B, docs + 1]`` row offsets: per row, one boundary exactly at a chunk start, the others
    at random positions (most of them inside a chunk)."""
    return jnp.asarray(random_offsets(B, T, docs, seed, aligned_to=C))


def times(fn, args, reps):
    """``(synchronised, pipelined)`` median milliseconds (``testing.time_fn``): each call waited
    for with ``block_until_ready``, and calls issued back to back (device throughput)."""
    return (time_fn(fn, args, warmup=3, reps=reps),
            time_fn(fn, args, warmup=1, reps=reps, pipelined=True))


def _mosaic_fn(v: Variant, scale):
    if v.reverse and v.fused_dd0:  # the same arguments, dD0 (the sixth) left to the kernel
        return jax.jit(lambda *a: mosaic.reverse_state_pass(*a[:5], None, *a[6:], scale=scale,
                                                            cfg=v.cfg))
    if v.reverse:
        return jax.jit(lambda *a: mosaic.reverse_state_pass(*a, scale=scale, cfg=v.cfg))
    return jax.jit(lambda *a: mosaic.state_output(*a, scale=scale, residuals=v.residuals,
                                                  cfg=v.cfg))


def run_grads_k(shape, dtype, reps):
    """The local gradients (``backward.chunk_grads``) with the K side's products on Mosaic GPU
    (``mosaic_backward.grads_k_products``) against the same with their XLA oracle (the same
    rounding: errors are accumulation order) and against the one-launch Triton K side; times of
    the Mosaic split and of the Triton kernels."""
    B, T, H, K, V = shape
    q, k, v, g, beta, lam, _ = random_inputs(jax.random.PRNGKey(B + T + 3), B, T, H, K, V,
                                          dtype=dtype, **KERNEL_INPUTS)
    G = packing.chunk_cumsum(g, C)
    cfg = pcfg.get_config(K, V, C, dtype)
    interp = jax.default_backend() != "gpu"  # a CPU smoke run: the Triton side interpreted
    _, _, Tinv = jax.jit(lambda *a: pfwd.chunk_local(*a, C=C, cfg=cfg.wu, interpret=interp,
                                                     cfg_solve=cfg.solve))(q, k, v, G, beta, lam)
    keys = jax.random.split(jax.random.PRNGKey(T + 4), 6)
    rnd = lambda i, s, dt=F32: jax.random.normal(keys[i], s, F32).astype(dt)  # noqa: E731
    args = (q, k, v, G, beta, lam, Tinv, rnd(0, v.shape, dtype), rnd(1, q.shape, dtype),
            rnd(2, q.shape), rnd(3, q.shape), rnd(4, G.shape), jnp.tril(rnd(5, (B, T, H, C))))

    def grads(k_products):
        return jax.jit(lambda *a: pbwd.chunk_grads(*a, C=C, cfg=cfg.grads_v, interpret=interp,
                                                   cfg_k=cfg.grads_k, k_products=k_products))

    names = ("dq", "dk", "dv", "dg", "dbeta", "dlam")
    res = {"shape": list(shape), "dtype": jnp.dtype(dtype).name, "grads_k": True}
    tri = grads(None)
    res["triton_ms"] = times(tri, args, reps)
    ref_tri = tri(*args)
    ref_xla = grads(pbwd.grads_k_products_xla)(*args)
    print(f"\n== {list(shape)} {res['dtype']} local gradients (rel. error; ms = sync / "
          f"pipelined median)\ntriton grads_v + grads_k {res['triton_ms'][0]:.3f} "
          f"{res['triton_ms'][1]:.3f}")
    try:
        f = grads(mosaic_backward.grads_k_products)
        got = f(*args)
        res["vs_oracle"] = {n: rel_err(a, b) for n, a, b in zip(names, got, ref_xla)}
        res["vs_triton"] = {n: rel_err(a, b) for n, a, b in zip(names, got, ref_tri)}
        tol = 2 * float(jnp.finfo(dtype).eps)
        res["pass"] = all(e <= tol for e in res["vs_oracle"].values())
        res["ms"] = times(f, args, reps)
        print("mosaic grads_k products vs oracle " + " ".join(
            f"{n} {e:.1e}" for n, e in res["vs_oracle"].items()) + "; vs triton " + " ".join(
            f"{n} {e:.1e}" for n, e in res["vs_triton"].items())
            + f" {res['ms'][0]:.3f} {res['ms'][1]:.3f} {'PASS' if res['pass'] else 'FAIL'} "
            f"{res['triton_ms'][1] / res['ms'][1]:.2f}x triton", flush=True)
    except Exception as e:  # noqa: BLE001 - the other cases still run
        traceback.print_exc()
        res["error"] = f"{type(e).__name__}: {e}"[:3000]
        print(f"mosaic grads_k products FAIL {res['error'][:300]}", flush=True)
    return res


def triton_states(shape, dtype, seed):
    """Random inputs and the states and gradients the Triton forward and reverse pass give for
    them: ``(q, k, v, beta, lam, G, dO, T, h_in, D, dh_out, dD)``, the config and whether the
    Triton kernels run interpreted (a CPU smoke run)."""
    B, T, H, K, V = shape
    scale = K**-0.5
    q, k, v, g, beta, lam, h0 = random_inputs(jax.random.PRNGKey(seed), B, T, H, K, V,
                                              dtype=dtype, **KERNEL_INPUTS)
    do = jax.random.normal(jax.random.PRNGKey(T + 1), (B, T, H, V), F32).astype(dtype)
    dfin = 0.1 * jax.random.normal(jax.random.PRNGKey(T + 2), (B, H, K, V), F32)
    m = packing.make_layout(B, T, C, None).meta
    cfg = pcfg.get_config(K, V, C, dtype)
    G = packing.chunk_cumsum(g, C)
    interp = jax.default_backend() != "gpu"
    W, U, Tinv = jax.jit(lambda *a: pfwd.chunk_local(*a, C=C, cfg=cfg.wu, interpret=interp,
                                                     cfg_solve=cfg.solve))(
        q, k, v, G, beta, lam)
    h_in, D, _ = jax.jit(lambda *a: pfwd.state_pass(*a, C=C, cfg=cfg.state, interpret=interp))(
        k, G, W, U, h0, m.reset, m.is_last, m.seq)
    dD0 = jax.jit(lambda *a: pbwd.chunk_dd0(*a, scale=scale, C=C, cfg=cfg.dd0,
                                            interpret=interp))(q, k, G, do)
    dh_out, dD, _ = jax.jit(lambda *a: pbwd.reverse_state_pass(
        *a, scale=scale, C=C, cfg=cfg.reverse, interpret=interp))(
        q, k, G, W, do, dD0, dfin, m.reset, m.is_last, m.seq)
    return (q, k, v, beta, lam, G, do, Tinv, h_in, D, dh_out, dD), cfg, interp


def check_against(res, key, f, args, want, names, tol, reps):
    """Runs ``f(*args)``, puts the relative error of each output against ``want`` under
    ``res[key + "_vs_oracle"]``, whether all are within ``tol`` under ``key + "_pass"`` and
    ``f``'s times under ``key + "_ms"``."""
    got = f(*args)
    res[key + "_vs_oracle"] = {n: rel_err(a, b) for n, a, b in zip(names, got, want)}
    res[key + "_pass"] = all(e <= tol for e in res[key + "_vs_oracle"].values())
    res[key + "_ms"] = times(f, args, reps)


def run_fused_local(shape, dtype, reps):
    """The fused local gradients' two Mosaic GPU kernels on the states the Triton forward and
    reverse pass give for random inputs: ``grads_v_from_d`` against its XLA oracle (and its
    ``dA``, from ``D``, against the Triton V side's, from ``dW``), ``dqkw_products`` against the
    Triton ``chunk_dqkw`` + the K side's products' oracle; times against the kernels they
    replace (the Triton V side, the Mosaic ``chunk_dqkw`` + ``grads_k_products``)."""
    B, T, H, K, V = shape
    scale = K**-0.5
    (q, k, v, beta, lam, G, do, Tinv, h_in, D, dh_out, dD), cfg, interp = triton_states(
        shape, dtype, B * 5 + T + K)
    beta32, lam32 = beta.astype(F32), lam.astype(F32)
    bg = beta32 * pbwd.chunk_gamma(G, None, C)
    tol = 2 * float(jnp.finfo(dtype).eps)
    res = {"shape": list(shape), "dtype": jnp.dtype(dtype).name, "fused_local": True}
    print(f"\n== {list(shape)} {res['dtype']} fused local gradients (rel. error; ms = sync / "
          f"pipelined median)", flush=True)

    # The V side from D.
    dqp, dkp, dW, _, dPs_t = jax.jit(lambda *a: pbwd.chunk_dqkw(
        *a, scale=scale, C=C, cfg=cfg.dqkw, interpret=interp))(q, k, G, h_in, dh_out, do, D, dD)
    vargs = (v, Tinv, dD, do, D, G, beta32)
    oracle = jax.jit(functools.partial(pbwd.grads_v_from_d_xla, scale=scale))(*vargs)
    tri_v = jax.jit(lambda q, k, v, Tinv, dD, dW: pbwd._grads_v_launch(
        q, k, v, G, beta, lam, Tinv, dD, dW, None, C=C, cfg=cfg.grads_v, interpret=interp))
    dA_w = tri_v(q, k, v, Tinv, dD, dW)[2]
    res["dA_from_D_vs_from_dW"] = rel_err(oracle[2], dA_w)
    res["dPs_vs_dqkw"] = rel_err(oracle[3], dPs_t)
    res["triton_v_ms"] = times(tri_v, (q, k, v, Tinv, dD, dW), reps)
    print(f"oracle dA from D vs Triton dA from dW {res['dA_from_D_vs_from_dW']:.1e}, dPs vs "
          f"chunk_dqkw {res['dPs_vs_dqkw']:.1e}; triton grads_v {res['triton_v_ms'][0]:.3f} "
          f"{res['triton_v_ms'][1]:.3f}", flush=True)
    try:
        check_against(res, "v", jax.jit(functools.partial(mosaic_backward.grads_v_from_d,
                                                          scale=scale)),
                      vargs, oracle, ("dv", "dbeta_v", "dA", "dPs", "Tb"), tol, reps)
        print("mosaic grads_v_from_d vs oracle " + " ".join(
            f"{n} {e:.1e}" for n, e in res["v_vs_oracle"].items())
            + f" {res['v_ms'][0]:.3f} {res['v_ms'][1]:.3f} "
            f"{'PASS' if res['v_pass'] else 'FAIL'} "
            f"{res['triton_v_ms'][1] / res['v_ms'][1]:.2f}x triton grads_v", flush=True)
    except Exception as e:  # noqa: BLE001 - the other kernel still runs
        traceback.print_exc()
        res["v_error"] = f"{type(e).__name__}: {e}"[:3000]
        print(f"mosaic grads_v_from_d FAIL {res['v_error'][:300]}", flush=True)

    # The state side fused with the K side's products, on M, S from the oracle's dA, dPs.
    _, dbv, dA, dPs, Tb = oracle
    M, S, *_ = jax.jit(lambda *a: pbwd.chunk_grads_k_phase1(*a, C=C, cfg=cfg.grads_k,
                                                            interpret=interp))(
        q, k, G, beta, lam, dPs, dA, dbv)
    kargs = (q, k, G, h_in, dh_out, do, D, dD, Tb, M, S, lam32 * bg, bg)
    ref = jax.jit(functools.partial(pbwd.dqkw_products_ref, scale=scale, C=C, cfg=cfg.dqkw,
                                    interpret=interp))(*kargs)

    def unfused(q, k, G, h_in, dh_out, do, D, dD, Tb, M, S, lbg, bg):
        dqp, dkp, dW, dGp, _ = mosaic_backward.chunk_dqkw(q, k, G, h_in, dh_out, do, D, dD,
                                                          scale=scale)
        return mosaic_backward.grads_k_products(q, k, Tb.astype(F32), dW, M, S, dqp, dkp, lbg,
                                                bg) + (dGp,)

    try:
        res["unfused_ms"] = times(jax.jit(unfused), kargs, reps)
        check_against(res, "k", jax.jit(functools.partial(mosaic_backward.dqkw_products,
                                                          scale=scale)),
                      kargs, ref, ("dq", "dk", "dG_part", "sq", "sk"), tol, reps)
        print("mosaic dqkw_products vs triton dqkw + products oracle " + " ".join(
            f"{n} {e:.1e}" for n, e in res["k_vs_oracle"].items())
            + f" {res['k_ms'][0]:.3f} {res['k_ms'][1]:.3f} "
            f"{'PASS' if res['k_pass'] else 'FAIL'}; mosaic dqkw + products "
            f"{res['unfused_ms'][0]:.3f} {res['unfused_ms'][1]:.3f} "
            f"({res['unfused_ms'][1] / res['k_ms'][1]:.2f}x)", flush=True)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        res["k_error"] = f"{type(e).__name__}: {e}"[:3000]
        print(f"mosaic dqkw_products FAIL {res['k_error'][:300]}", flush=True)
    return res


def run_local(shape, dtype, reps, packed: bool):
    """The forward's local stage on Mosaic GPU (``mosaic_local.chunk_local``: ``A``, ``T``,
    ``W``, ``U`` in one kernel) against :func:`qdelta_jax.xla.chunk_local` (float32 ``T``, the
    oracle) and the Triton solve + W/U (``forward.chunk_local``) on the same random inputs,
    unpacked or on the row-aligned packed layout; times of both."""
    B, T, H, K, V = shape
    q, k, v, g, beta, lam, _ = random_inputs(jax.random.PRNGKey(B * 3 + T + V), B, T, H, K, V,
                                             dtype=dtype, **KERNEL_INPUTS)
    seg = None
    if packed:
        seg = packing.make_layout(B, T, C, offsets(B, T, seed=B + T + 1),
                                  per_document=False).seg
    G = packing.chunk_cumsum(g, C, seg)
    sp = lambda x: xla._split(x, C)  # noqa: E731
    loc = jax.jit(xla.chunk_local)(sp(q), sp(k), sp(v), sp(G), sp(beta), sp(lam),
                                   xla._seg_split(seg, C))
    want = {"W": xla._merge(loc.W), "U": xla._merge(loc.U), "T": xla._merge(loc.Tinv)}
    cfg = pcfg.get_config(K, V, C, dtype)
    interp = jax.default_backend() != "gpu"
    args = (q, k, v, G, beta, lam) + (() if seg is None else (seg,))
    res = {"shape": list(shape), "dtype": jnp.dtype(dtype).name, "local": True,
           "packed": packed}
    print(f"\n== {list(shape)} {res['dtype']} local stage{' (packed)' if packed else ''} "
          f"(rel. error vs xla.chunk_local; ms = sync / pipelined median)", flush=True)
    tri = jax.jit(lambda *a: pfwd.chunk_local(*a, C=C, cfg=cfg.wu, interpret=interp,
                                              cfg_solve=cfg.solve))
    got = dict(zip("WUT", tri(*args)))
    res["triton_vs_oracle"] = {n: rel_err(got[n], want[n]) for n in want}
    res["triton_ms"] = times(tri, args, reps)
    print("triton solve + W/U " + " ".join(f"{n} {e:.1e}" for n, e in
                                           res["triton_vs_oracle"].items())
          + f" {res['triton_ms'][0]:.3f} {res['triton_ms'][1]:.3f}", flush=True)
    for with_t in (True, False):
        key = "mosaic" if with_t else "mosaic_no_t"
        try:
            f = jax.jit(lambda *a, with_t=with_t: mosaic_local.chunk_local(*a, with_t=with_t))
            out = dict(zip("WUT", f(*args)))
            names = "WUT" if with_t else "WU"
            res[key + "_vs_oracle"] = {n: rel_err(out[n], want[n]) for n in names}
            res[key + "_vs_triton"] = {n: rel_err(out[n], got[n]) for n in names}
            # W, U: within the Triton kernels' own distance from the oracle (both round W, U
            # to the compute dtype) or the dtype's eps; T: float32-close to the oracle.
            tol = {n: max(float(jnp.finfo(dtype).eps), 2 * res["triton_vs_oracle"][n])
                   for n in "WU"}
            tol["T"] = 1e-4
            res[key + "_pass"] = all(res[key + "_vs_oracle"][n] <= tol[n] for n in names)
            res[key + "_ms"] = times(f, args, reps)
            print(f"{key} vs oracle " + " ".join(
                f"{n} {e:.1e}" for n, e in res[key + "_vs_oracle"].items()) + "; vs triton "
                + " ".join(f"{n} {e:.1e}" for n, e in res[key + "_vs_triton"].items())
                + f" {res[key + '_ms'][0]:.3f} {res[key + '_ms'][1]:.3f} "
                f"{'PASS' if res[key + '_pass'] else 'FAIL'} "
                f"{res['triton_ms'][1] / res[key + '_ms'][1]:.2f}x triton", flush=True)
        except Exception as e:  # noqa: BLE001 - the other variant still runs
            traceback.print_exc()
            res[key + "_error"] = f"{type(e).__name__}: {e}"[:3000]
            print(f"{key} FAIL {res[key + '_error'][:300]}", flush=True)
    return res


def launch_cost(n: int, dtype, reps: int) -> dict:
    """Median ms of ``n`` dependent calls (each call's output is the next one's ``U``) in one
    jitted function at one CTA's shape, Mosaic and Triton, synchronised and pipelined; and
    the microseconds a call."""
    B, T, H, K, V = 1, 64, 1, 128, 64
    q, k, v, g, beta, lam, h0 = random_inputs(jax.random.PRNGKey(5), B, T, H, K, V,
                                              dtype=dtype, **KERNEL_INPUTS)
    G = packing.chunk_cumsum(g, C)
    sp = lambda x: xla._split(x, C)  # noqa: E731
    loc = jax.jit(xla.chunk_local)(sp(q), sp(k), sp(v), sp(G), sp(beta), sp(lam))
    W, U = xla._merge(loc.W).astype(dtype), xla._merge(loc.U).astype(dtype)
    m = packing.make_layout(B, T, C, None).meta
    cfg = pcfg.get_config(K, V, C, dtype)
    scale = K**-0.5

    def mosaic_step(U):
        return mosaic.state_output(q, k, G, W, U, h0, scale=scale, out_dtype=dtype)[0]

    def triton_step(U):
        h_in, D, _ = pfwd.state_pass(k, G, W, U, h0, m.reset, m.is_last, m.seq, None, C=C,
                                     cfg=cfg.state, interpret=False)
        return pfwd.chunk_output(q, k, G, h_in, D, None, scale=scale, out_dtype=dtype, C=C,
                                 cfg=cfg.output, interpret=False)

    out = {"n": n, "shape": [B, T, H, K, V]}
    for name, step in (("mosaic", mosaic_step), ("triton", triton_step)):
        def chain(U, step=step):
            for _ in range(n):
                U = step(U)
            return U

        try:
            ms = times(jax.jit(chain), (U,), reps)
            out[name] = {"ms": ms, "us_per_call": [1e3 * t / n for t in ms]}
        except Exception as e:  # noqa: BLE001 - report the other one
            traceback.print_exc()
            out[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        print(f"launch cost, {n} dependent calls: {name} {json.dumps(out[name])}", flush=True)
    return out


def lower_only(shape, dtype, variants):
    B, T, H, K, V = shape
    S = jax.ShapeDtypeStruct
    args = (S((B, T, H, K), dtype), S((B, T, H, K), dtype), S((B, T, H), F32),
            S((B, T, H, K), dtype), S((B, T, H, V), dtype), S((B, H, K, V), F32))
    out = {}
    for name in variants:
        v = VARIANTS[name]
        try:
            t0 = time.perf_counter()
            a = args + ((S((B, T), jnp.int32),) if v.packed else ())
            if v.reverse:  # q, k, G, W, do, dD0, dfinal (, seg)
                a = args[:4] + (args[4], args[4], args[5]) + a[6:]
            _mosaic_fn(v, K**-0.5).trace(*a).lower(lowering_platforms=("cuda",))
            out[name] = f"lowered in {time.perf_counter() - t0:.1f} s"
        except Exception as e:  # noqa: BLE001 - report every variant
            traceback.print_exc()
            out[name] = f"FAIL {type(e).__name__}: {e}"[:2000]
        print(f"{name}: {out[name]}", flush=True)
    return out


def _run_variants(res, variants, packed, reverse, scale, margs, names, ref, tol, reps):
    """Every Mosaic variant of one kind (forward or reverse pass, packed or not) on ``margs``:
    the errors of its outputs ``names`` against ``ref``, PASS within ``tol``, and its times,
    into ``res["variants"]``."""
    for name in variants:
        var = VARIANTS[name]
        if var.reverse != reverse or var.packed != packed:
            continue
        r: dict = {}
        res["variants"][name] = r
        try:
            f = _mosaic_fn(var, scale)
            t0 = time.perf_counter()
            out = jax.block_until_ready(f(*margs))
            r["compile_s"] = time.perf_counter() - t0
            got = dict(zip(names, out))
            keys = [key for key in ref if key in got]
            for key in keys:
                r[key] = rel_err(got[key], ref[key])
            r["finite"] = all(bool(jnp.isfinite(x.astype(F32)).all()) for x in out)
            r["pass"] = bool(r["finite"] and all(r[key] <= tol[key] for key in keys))
            r["ms"] = times(f, margs, reps)
        except Exception as e:  # noqa: BLE001 - one failing variant must not hide the others
            traceback.print_exc()
            r["error"] = f"{type(e).__name__}: {e}"[:3000]
            r["pass"] = False
        print(name, json.dumps(r), flush=True)


def run_case(shape, dtype, reps, variants, packed: bool, fwd_total: bool = False):
    B, T, H, K, V = shape
    res: dict = {"shape": list(shape), "dtype": jnp.dtype(dtype).name, "packed": packed,
                 "variants": {}}
    scale = K**-0.5
    q, k, v, g, beta, lam, h0 = random_inputs(jax.random.PRNGKey(B * 7 + T + K), B, T, H, K, V,
                                          dtype=dtype, **KERNEL_INPUTS)
    if packed:
        cu = offsets(B, T, seed=B + T)
        res["cu_seqlens"] = np.asarray(cu).tolist() if B * T <= 4 * 4096 else "random"
        lay = packing.make_layout(B, T, C, cu, per_document=False)
        seg = lay.seg
        h0_x = jnp.zeros((1, H, K, V), F32)  # the row-aligned layout's one zero entry
        h0 = jnp.zeros((B, H, K, V), F32)
    else:
        lay = packing.make_layout(B, T, C, None)
        seg = None
        h0_x = h0
    m = lay.meta
    sp = lambda x: xla._split(x, C)  # noqa: E731
    sg = xla._seg_split(seg, C)
    G = packing.chunk_cumsum(g, C, seg)
    loc = jax.jit(xla.chunk_local)(sp(q), sp(k), sp(v), sp(G), sp(beta), sp(lam), sg)
    W, U = xla._merge(loc.W), xla._merge(loc.U)

    def oracle(k, q, G4, W4, U4, h0, sg):
        h_in, D, fin = xla.state_pass(k, G4, W4, U4, h0, m, dtype, sg)
        o = xla._merge(xla.chunk_output(q, k, G4, h_in, D, scale, dtype, sg))
        return o, fin, jnp.moveaxis(h_in, 1, 2), xla._merge(D)

    o_x, fin_x, hin_x, d_x = jax.jit(oracle)(sp(k), sp(q), loc.G, loc.W, loc.U, h0_x, sg)
    o_x = o_x.astype(dtype)
    ref = {"o": o_x, "final": fin_x, "h_in": hin_x, "D": d_x}
    if packed:
        del ref["final"]  # the row-aligned layout writes no final state

    cfg = pcfg.get_config(K, V, C, dtype)
    interp = jax.default_backend() != "gpu"
    extra = () if seg is None else (seg,)
    tri_state = jax.jit(lambda *a: pfwd.state_pass(*a, C=C, cfg=cfg.state, interpret=interp))
    tri_out = jax.jit(lambda *a: pfwd.chunk_output(*a, scale=scale, out_dtype=dtype, C=C,
                                                   cfg=cfg.output, interpret=interp))
    sargs = (k, G, W, U, h0_x, m.reset, m.is_last, m.seq) + extra
    eps = float(jnp.finfo(dtype).eps)
    tol = {key: eps for key in ref}
    try:
        h_in, D, fin_t = tri_state(*sargs)
        o_t = tri_out(q, k, G, h_in, D, *extra)
        got = {"o": o_t, "final": fin_t, "h_in": h_in, "D": D}
        for key in ref:
            res["triton." + key] = rel_err(got[key], ref[key])
            tol[key] = max(eps, 3 * res["triton." + key])
        res["triton.state_ms"] = times(tri_state, sargs, reps)
        res["triton.output_ms"] = times(tri_out, (q, k, G, h_in, D) + extra, reps)
        res["triton.state+output_ms"] = [a + b for a, b in zip(res["triton.state_ms"],
                                                               res["triton.output_ms"])]
        if fwd_total and not packed:
            fwd = jax.jit(lambda *a: qdelta_rule(*a[:6], initial_state=a[6],
                                                 output_final_state=True, chunk_size=C,
                                                 implementation="pallas"))
            res["pallas.qdelta_rule_fwd_ms"] = times(fwd, (q, k, v, g, beta, lam, h0), reps)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        res["triton_error"] = f"{type(e).__name__}: {e}"[:3000]
    res["tolerance"] = tol

    _run_variants(res, variants, packed, False, scale, (q, k, G, W, U, h0) + extra,
                  ("o", "final", "h_in", "D"), ref, tol, reps)
    return res


def run_reverse(shape, dtype, reps, variants, packed: bool):
    B, T, H, K, V = shape
    res: dict = {"shape": list(shape), "dtype": jnp.dtype(dtype).name, "packed": packed,
                 "reverse": True, "variants": {}}
    scale = K**-0.5
    q, k, v, g, beta, lam, _ = random_inputs(jax.random.PRNGKey(B * 7 + T + K), B, T, H, K, V,
                                          dtype=dtype, **KERNEL_INPUTS)
    do = jax.random.normal(jax.random.PRNGKey(T + 1), (B, T, H, V), F32).astype(dtype)
    dfin = 0.1 * jax.random.normal(jax.random.PRNGKey(T + 2), (B, H, K, V), F32)
    if packed:
        lay = packing.make_layout(B, T, C, offsets(B, T, seed=B + T), per_document=False)
        seg, N = lay.seg, 1
        dfin = jnp.zeros_like(dfin)  # the row-aligned layout has no final state
        dfin_x = jnp.zeros((1, H, K, V), F32)
    else:
        lay = packing.make_layout(B, T, C, None)
        seg, N, dfin_x = None, B, dfin
    m = lay.meta
    sp = lambda x: xla._split(x, C)  # noqa: E731
    sg = xla._seg_split(seg, C)
    G = packing.chunk_cumsum(g, C, seg)
    loc = jax.jit(xla.chunk_local)(sp(q), sp(k), sp(v), sp(G), sp(beta), sp(lam), sg)
    W = xla._merge(loc.W)

    def oracle(q4, k4, G4, W4, do4, dfin_x, sg):
        gt = xla.gates(G4, sg)
        _, incl = xla._masks(C)
        P = xla._mm("...ik,...jk->...ij", q4, k4, dtype) * xla._decay(G4, xla._within(incl, gt))
        dD0 = (scale * xla._mm("...ij,...iv->...jv", P, do4, dtype)).astype(dtype)
        dho, dh0 = xla.reverse_state_pass(k4, G4, W4, q4, do4, dD0, dfin_x, m, scale, N, dtype,
                                          sg)
        kd = k4.astype(F32) * gt.e[..., None]
        dD = dD0.astype(F32) + xla._mm("...ck,...kv->...cv", kd, dho, dtype)
        return (xla._merge(dD0), jnp.moveaxis(dho, 1, 2), xla._merge(dD.astype(dtype)), dh0)

    dD0, dho_x, dD_x, dh0_x = jax.jit(oracle)(sp(q), sp(k), loc.G, loc.W, sp(do), dfin_x, sg)
    ref = {"dh_out": dho_x, "dD": dD_x, "dh0": dh0_x}
    if packed:
        del ref["dh0"]  # the row-aligned layout's one (constant) initial state
    cfg = pcfg.get_config(K, V, C, dtype)
    interp = jax.default_backend() != "gpu"
    extra = () if seg is None else (seg,)
    tri = jax.jit(lambda *a: pbwd.reverse_state_pass(*a, scale=scale, C=C, cfg=cfg.reverse,
                                                     interpret=interp))
    targs = (q, k, G, W, do, dD0, dfin_x, m.reset, m.is_last, m.seq) + extra
    eps = float(jnp.finfo(dtype).eps)
    tol = {key: eps for key in ref}
    try:
        got = dict(zip(("dh_out", "dD", "dh0"), tri(*targs)))
        for key in ref:
            res["triton." + key] = rel_err(got[key], ref[key])
            tol[key] = max(eps, 3 * res["triton." + key])
        res["triton.reverse_ms"] = times(tri, targs, reps)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        res["triton_error"] = f"{type(e).__name__}: {e}"[:3000]
    res["tolerance"] = tol
    _run_variants(res, variants, packed, True, scale, (q, k, G, W, do, dD0, dfin) + extra,
                  ("dh_out", "dD", "dh0"), ref, tol, reps)
    return res


def run_dqkw(shape, dtype, reps, block_vs):
    """The Mosaic GPU ``chunk_dqkw`` (:mod:`qdelta_jax.pallas.mosaic_backward`) at each V tile
    of ``block_vs`` against the Triton kernel (itself checked against the XLA stage by
    ``pallas_dev.py``), on the states and gradients the Triton forward and reverse pass give
    for random inputs: the relative error of each output and the times of both."""
    B, T, H, K, V = shape
    scale = K**-0.5
    (q, k, _, _, _, G, do, _, h_in, D, dh_out, dD), cfg, interp = triton_states(
        shape, dtype, B * 7 + T + K)
    args = (q, k, G, h_in, dh_out, do, D, dD)
    names = ("dq_part", "dk_part", "dW", "dG_part", "dPs")
    tri = jax.jit(lambda *a: pbwd.chunk_dqkw(*a, scale=scale, C=C, cfg=cfg.dqkw,
                                             interpret=interp))
    ref = tri(*args)
    res = {"shape": list(shape), "dtype": jnp.dtype(dtype).name, "dqkw": True,
           "triton_ms": times(tri, args, reps), "variants": {}}
    tol = float(jnp.finfo(dtype).eps)
    print(f"\n== {list(shape)} {res['dtype']} dqkw (rel. error vs the Triton kernel; ms = sync "
          f"/ pipelined median)\ntriton dqkw {res['triton_ms'][0]:.3f} {res['triton_ms'][1]:.3f}")
    for bv in block_vs:
        r: dict = {}
        res["variants"][f"bv{bv}"] = r
        try:
            f = jax.jit(lambda *a, bv=bv: mosaic_backward.chunk_dqkw(*a, scale=scale,
                                                                      block_v=bv))
            got = jax.block_until_ready(f(*args))
            for n, a_, b_ in zip(names, got, ref):
                r[n] = rel_err(a_, b_)
            r["pass"] = all(r[n] <= tol for n in names)
            r["ms"] = times(f, args, reps)
            print(f"mosaic dqkw bv{bv} " + " ".join(f"{n} {r[n]:.1e}" for n in names)
                  + f" {r['ms'][0]:.3f} {r['ms'][1]:.3f} {'PASS' if r['pass'] else 'FAIL'}"
                  f" {res['triton_ms'][1] / r['ms'][1]:.2f}x triton", flush=True)
        except Exception as e:  # noqa: BLE001 - report, go on with the other tiles
            traceback.print_exc()
            r["error"] = f"{type(e).__name__}: {e}"[:3000]
            print(f"mosaic dqkw bv{bv} FAIL {r['error'][:300]}", flush=True)
    return res


def _e(r, key):
    return f"{r[key]:>9.2e}" if key in r else f"{'-':>9}"


def print_table(res):
    rev = res.get("reverse", False)
    kind = ("packed (seg)" if res["packed"] else "unpacked") + (" reverse pass" if rev else "")
    print(f"\n== {res['shape']} {res['dtype']} {kind}  (rel. error vs xla; ms = sync / pipelined"
          " median)")
    tol = res.get("tolerance", {})
    cols = ("dh_out", "dD", "dh0") if rev else ("o", "final", "h_in", "D")
    print(f"{'kernel':<24}" + "".join(f"{c:>9}" for c in cols) + f"{'ms sync':>9}{'ms pipe':>9}"
          "  status")
    tname = "triton reverse" if rev else "triton state+output"
    ts = res.get("triton.reverse_ms" if rev else "triton.state+output_ms")
    if ts:
        t = {key[7:]: v for key, v in res.items() if key.startswith("triton.")
             and not key.endswith("_ms")}
        print(f"{tname:<24}" + "".join(_e(t, key) for key in cols)
              + f"{ts[0]:>9.3f}{ts[1]:>9.3f}  reference (tol "
              + ", ".join(f"{key} {v:.1e}" for key, v in tol.items()) + ")")
        for key in ("triton.state_ms", "triton.output_ms", "pallas.qdelta_rule_fwd_ms"):
            if key in res and not rev:
                a, b = res[key]
                print(f"{'  ' + key[:-3]:<24}{'':>{9 * len(cols)}}{a:>9.3f}{b:>9.3f}")
    elif "triton_error" in res:
        print(f"{'triton':<24}FAIL {res['triton_error'].splitlines()[0][:100]}")
    for name, r in res["variants"].items():
        if "error" in r:
            print(f"{'mosaic ' + name:<24}{'':>{9 * len(cols) + 18}}  FAIL "
                  f"{r['error'].splitlines()[0][:90]}")
            continue
        a, b = r.get("ms", (float("nan"),) * 2)
        status = "PASS" if r["pass"] else "FAIL"
        speed = f"  {ts[1] / b:.2f}x triton" if ts and b == b else ""
        print(f"{'mosaic ' + name:<24}" + "".join(_e(r, key) for key in cols)
              + f"{a:>9.3f}{b:>9.3f}  {status}{speed}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8x4096x6x128x256,1x256x2x128x256",
                    help="comma list of BxTxHxKxV (T a multiple of 64)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma list of " +
                    ", ".join(VARIANTS))
    ap.add_argument("--lower-only", action="store_true",
                    help="only lower every variant for cuda (runs on a CPU-only machine)")
    ap.add_argument("--fwd-total", action="store_true",
                    help="also time the whole Pallas forward (qdelta_rule) in the unpacked case")
    ap.add_argument("--dqkw", default="",
                    help="also check and time the Mosaic GPU chunk_dqkw at these V tiles "
                    "(comma list, e.g. 64,32) against the Triton kernel")
    ap.add_argument("--grads-k", action="store_true",
                    help="also check and time the local gradients with the K side's products on "
                    "Mosaic GPU against the Triton kernels")
    ap.add_argument("--fused-local", action="store_true",
                    help="also check and time the fused local gradients' two Mosaic GPU kernels")
    ap.add_argument("--local", action="store_true",
                    help="also check and time the forward's local stage on Mosaic GPU "
                    "(unpacked and packed) against xla.chunk_local and the Triton kernels")
    ap.add_argument("--launch-cost", type=int, default=0, metavar="N",
                    help="only time N dependent calls at one CTA's shape, Mosaic and Triton")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dtype = jnp.dtype(a.dtype)
    try:
        shapes = [parse_shape(s) for s in a.shapes.split(",") if s]
    except ValueError as e:
        ap.error(f"--shapes: {e}")
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}, jax {jax.__version__}, backend {jax.default_backend()}",
          flush=True)
    allres = {"device": dev.device_kind, "jax": jax.__version__, "runs": []}
    variants = [v for v in a.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"--variants: unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    out = a.out or (os.path.join(os.environ["OUT"], "mosaic_dev.json") if "OUT" in os.environ
                    else None)

    def save():  # after every case, so that a run cut short keeps what it measured
        allres["wall_s"] = time.perf_counter() - t0
        if out:
            with open(out, "w") as f:
                json.dump(allres, f, indent=1)

    t0 = time.perf_counter()
    if a.launch_cost:
        allres["launch_cost"] = launch_cost(a.launch_cost, dtype, a.reps)
        save()
        print(f"wall {time.perf_counter() - t0:.0f} s")
        return 0
    for shape in shapes:
        if a.lower_only:
            low = lower_only(shape, dtype, variants)
            allres["runs"].append({"shape": list(shape), "lower": low})
            save()
            continue
        if a.grads_k:
            try:
                allres["runs"].append(run_grads_k(shape, dtype, a.reps))
            except Exception as e:  # noqa: BLE001 - the other cases still run
                traceback.print_exc()
                print(f"grads_k {shape} FAIL {type(e).__name__}: {str(e)[:300]}", flush=True)
            save()
        if a.fused_local:
            try:
                allres["runs"].append(run_fused_local(shape, dtype, a.reps))
            except Exception as e:  # noqa: BLE001 - the other cases still run
                traceback.print_exc()
                print(f"fused_local {shape} FAIL {type(e).__name__}: {str(e)[:300]}", flush=True)
            save()
        if a.local:
            for packed in (False, True):
                try:
                    allres["runs"].append(run_local(shape, dtype, a.reps, packed))
                except Exception as e:  # noqa: BLE001 - the other cases still run
                    traceback.print_exc()
                    print(f"local {shape} FAIL {type(e).__name__}: {str(e)[:300]}", flush=True)
                save()
        if a.dqkw:
            try:
                allres["runs"].append(run_dqkw(shape, dtype, a.reps,
                                               [int(x) for x in a.dqkw.split(",")]))
            except Exception as e:  # noqa: BLE001 - the other cases still run
                traceback.print_exc()
                print(f"dqkw {shape} FAIL {type(e).__name__}: {str(e)[:300]}", flush=True)
            save()
        for packed, rev in ((False, False), (True, False), (False, True), (True, True)):
            if not any((VARIANTS[v].packed, VARIANTS[v].reverse) == (packed, rev)
                       for v in variants):
                continue
            try:
                r = (run_reverse(shape, dtype, a.reps, variants, packed) if rev else
                     run_case(shape, dtype, a.reps, variants, packed, a.fwd_total))
            except Exception as e:  # noqa: BLE001 - the other cases still run
                traceback.print_exc()
                r = {"shape": list(shape), "packed": packed, "reverse": rev,
                     "error": f"{type(e).__name__}: {e}"}
                print(f"case {shape} packed={packed} reverse={rev} FAIL {r['error'][:300]}",
                      flush=True)
                allres["runs"].append(r)
                save()
                continue
            allres["runs"].append(r)
            print_table(r)
            save()
    save()
    print(f"wall {allres['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
