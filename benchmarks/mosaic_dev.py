"""Device check and timing of the Mosaic GPU fused state pass + output (:mod:`qdelta_jax.pallas.
mosaic`) against the XLA stages and the Triton kernels, in one run.

For each shape: random inputs, ``W, U, G`` from :func:`qdelta_jax.xla.chunk_local`; the oracle
is :func:`qdelta_jax.xla.state_pass` + :func:`qdelta_jax.xla.chunk_output` on those; the Triton
``state_pass`` + ``chunk_output`` (:mod:`qdelta_jax.pallas.forward`) and every Mosaic variant run
on the same ``W, U, G``. Prints the relative error of ``O`` and of the final state against the
oracle (PASS when within 3x the Triton kernels' error or the dtype's eps, whichever is larger),
then the median time of each variant, of the Triton pair it replaces and of the whole Triton
forward. Each variant runs in its own try/except: a failure prints its full error and the run
goes on. Writes JSON to ``--out`` (default ``$OUT/mosaic_dev.json`` when ``OUT`` is set).

    python benchmarks/mosaic_dev.py                      # B8 T4096 H6 K128 V256 bf16, + a small one
    python benchmarks/mosaic_dev.py --lower-only         # CPU: lower every variant for cuda only
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback

import jax
import jax.numpy as jnp

from qdelta_jax import packing, qdelta_rule, xla
from qdelta_jax.pallas import config as pcfg
from qdelta_jax.pallas import forward as pfwd
from qdelta_jax.pallas import mosaic
from qdelta_jax.testing import time_fn

F32 = jnp.float32
C = 64

VARIANTS = {
    "bv64_s2_lane": mosaic.MosaicConfig(block_v=64, max_concurrent_steps=2,
                                        lowering_semantics="lane"),
    "bv64_s1_lane": mosaic.MosaicConfig(block_v=64, max_concurrent_steps=1,
                                        lowering_semantics="lane"),
    "bv128_s1_lane": mosaic.MosaicConfig(block_v=128, max_concurrent_steps=1,
                                         lowering_semantics="lane"),
    # Not run by default: with jax 0.11.2 its layout inference searches for minutes (on a CPU)
    # and then finds no solution.
    "bv64_s2_wg": mosaic.MosaicConfig(block_v=64, max_concurrent_steps=2,
                                      lowering_semantics="warpgroup"),
}
DEFAULT_VARIANTS = ("bv64_s2_lane", "bv64_s1_lane", "bv128_s1_lane")


def rel(a, b) -> float:
    a = jnp.asarray(a, F32)
    b = jnp.asarray(b, F32)
    return float(jnp.linalg.norm((a - b).ravel()) / (jnp.linalg.norm(b.ravel()) + 1e-30))


def inputs(key, B, T, H, K, V, dtype):
    ks = jax.random.split(key, 8)
    nrm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q = nrm(jax.random.normal(ks[0], (B, T, H, K), F32)).astype(dtype)
    k = nrm(jax.random.normal(ks[1], (B, T, H, K), F32) + 0.5).astype(dtype)  # correlated keys
    v = jax.random.normal(ks[2], (B, T, H, V), F32).astype(dtype)
    g = -jnp.exp(jax.random.uniform(ks[3], (H,), F32, 0.0, 2.7)) * jax.nn.softplus(
        jax.random.normal(ks[4], (B, T, H), F32) - 3.0
    )
    beta = jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, H), F32))
    lam = jax.nn.sigmoid(jax.random.normal(ks[6], (B, T, H), F32) - 0.9)
    h0 = 0.1 * jax.random.normal(ks[7], (B, H, K, V), F32)
    return q, k, v, g, beta, lam, h0


def times(fn, args, reps):
    """``(synchronised, pipelined)`` median milliseconds (``testing.time_fn``): each call waited
    for with ``block_until_ready``, and calls issued back to back (device throughput)."""
    return (time_fn(fn, args, warmup=3, reps=reps),
            time_fn(fn, args, warmup=1, reps=reps, pipelined=True))


def lower_only(shape, dtype, variants):
    B, T, H, K, V = shape
    S = jax.ShapeDtypeStruct
    args = (S((B, T, H, K), dtype), S((B, T, H, K), dtype), S((B, T, H), F32),
            S((B, T, H, K), dtype), S((B, T, H, V), dtype), S((B, H, K, V), F32))
    out = {}
    for name in variants:
        cfg = VARIANTS[name]
        try:
            t0 = time.perf_counter()
            f = jax.jit(lambda *a, cfg=cfg: mosaic.state_output(*a, scale=K**-0.5, cfg=cfg))
            f.trace(*args).lower(lowering_platforms=("cuda",))
            out[name] = f"lowered in {time.perf_counter() - t0:.1f} s"
        except Exception as e:  # noqa: BLE001 - report every variant
            traceback.print_exc()
            out[name] = f"FAIL {type(e).__name__}: {e}"[:2000]
        print(f"{name}: {out[name]}", flush=True)
    return out


def run_shape(shape, dtype, reps, variants):
    B, T, H, K, V = shape
    res: dict = {"shape": list(shape), "dtype": jnp.dtype(dtype).name, "variants": {}}
    scale = K**-0.5
    q, k, v, g, beta, lam, h0 = inputs(jax.random.PRNGKey(B * 7 + T + K), B, T, H, K, V, dtype)
    m = packing.make_layout(B, T, C, None).meta
    sp = lambda x: xla._split(x, C)  # noqa: E731
    G = packing.chunk_cumsum(g, C)
    loc = jax.jit(xla.chunk_local)(sp(q), sp(k), sp(v), sp(G), sp(beta), sp(lam))
    W, U = xla._merge(loc.W), xla._merge(loc.U)

    def oracle(k, q, G4, W4, U4, h0):
        h_in, D, fin = xla.state_pass(k, G4, W4, U4, h0, m, dtype)
        return xla._merge(xla.chunk_output(q, k, G4, h_in, D, scale, dtype)), fin

    o_x, fin_x = jax.jit(oracle)(sp(k), sp(q), loc.G, loc.W, loc.U, h0)
    o_x = o_x.astype(dtype)

    cfg = pcfg.get_config(K, V, C, dtype)
    interp = jax.default_backend() != "gpu"
    tri_state = jax.jit(lambda *a: pfwd.state_pass(*a, C=C, cfg=cfg.state, interpret=interp))
    tri_out = jax.jit(lambda *a: pfwd.chunk_output(*a, scale=scale, out_dtype=dtype, C=C,
                                                   cfg=cfg.output, interpret=interp))
    sargs = (k, G, W, U, h0, m.reset, m.is_last, m.seq)
    eps = float(jnp.finfo(dtype).eps)
    tol = {"o": eps, "final": eps}
    try:
        h_in, D, fin_t = tri_state(*sargs)
        o_t = tri_out(q, k, G, h_in, D)
        res["triton.o"] = rel(o_t, o_x)
        res["triton.final"] = rel(fin_t, fin_x)
        tol = {"o": max(tol["o"], 3 * res["triton.o"]),
               "final": max(tol["final"], 3 * res["triton.final"])}
        res["triton.state_ms"] = times(tri_state, sargs, reps)
        res["triton.output_ms"] = times(tri_out, (q, k, G, h_in, D), reps)
        res["triton.state+output_ms"] = [a + b for a, b in zip(res["triton.state_ms"],
                                                               res["triton.output_ms"])]
        tri_local = jax.jit(lambda *a: pfwd.chunk_local(*a, C=C, cfg=cfg.local,
                                                        interpret=interp, cfg_a=cfg.a))
        res["triton.local_ms"] = times(tri_local, (q, k, v, G, beta, lam), reps)
        fwd = jax.jit(lambda *a: qdelta_rule(*a[:6], initial_state=a[6], output_final_state=True,
                                             chunk_size=C, implementation="pallas"))
        res["pallas.qdelta_rule_fwd_ms"] = times(fwd, (q, k, v, g, beta, lam, h0), reps)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        res["triton_error"] = f"{type(e).__name__}: {e}"[:3000]
    res["tolerance"] = tol

    for name in variants:
        mcfg = VARIANTS[name]
        r: dict = {}
        res["variants"][name] = r
        try:
            f = jax.jit(lambda *a, mcfg=mcfg: mosaic.state_output(*a, scale=scale, cfg=mcfg))
            margs = (q, k, G, W, U, h0)
            t0 = time.perf_counter()
            o_m, fin_m = jax.block_until_ready(f(*margs))
            r["compile_s"] = time.perf_counter() - t0
            r["o"] = rel(o_m, o_x)
            r["final"] = rel(fin_m, fin_x)
            r["finite"] = bool(jnp.isfinite(o_m.astype(F32)).all() & jnp.isfinite(fin_m).all())
            r["pass"] = bool(r["finite"] and r["o"] <= tol["o"] and r["final"] <= tol["final"])
            r["ms"] = times(f, margs, reps)
        except Exception as e:  # noqa: BLE001 - one failing variant must not hide the others
            traceback.print_exc()
            r["error"] = f"{type(e).__name__}: {e}"[:3000]
            r["pass"] = False
        print(name, json.dumps(r), flush=True)
    return res


def print_table(res):
    print(f"\n== {res['shape']} {res['dtype']}  (rel. error vs xla; ms = sync / pipelined median)")
    tol = res.get("tolerance", {})
    print(f"{'kernel':<28}{'O err':>10}{'final err':>11}{'ms sync':>10}{'ms pipe':>10}  status")
    ts = res.get("triton.state+output_ms")
    if ts:
        print(f"{'triton state+output':<28}{res['triton.o']:>10.2e}{res['triton.final']:>11.2e}"
              f"{ts[0]:>10.3f}{ts[1]:>10.3f}  reference kernels (tol O {tol['o']:.1e},"
              f" final {tol['final']:.1e})")
        for key in ("triton.state_ms", "triton.output_ms", "triton.local_ms",
                    "pallas.qdelta_rule_fwd_ms"):
            a, b = res[key]
            print(f"{'  ' + key[:-3]:<28}{'':>10}{'':>11}{a:>10.3f}{b:>10.3f}")
    for name, r in res["variants"].items():
        if "error" in r:
            print(f"{'mosaic ' + name:<28}{'':>10}{'':>11}{'':>10}{'':>10}  FAIL "
                  f"{r['error'].splitlines()[0][:90]}")
            continue
        a, b = r.get("ms", (float("nan"),) * 2)
        status = "PASS" if r["pass"] else "FAIL"
        speed = f"  {ts[1] / b:.2f}x triton" if ts and b == b else ""
        print(f"{'mosaic ' + name:<28}{r['o']:>10.2e}{r['final']:>11.2e}{a:>10.3f}{b:>10.3f}"
              f"  {status}{speed}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1x256x2x128x256,8x4096x6x128x256",
                    help="comma list of BxTxHxKxV (T a multiple of 64)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma list of " +
                    ", ".join(VARIANTS))
    ap.add_argument("--lower-only", action="store_true",
                    help="only lower every variant for cuda (runs on a CPU-only machine)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dtype = jnp.dtype(a.dtype)
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",") if s]
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}, jax {jax.__version__}, backend {jax.default_backend()}",
          flush=True)
    allres = {"device": dev.device_kind, "jax": jax.__version__, "runs": []}
    variants = [v for v in a.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"--variants: unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    t0 = time.perf_counter()
    for shape in shapes:
        if a.lower_only:
            low = lower_only(shape, dtype, variants)
            allres["runs"].append({"shape": list(shape), "lower": low})
            continue
        r = run_shape(shape, dtype, a.reps, variants)
        allres["runs"].append(r)
        print_table(r)
    allres["wall_s"] = time.perf_counter() - t0
    out = a.out or (os.path.join(os.environ["OUT"], "mosaic_dev.json") if "OUT" in os.environ
                    else None)
    if out:
        with open(out, "w") as f:
            json.dump(allres, f, indent=1)
    print(f"wall {allres['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
