"""Time qdelta_rule's implementations: forward and forward+backward, tokens/s and memory.

    python benchmarks/ops.py                        # the three shapes of BENCHMARKS.md, bf16
    python benchmarks/ops.py --shapes 8x4096x6x128x256 --impl xla pallas --reps 50
    python benchmarks/ops.py --small                          # a CPU-sized smoke run

Method: every function is jitted and compiled first (compile time is reported separately), run
``--warmup`` times, then timed ``--reps`` times with ``block_until_ready`` around each call; the
median is reported; the "pipelined" columns issue ``--reps`` calls back to back with one
synchronisation (device throughput, as in a training loop; see ``testing.time_fn``).
Inputs are fresh random arrays (never zeros). Memory is XLA's compiled
memory analysis of the jitted function: ``temp`` is what it allocates on top of its arguments
and outputs (the figure the issue bounds), ``args``/``out`` are its argument and output bytes.
When the backend reports it, ``peak`` is the device's peak bytes in use since process start.

With ``--fla``, fla's ``chunk_gated_delta_rule`` forward is timed in the same run as an anchor
(needs torch and the ``flash-linear-attention`` wheel; skipped with a note otherwise).
With ``--anchors``, benchmarks/anchors.py runs first, in a torch process of its own on the same
card (before JAX takes the GPU's memory): the authors' kernel, fla's forward and flash attention,
and a last table sets our pipelined times beside theirs.

``--guarded`` adds, for every implementation, a row with ``guard_nonfinite=True``: the
difference to the plain row is what keeping NaN and inf exactly where the recurrence keeps
them costs.

``--docs S`` packs S documents of random lengths into every row (per-row ``cu_seqlens``, no
state in or out: the row-aligned layout) so packed and unpacked rows can be compared.

Writes a Markdown table to stdout and, with ``--json PATH``, the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # anchors.py beside this file

from qdelta_jax import qdelta_rule  # noqa: E402
from qdelta_jax.testing import parse_shape, random_inputs, random_offsets, time_fn

BENCH_SHAPES = ["8x4096x6x128x256", "8x4096x16x128x128", "2x16384x6x128x256"]
SMALL_SHAPES = ["2x512x2x64x64"]


def memory(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
        return {
            "temp": int(m.temp_size_in_bytes),
            "args": int(m.argument_size_in_bytes),
            "out": int(m.output_size_in_bytes),
        }
    except Exception:  # noqa: BLE001 - not every backend reports it
        return {}


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def split_impl(impl: str):
    """``(implementation, Config or None)`` of a benchmark name:
    :func:`qdelta_jax.pallas.config.split_variant`."""
    from qdelta_jax.pallas.config import split_variant

    return split_variant(impl)


def bench_impl(impl, shape, dtype, warmup, reps, chunk_size, docs=0, guard=False):
    """``impl``: an implementation of qdelta_rule, with the forms :func:`split_impl` takes;
    ``guard``: with the non-finite guard."""
    base, config = split_impl(impl)
    row = _bench_impl(impl, base, shape, dtype, warmup, reps, chunk_size, docs, config, guard)
    if guard:
        row["impl"] += " (guarded)"
    return row


def op_functions(impl, shape, dtype, chunk_size=64, docs=0, config=None, guard=False):
    """``[("fwd", fn, args), ("fwd_bwd", fn, args)]``: the op's forward and its ``jax.vjp``
    pull-back of all six inputs, on fresh random inputs of ``shape`` (BxTxHxKxV); ``docs > 0``
    packs that many documents into every row; ``config``: the op's kernel config."""
    B, T, H, K, V = shape
    q, k, v, g, beta, lam, _ = random_inputs(jax.random.key(0), B, T, H, K, V, dtype=dtype)
    do = jax.random.normal(jax.random.key(1), v.shape, jnp.float32).astype(v.dtype)
    cu = jnp.asarray(random_offsets(B, T, docs)) if docs else None

    def fwd(q, k, v, g, beta, lam):
        return qdelta_rule(q, k, v, g, beta, lam, implementation=impl, chunk_size=chunk_size,
                           cu_seqlens=cu, config=config, guard_nonfinite=guard)[0]

    def fwd_bwd(q, k, v, g, beta, lam, do):
        o, vjp = jax.vjp(fwd, q, k, v, g, beta, lam)
        return o, vjp(do)

    return [("fwd", fwd, (q, k, v, g, beta, lam)),
            ("fwd_bwd", fwd_bwd, (q, k, v, g, beta, lam, do))]


def _bench_impl(name_, impl, shape, dtype, warmup, reps, chunk_size, docs=0, config=None,
                guard=False):
    row = {"impl": name_ + (f" ({docs} docs/row)" if docs else ""), "shape": shape,
           "dtype": jnp.dtype(dtype).name}
    for name, fn, args in op_functions(impl, shape, dtype, chunk_size, docs, config, guard):
        t0 = time.perf_counter()
        try:
            compiled = jax.jit(fn).lower(*args).compile()
        except Exception as e:  # noqa: BLE001 - report and go on with the other rows
            row[name] = None
            row[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            continue
        row[f"{name}_compile_s"] = time.perf_counter() - t0
        try:
            row[name] = time_fn(compiled, args, warmup, reps)
            row[f"{name}_pipe"] = time_fn(compiled, args, 1, reps, pipelined=True)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory
            row[name] = None
            row[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            continue
        row[f"{name}_mem"] = memory(compiled)
    row["peak"] = peak_bytes()
    return row


def fla_forward(shape):
    """A function running fla's ``chunk_gated_delta_rule`` forward (q, k L2-normalised in the
    kernel) on fresh random bf16 inputs of ``shape``; needs torch, CUDA and the fla wheel."""
    import torch
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    B, T, H, K, V = shape
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, T, H, K, device=dev, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, T, H, K, device=dev, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(B, T, H, V, device=dev, dtype=torch.bfloat16, generator=gen)
    g = -torch.nn.functional.softplus(torch.randn(B, T, H, device=dev, generator=gen) - 1) * 0.5
    beta = torch.sigmoid(torch.randn(B, T, H, device=dev, generator=gen)).bfloat16()

    def run():
        return chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)

    return run


def bench_fla(shape, warmup, reps):
    """fla's chunk_gated_delta_rule forward (lam = 0 equivalent) in this process, timed as
    benchmarks/anchors.py times it: pipelined, and triton's do_bench (median) as "fwd"."""
    try:
        run = fla_forward(shape)
        from anchors import timings
    except Exception as e:  # noqa: BLE001
        return {"impl": "fla gated delta rule", "shape": shape, "fwd_error": f"not available: {e}"}
    t = timings(run, warmup, reps)
    return {"impl": "fla gated delta rule", "shape": shape, "fwd": t["do_bench"],
            "fwd_pipe": t["pipe"]}


def fmt_ms(x):
    return "-" if x is None else f"{x:.3f}"


def fmt_gib(row, key):
    m = row.get(f"{key}_mem") or {}
    return "-" if "temp" not in m else f"{m['temp'] / 2**30:.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=None,
                   help="BxTxHxKxV (default: the three shapes of BENCHMARKS.md)")
    p.add_argument("--impl", nargs="+", default=None,
                   help="implementations (default: xla, plus pallas and pallas-no-save-residuals"
                   " on GPU); pallas-no-save-residuals is pallas with save_residuals off;"
                   " kernel-config suffixes as qdelta_jax.pallas.config.split_variant takes"
                   " them: +mbvN (the Mosaic GPU V tile), +tdqkw, +tdd0, +tgk, +nfl, +pfl, "
                   "+mloc, +tloc")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--small", action="store_true", help="a CPU-sized smoke run")
    p.add_argument("--fla", action="store_true", help="time fla's gated delta rule as an anchor")
    p.add_argument("--anchors", action="store_true",
                   help="run benchmarks/anchors.py first (authors' kernel, fla, flash attention)")
    p.add_argument("--docs", type=int, nargs="+", default=[0],
                   help="documents packed per row (0 = unpacked); several values: one row each")
    p.add_argument("--guarded", action="store_true",
                   help="also time every implementation with the non-finite guard")
    p.add_argument("--json", default=None, help="write raw numbers here")
    a = p.parse_args(argv)
    try:
        shapes = [parse_shape(s) for s in (a.shapes or (SMALL_SHAPES if a.small else BENCH_SHAPES))]
    except ValueError as e:
        p.error(f"--shapes: {e}")
    on_gpu = jax.default_backend() == "gpu"
    impls = a.impl or (["xla", "pallas", "pallas-no-save-residuals"] if on_gpu else ["xla"])
    for impl in impls:
        try:
            split_impl(impl)
        except ValueError as e:
            p.error(f"--impl: {e}")
    dtype = jnp.dtype(a.dtype)
    anchors = run_anchors(shapes, a.warmup, a.reps) if a.anchors else None
    device = jax.devices()[0].device_kind
    print(f"# device: {device} ({jax.default_backend()}), jax {jax.__version__}, "
          f"dtype {dtype.name}, chunk {a.chunk_size}, warmup {a.warmup}, reps {a.reps}",
          file=sys.stderr)
    rows = []

    def save():  # after every row: a run cut short keeps what it measured
        if a.json:
            with open(a.json, "w") as fh:
                json.dump({"device": device, "jax": jax.__version__, "rows": rows,
                           "anchors": anchors}, fh, indent=1, default=str)

    for shape in shapes:
        guards = (False, True) if a.guarded else (False,)
        for impl, docs, guard in [(i, d, u) for i in impls for d in a.docs for u in guards]:
            row = bench_impl(impl, shape, dtype, a.warmup, a.reps, a.chunk_size, docs, guard)
            rows.append(row)
            save()
            print(f"# {impl} {shape}: fwd {fmt_ms(row.get('fwd'))} ms, "
                  f"fwd+bwd {fmt_ms(row.get('fwd_bwd'))} ms (pipelined "
                  f"{fmt_ms(row.get('fwd_pipe'))} / {fmt_ms(row.get('fwd_bwd_pipe'))}) "
                  f"{row.get('fwd_error', '')} {row.get('fwd_bwd_error', '')}",
                  file=sys.stderr, flush=True)
        if a.fla and on_gpu:
            rows.append(bench_fla(shape, a.warmup, a.reps))
            save()
    print(f"\nDevice: {device}; dtype {dtype.name}; median of {a.reps} after {a.warmup} warm-up\n")
    print("| shape B,T,H,K,V | impl | fwd ms | fwd+bwd ms | fwd ms, pipelined "
          "| fwd+bwd ms, pipelined | fwd Mtok/s | fwd+bwd Mtok/s | fwd temp GiB "
          "| fwd+bwd temp GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        B, T = r["shape"][:2]
        tok = B * T
        f, fb = r.get("fwd"), r.get("fwd_bwd")
        print(f"| {','.join(map(str, r['shape']))} | {r['impl']} | {fmt_ms(f)} | {fmt_ms(fb)} | "
              f"{fmt_ms(r.get('fwd_pipe'))} | {fmt_ms(r.get('fwd_bwd_pipe'))} | "
              f"{'-' if not f else f'{tok / f / 1e3:.1f}'} | "
              f"{'-' if not fb else f'{tok / fb / 1e3:.1f}'} | "
              f"{fmt_gib(r, 'fwd')} | {fmt_gib(r, 'fwd_bwd')} |")
        for key in ("fwd_error", "fwd_bwd_error"):
            if r.get(key):
                print(f"|  | {r['impl']} {key}: {r[key]} | | | | | | | | |")
    if anchors is not None:
        print_anchor_table(rows, anchors, impls)
    save()
    return 0


def run_anchors(shapes, warmup, reps) -> dict:
    """benchmarks/anchors.py in its own process (torch and JAX each want the GPU's memory)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "anchors.py")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "anchors.json")
        cmd = [sys.executable, script, "--shapes", *["x".join(map(str, s)) for s in shapes],
               "--warmup", str(warmup), "--reps", str(reps), "--json", path]
        print("# anchors: " + " ".join(cmd), file=sys.stderr, flush=True)
        r = subprocess.run(cmd, check=False)
        if r.returncode or not os.path.exists(path):
            return {"error": f"anchors.py exited with {r.returncode}", "rows": []}
        with open(path) as fh:
            return json.load(fh)


def print_anchor_table(rows, anchors, impls):
    """Our pipelined fwd / fwd+bwd beside the anchors' (pipelined; do_bench in brackets)."""
    def anchor(shape, name, key):
        for r in anchors.get("rows", []):
            if tuple(r["shape"]) == tuple(shape) and r["anchor"] == name:
                if "error" in r:
                    return "error"
                t = r.get(key)
                return "-" if t is None else f"{t['pipe']:.3f} ({t['do_bench']:.3f})"
        return "-"

    print(f"\nAnchors ({anchors.get('device', '?')}, torch {anchors.get('torch', '?')}, "
          "separate process, same card): ms, pipelined (do_bench median)\n")
    print("| shape B,T,H,K,V | ours | ours fwd / fwd+bwd | authors fwd | authors fwd+bwd "
          "| fla fwd | SDPA fwd | SDPA fwd+bwd |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if r["impl"] not in impls and not r["impl"].startswith("pallas"):
            continue
        sh = r["shape"]
        print(f"| {','.join(map(str, sh))} | {r['impl']} | {fmt_ms(r.get('fwd_pipe'))} / "
              f"{fmt_ms(r.get('fwd_bwd_pipe'))} | {anchor(sh, 'authors', 'fwd')} | "
              f"{anchor(sh, 'authors', 'fwd_bwd')} | {anchor(sh, 'fla', 'fwd')} | "
              f"{anchor(sh, 'sdpa', 'fwd')} | {anchor(sh, 'sdpa', 'fwd_bwd')} |")
    for r in anchors.get("rows", []):
        if "error" in r:
            print(f"\n{r['anchor']} {r['shape']}: {r['error']}")


if __name__ == "__main__":
    raise SystemExit(main())
