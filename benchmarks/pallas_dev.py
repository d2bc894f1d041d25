"""Device check and timing of the Pallas kernels against the XLA chunked path, in one run.

For each shape: every kernel stage against its :mod:`qdelta_jax.xla` oracle (relative error),
the whole ``qdelta_rule`` forward and all seven gradients (pallas vs xla, and both vs an xla
run in float32 with precision HIGHEST), then the median device time (calls back to back) of
forward and forward+backward for pallas and xla, and of each Pallas stage alone. Prints a
table and writes JSON to ``--out`` (default ``$OUT/pallas_dev.json`` when ``OUT`` is set).

    python benchmarks/pallas_dev.py                        # small shape + B8 T4096 H6 K128 V256
    python benchmarks/pallas_dev.py --shapes 8x4096x6x128x256 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import traceback

import jax
import jax.numpy as jnp

from qdelta_jax import packing, qdelta_rule, xla
from qdelta_jax.pallas import backward as pbwd
from qdelta_jax.pallas import config as pcfg
from qdelta_jax.pallas import forward as pfwd
from qdelta_jax.testing import parse_shape, random_inputs, rel_err, time_fn

F32 = jnp.float32


# The inputs of the kernel checks (here and in mosaic_dev.py): unit q and k with correlated
# keys, as the op passes them to the kernels, and a spread of per-head decay rates.
KERNEL_INPUTS = dict(unit_qk=True, key_shift=0.5, g_rate=(0.0, 2.7), h0_scale=0.1)


def bench(fn, args, reps=30, warmup=3):
    """Device throughput (calls back to back, see ``testing.time_fn``): single kernels are
    short enough that a per-call synchronisation would add a large fixed cost."""
    return time_fn(fn, args, warmup=warmup, reps=reps, pipelined=True)


def loss_fn(impl, C, precision=None, config=None):
    def f(q, k, v, g, beta, lam, h0, w):
        with jax.default_matmul_precision(precision) if precision else _null():
            o, fin = qdelta_rule(q, k, v, g, beta, lam, initial_state=h0, output_final_state=True,
                                 chunk_size=C, implementation=impl, config=config)
        return jnp.sum(o.astype(F32) * w) + jnp.sum(fin * h0), (o, fin)
    return f


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def stage_checks(q, k, v, g, beta, lam, h0, C, res):
    """Each kernel against its xla.py stage on the padded layout (same inputs, same dtype)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = q.dtype
    cfg = pcfg.get_config(K, V, C, dt)
    interp = jax.default_backend() != "gpu"
    layout = packing.make_layout(B, T, C, None)
    m = layout.meta
    P = lambda x: packing.to_padded(x, layout)  # noqa: E731
    qp, kp, vp, gp, bp, lp = P(q), P(k), P(v), P(g), P(beta), P(lam)
    Gp = packing.chunk_cumsum(gp, C)
    sp = lambda x: xla._split(x, C)  # noqa: E731
    W, U, Tinv = jax.jit(lambda *a: pfwd.chunk_local(*a, C=C, cfg=cfg.wu, interpret=interp,
                                                     cfg_solve=cfg.solve))(
        qp, kp, vp, Gp, bp, lp)
    h_in, D, fin = jax.jit(lambda *a: pfwd.state_pass(*a, C=C, cfg=cfg.state, interpret=interp))(
        kp, Gp, W, U, h0, m.reset, m.is_last, m.seq)
    scale = K**-0.5
    o = jax.jit(lambda *a: pfwd.chunk_output(*a, scale=scale, out_dtype=v.dtype, C=C,
                                             cfg=cfg.output, interpret=interp))(qp, kp, Gp, h_in, D)
    if CHECK[0]:
        loc = jax.jit(xla.chunk_local)(sp(qp), sp(kp), sp(vp), sp(Gp), sp(bp), sp(lp))
        res["local.W"] = rel_err(sp(W), loc.W)
        res["local.U"] = rel_err(sp(U), loc.U)
        res["local.T"] = rel_err(sp(Tinv), loc.Tinv)
        xh, xD, xf = jax.jit(lambda *a: xla.state_pass(*a, m, dt))(sp(kp), loc.G, loc.W, loc.U,
                                                                   h0)
        res["state.h_in"] = rel_err(jnp.moveaxis(h_in, 2, 1), xh)
        res["state.D"] = rel_err(sp(D), xD)
        res["state.final"] = rel_err(fin, xf)
        xo = jax.jit(lambda *a: xla.chunk_output(*a, scale, dt))(sp(qp), sp(kp), loc.G, xh, xD)
        res["output.o"] = rel_err(sp(o), xo)
    do = jax.random.normal(jax.random.PRNGKey(7), vp.shape, F32).astype(dt)
    dfin = jax.random.normal(jax.random.PRNGKey(8), h0.shape, F32)
    pdD0 = jax.jit(lambda *a: pbwd.chunk_dd0(*a, scale=scale, C=C, cfg=cfg.dd0,
                                             interpret=interp))(qp, kp, Gp, do)
    dh_out, dD, dh0 = jax.jit(lambda *a: pbwd.reverse_state_pass(
        *a, scale=scale, C=C, cfg=cfg.reverse, interpret=interp))(
        qp, kp, Gp, W, do, pdD0, dfin, m.reset, m.is_last, m.seq)
    if CHECK[0]:
        _, incl = xla._masks(C)
        Pm = xla._mm("...ik,...jk->...ij", sp(qp), sp(kp), dt) * xla._decay(loc.G, incl)
        dD0 = (scale * xla._mm("...ij,...iv->...jv", Pm, sp(do), dt)).astype(dt)
        res["dd0.dD0"] = rel_err(sp(pdD0), dD0)
        xdh, xdh0 = jax.jit(lambda *a: xla.reverse_state_pass(*a, m, scale, B, dt))(
            sp(kp), loc.G, loc.W, sp(qp), sp(do), dD0, dfin)
        res["reverse.dh_out"] = rel_err(jnp.moveaxis(dh_out, 2, 1), xdh)
        res["reverse.dh0"] = rel_err(dh0, xdh0)
        grads = jax.jit(lambda *a: xla.chunk_grads(*a, scale, dt))(
            sp(qp), sp(kp), sp(vp), sp(bp), sp(lp), loc, xh, xD, sp(do), xdh)
    dqp, dkp, dW, dGp, dPs = jax.jit(lambda *a: pbwd.chunk_dqkw(
        *a, scale=scale, C=C, cfg=cfg.dqkw, interpret=interp))(qp, kp, Gp, h_in, dh_out, do, D, dD)
    out = jax.jit(lambda *a: pbwd.chunk_grads(*a, C=C, cfg=cfg.grads_v,
                                              interpret=interp, cfg_k=cfg.grads_k))(
        qp, kp, vp, Gp, bp, lp, Tinv, dD, dW, dqp, dkp, dGp, dPs)
    if CHECK[0]:
        for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dlam"), out, grads):
            res[f"grads.{name}"] = rel_err(sp(a), b)
    # stage timings (each stage alone, at the config's settings or a candidate's)
    ins = dict(wu=(qp, kp, vp, Gp, bp, lp), wu_infer=(qp, kp, vp, Gp, bp, lp),
               solve=(qp, kp, Gp, bp, lp),
               state=(kp, Gp, W, U, h0, m.reset, m.is_last, m.seq),
               output=(qp, kp, Gp, h_in, D),
               dd0=(qp, kp, Gp, do),
               reverse=(qp, kp, Gp, W, do, pdD0, dfin, m.reset, m.is_last, m.seq),
               dqkw=(qp, kp, Gp, h_in, dh_out, do, D, dD),
               grads_v=(qp, kp, vp, Gp, bp, lp, Tinv, dD, dW, dqp, dkp, dGp, dPs))
    ins["grads_k"] = ins["grads_v"]

    def field(name):  # the Config stage whose settings a timed stage runs with
        return "wu" if name == "wu_infer" else name

    def stage_fn(name, sc):
        c = dataclasses.replace(cfg, **{field(name): sc})
        f = {
            "wu": lambda *a: pfwd.chunk_local(*a, C=C, cfg=c.wu, interpret=interp,
                                              cfg_solve=c.solve),
            # the pair where no backward reads T (inference): T in the compute dtype
            "wu_infer": lambda *a: pfwd.chunk_local(*a, C=C, cfg=c.wu, interpret=interp,
                                                    cfg_solve=c.solve, t_float32=False),
            "solve": lambda *a: pfwd.chunk_solve(*a, C=C, cfg=c.solve, interpret=interp),
            "state": lambda *a: pfwd.state_pass(*a, C=C, cfg=c.state, interpret=interp),
            "output": lambda *a: pfwd.chunk_output(*a, scale=scale, out_dtype=v.dtype, C=C,
                                                   cfg=c.output, interpret=interp),
            "dd0": lambda *a: pbwd.chunk_dd0(*a, scale=scale, C=C, cfg=c.dd0, interpret=interp),
            "reverse": lambda *a: pbwd.reverse_state_pass(*a, scale=scale, C=C, cfg=c.reverse,
                                                          interpret=interp),
            "dqkw": lambda *a: pbwd.chunk_dqkw(*a, scale=scale, C=C, cfg=c.dqkw,
                                               interpret=interp),
            "grads_v": lambda *a: pbwd.chunk_grads(*a, C=C, cfg=c.grads_v,
                                                 interpret=interp, cfg_k=c.grads_k),
        }
        return jax.jit(f["grads_v" if name == "grads_k" else name])

    t = {}
    for name in ("wu", "wu_infer", "solve", "state", "output", "dd0", "reverse", "dqkw", "grads_v"):
        t[name] = bench(stage_fn(name, getattr(cfg, field(name))), ins[name])
    if SWEEP_DEADLINE[0]:
        SWEEP_DEADLINE[0] += time.perf_counter()
        sweep = res.setdefault("sweep", {})
        for name in SWEEP_STAGES or list(SWEEP):
            for cand in SWEEP[name]:
                if time.perf_counter() > SWEEP_DEADLINE[0]:
                    sweep["stopped"] = "deadline"
                    return t
                sc = pcfg.StageConfig(*cand)
                key = f"{name} w{sc.num_warps} s{sc.num_stages} bv{sc.block_v} bk{sc.block_k}"
                try:
                    sweep[key] = bench(stage_fn(name, sc), ins[name], reps=20, warmup=2)
                except Exception as e:  # noqa: BLE001 - a candidate that fails to compile loses
                    sweep[key] = f"{type(e).__name__}: {e}"[:200]
                print(key, sweep[key], flush=True)
    return t


# Candidate settings per stage (num_warps, num_stages, block_v, block_k) for --sweep-s.
SWEEP = {  # in the order they run until the deadline: the backward's largest kernels first
    # "grads_k" times both local-gradient launches, with grads_k's candidates (block_k < K: the
    # K-sliced kernel, fewer live [C, K] tiles); "grads_v" the same with grads_v's V tiles.
    "grads_k": [(8, 1, 0, 0), (4, 1, 0, 0), (8, 1, 0, 64), (4, 1, 0, 64), (4, 1, 0, 32),
                (8, 1, 0, 32), (8, 2, 0, 64)],
    "dqkw": [(4, 2, 64, 64), (8, 2, 64, 128), (4, 2, 128, 128), (8, 2, 128, 64),
             (4, 2, 128, 64), (4, 1, 64, 32), (8, 3, 64, 64)],
    "grads_v": [(8, 1, 64, 0), (4, 1, 128, 0), (4, 1, 32, 0), (8, 1, 128, 0), (4, 2, 64, 0)],
    "dd0": [(4, 1, 64, 0), (8, 1, 128, 0), (4, 1, 256, 0), (4, 2, 128, 0)],
    "reverse": [(4, 2, 64, 0), (4, 2, 32, 0), (4, 2, 16, 0), (2, 2, 16, 0), (2, 2, 32, 0),
                (8, 2, 64, 0), (4, 3, 32, 0)],
    "wu": [(4, 1, 64, 128), (8, 1, 128, 128), (4, 1, 256, 128), (4, 1, 128, 64)],
    "solve": [(2, 1, 0, 64), (1, 1, 0, 32), (4, 1, 0, 64), (1, 1, 0, 128)],
    "state": [(4, 2, 64, 0), (4, 2, 32, 0), (4, 2, 16, 0), (2, 2, 16, 0), (2, 2, 32, 0)],
    "output": [(4, 2, 128, 0), (8, 2, 256, 0)],
}
SWEEP_DEADLINE = [0.0]
CHECK = [True]  # --sweep-only turns the comparisons with the XLA stages and path off
SWEEP_STAGES: list[str] = []  # --sweep-stages: only these, in that order (default all)


def run_shape(B, T, H, K, V, dtype, C, reps, do_stages):
    res: dict = {"shape": [B, T, H, K, V], "dtype": jnp.dtype(dtype).name, "chunk": C}
    args = random_inputs(jax.random.PRNGKey(B * 7 + T + K), B, T, H, K, V, dtype=dtype,
                         **KERNEL_INPUTS)
    w = jax.random.normal(jax.random.PRNGKey(3), (B, T, H, V), F32)
    if do_stages:
        try:
            t0 = time.perf_counter()
            res["stage_ms"] = stage_checks(*args, C, res)
            res["stage_wall_s"] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001
            res["stage_error"] = f"{type(e).__name__}: {e}"[:3000]
            traceback.print_exc()
    if not CHECK[0]:  # --sweep-only: the stage times and the sweep are the result
        return res
    try:
        vg = {}
        for impl in ("pallas", "xla"):
            f = loss_fn(impl, C)
            vg[impl] = jax.jit(jax.value_and_grad(f, argnums=tuple(range(7)), has_aux=True))
        f32 = [a.astype(F32) for a in args]
        ref = jax.jit(jax.value_and_grad(loss_fn("xla", C, "highest"), argnums=tuple(range(7)),
                                         has_aux=True))(*f32, w)
        outs = {impl: vg[impl](*args, w) for impl in vg}
        names = ("q", "k", "v", "g", "beta", "lam", "h0")
        for impl, ((_, (o, fin)), gr) in outs.items():
            res[f"{impl}.o"] = rel_err(o, ref[0][1][0])
            res[f"{impl}.final"] = rel_err(fin, ref[0][1][1])
            for n, a, b in zip(names, gr, ref[1]):
                res[f"{impl}.d{n}"] = rel_err(a, b)
        (_, (o_p, f_p)), g_p = outs["pallas"]
        (_, (o_x, f_x)), g_x = outs["xla"]
        res["pallas_vs_xla.o"] = rel_err(o_p, o_x)
        res["pallas_vs_xla.final"] = rel_err(f_p, f_x)
        for n, a, b in zip(names, g_p, g_x):
            res[f"pallas_vs_xla.d{n}"] = rel_err(a, b)
    except Exception as e:  # noqa: BLE001
        res["check_error"] = f"{type(e).__name__}: {e}"[:3000]
        traceback.print_exc()
    try:
        for impl in ("pallas", "xla"):
            fwd = jax.jit(lambda *a, impl=impl: qdelta_rule(
                *a[:6], initial_state=a[6], output_final_state=True, chunk_size=C,
                implementation=impl))
            res[f"{impl}.fwd_ms"] = bench(fwd, args, reps)
            res[f"{impl}.fwdbwd_ms"] = bench(vg[impl], (*args, w), reps)
    except Exception as e:  # noqa: BLE001
        res["time_error"] = f"{type(e).__name__}: {e}"[:3000]
        traceback.print_exc()
    # The same config with save_residuals off (the backward recomputes W, T, h_in, D):
    # gradients against the default run, and the forward + backward time.
    try:
        no_save = pcfg.Config(save_residuals=False)
        f = jax.jit(jax.value_and_grad(loss_fn("pallas", C, config=no_save),
                                       argnums=tuple(range(7)), has_aux=True))
        (_, (o_s, f_s)), g_s = f(*args, w)
        (_, (o_p, f_p)), g_p = vg["pallas"](*args, w)
        res["pallas_no_save_residuals_vs_pallas.final"] = rel_err(f_s, f_p)
        for n, a_, b_ in zip(("q", "k", "v", "g", "beta", "lam", "h0"), g_s, g_p):
            res[f"pallas_no_save_residuals_vs_pallas.d{n}"] = rel_err(a_, b_)
        res["pallas_no_save_residuals.fwdbwd_ms"] = bench(f, (*args, w), reps)
    except Exception as e:  # noqa: BLE001
        res["no_save_residuals_error"] = f"{type(e).__name__}: {e}"[:3000]
        traceback.print_exc()
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="2x256x2x64x64,8x4096x6x128x256")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--extra-fp32", default="2x256x2x64x64",
                    help="shapes also run in float32 (comma list, empty for none)")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--no-stages", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep-s", type=float, default=0.0,
                    help="also time the SWEEP candidates of each stage for up to this many seconds"
                    " (last shape of --dtype only)")
    ap.add_argument("--sweep-only", action="store_true",
                    help="time the stages and sweep them without checking them against the XLA"
                    " stages and the whole op (much faster on large shapes)")
    ap.add_argument("--sweep-stages", default="",
                    help="comma-separated SWEEP stages to sweep, in this order (default: all)")
    a = ap.parse_args(argv)
    SWEEP_STAGES[:] = [n for n in a.sweep_stages.split(",") if n]
    bad = [n for n in SWEEP_STAGES if n not in SWEEP]
    if bad:
        ap.error(f"--sweep-stages: unknown {bad}; known: {', '.join(SWEEP)}")
    CHECK[0] = not a.sweep_only
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}, jax {jax.__version__}, backend {jax.default_backend()}",
          flush=True)
    runs = [(s, a.dtype) for s in a.shapes.split(",") if s]
    runs += [(s, "float32") for s in a.extra_fp32.split(",") if s]
    allres = {"device": dev.device_kind, "jax": jax.__version__, "runs": []}
    for s, dts in runs:
        B, T, H, K, V = parse_shape(s)
        t0 = time.perf_counter()
        main_runs = [r for r in runs if r[1] == a.dtype]
        last = bool(main_runs) and (s, dts) == main_runs[-1]
        SWEEP_DEADLINE[0] = a.sweep_s if last else 0.0
        r = run_shape(B, T, H, K, V, jnp.dtype(dts), a.chunk, a.reps, not a.no_stages)
        r["wall_s"] = time.perf_counter() - t0
        allres["runs"].append(r)
        print(json.dumps(r, indent=None), flush=True)
    out = a.out or (os.path.join(os.environ["OUT"], "pallas_dev.json") if "OUT" in os.environ
                    else None)
    if out:
        with open(out, "w") as f:
            json.dump(allres, f, indent=1)
    print("\n== summary (" + dev.device_kind + ")")
    for r in allres["runs"]:
        print(r["shape"], r["dtype"])
        for k in sorted(r):
            if (k.endswith("_ms") or k.startswith(("pallas_vs_xla", "pallas_saved_vs"))
                    or "error" in k):
                print(f"  {k}: {r[k]}")
        if "stage_ms" in r:
            print("  stage_ms:", {k: round(v, 3) for k, v in r["stage_ms"].items()})


if __name__ == "__main__":
    main()
