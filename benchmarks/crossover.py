"""Training tokens/s of the Q-Delta LM against a Llama-style transformer of the same size, over
sequence length, and the Q-Delta model at long context.

    python benchmarks/crossover.py --out crossover.png        # 340m; T = 2K ... 32K; 16K tok/step
    python benchmarks/crossover.py --seq-lens 4096 8192 --models qdelta --no-long
    python benchmarks/crossover.py --preset tiny --seq-lens 32 64 --tokens-per-step 128 \\
        --long-seq-lens 64 --steps 1 --out /tmp/x.png                    # CPU smoke run

Both models (``--preset``'s width, depth, MLP size and vocabulary; the transformer has heads of
128 channels, rotary positions, SwiGLU, RMSNorm and ``jax.nn.dot_product_attention`` with
``implementation="cudnn"`` on GPUs, see ``llama.py``) train with the same step: the trainer's
``make_train_step`` with AdamW, clipping and the chunked LM head + cross-entropy, bf16 compute
over float32 params, layers under ``lax.scan`` by default: one compiled block per point keeps
the whole run within minutes, but a scanned step is slower than an unrolled one (the README
measured 34% for the Q-Delta 340m step); ``--unrolled`` unrolls both models (about a minute of
compilation per Q-Delta point on an H200: run fewer points per call). Every sequence length
gets ``--tokens-per-step`` tokens a step (batch = tokens / T, at least 1 row: above that length
a step holds one row of T tokens) of random ids in unpacked rows. Each point is compiled ahead
of time, run ``--warmup`` steps, then timed over ``--steps`` back-to-back steps.

Long context (``--long-seq-lens``, default 16384 and 32768, batch 1 and 2): the Q-Delta model
trains at those lengths; points the crossover already ran are not run twice. A point that runs
out of memory runs again with ``remat`` (each block recomputed in the backward; marked
"(remat)"), unless ``--no-remat-on-oom``; one that still does not fit is reported as such.
Memory: ``temp`` is XLA's compiled memory analysis of the step (what it allocates beyond its
arguments and outputs), ``peak`` the device's peak bytes in use since the process started
(``memory_stats()``; cumulative, so points run in order of growing size).

Prints a Markdown table; writes a PNG of tokens/s against T to ``--out`` (needs matplotlib) and
with ``--json PATH`` the numbers.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama  # noqa: E402
import step_common  # noqa: E402

from qdelta_jax.model import QDeltaConfig, QDeltaLM  # noqa: E402
from qdelta_jax.train import loop, trainer  # noqa: E402

MODELS = ("qdelta", "llama")


def model_configs(a):
    overrides = {"compute_dtype": a.dtype, "scan_layers": not a.unrolled, "remat": a.remat,
                 **trainer.parse_overrides(a.model_overrides)}
    if a.implementation is not None:
        overrides["implementation"] = a.implementation
    qcfg = QDeltaConfig.from_preset(a.preset, **overrides)
    attention = a.attention
    if attention == "auto":
        attention = "cudnn" if jax.default_backend() == "gpu" else None
    return qcfg, llama.LlamaConfig.like(qcfg, attention=attention)


def make_fns(name: str, qcfg, lcfg, seed: int = 0) -> loop.ModelFns:
    if name == "qdelta":
        return loop.ModelFns(lambda: QDeltaLM(qcfg, rngs=nnx.Rngs(seed)))
    return loop.ModelFns(lambda: llama.LlamaLM(lcfg, rngs=nnx.Rngs(seed)))


def random_batch(batch: int, seq_len: int, vocab: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    seq = rng.integers(0, vocab, size=(batch, seq_len + 1), dtype=np.int64).astype(np.int32)
    return {"inputs": jnp.asarray(seq[:, :-1]), "targets": jnp.asarray(seq[:, 1:]),
            "mask": jnp.ones((batch, seq_len), jnp.float32)}


def _is_oom(e: Exception) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def run_point(name: str, fns: loop.ModelFns, vocab: int, seq_len: int, batch: int, a) -> dict:
    """Compiles and times one (model, T, batch) point."""
    rec = {"model": name, "seq_len": seq_len, "batch": batch, "tokens_per_step": batch * seq_len}
    tx = loop.make_optimizer(loop.OptimConfig(lr=1e-3, warmup=10, steps=1000))
    step = jax.jit(loop.make_train_step(fns, tx), donate_argnums=0)
    batches = [random_batch(batch, seq_len, vocab, seed=i) for i in range(2)]
    state = None
    try:
        state = jax.jit(lambda p: loop.init_train_state(p, tx, 0))(fns.init())
        t0 = time.perf_counter()
        compiled = step.lower(state, batches[0]).compile()
        rec["compile_s"] = time.perf_counter() - t0
        rec["memory"] = step_common.memory_analysis(compiled)
        state, _, _ = step_common.time_steps(compiled, state, batches, a.warmup)
        state, step_s, metrics = step_common.time_steps(compiled, state, batches, a.steps)
        rec.update(step_s=step_s, tokens_per_s=batch * seq_len / step_s,
                   loss=float(metrics["loss"]), peak_bytes=step_common.peak_bytes(), status="ok")
    except Exception as e:  # noqa: BLE001 -- an out-of-memory point is a result, not a crash
        if not _is_oom(e):
            raise
        rec.update(status="out of memory", error=str(e).splitlines()[0][:200])
    finally:
        del state
        gc.collect()
    return rec


def plan(a) -> list[tuple[str, int, int]]:
    """The (model, T, batch) points, crossover first (by T), then the long-context extras."""
    points = []
    for T in sorted(a.seq_lens):
        for name in a.models:
            points.append((name, T, max(1, a.tokens_per_step // T)))
    if a.long:
        for T in sorted(a.long_seq_lens):
            for B in sorted(a.long_batches):
                if ("qdelta", T, B) not in points:
                    points.append(("qdelta", T, B))
    return points


def fmt_bytes(n) -> str:
    return "" if n is None else f"{n / 2**30:.1f} GiB"


def format_table(rows: list[dict]) -> str:
    lines = ["| model | T | batch | tokens/step | step ms | tokens/s | vs llama | compile s | "
             "temp | peak |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
             "---: |"]
    llama_tps = {(r["seq_len"], r["batch"]): r.get("tokens_per_s") for r in rows
                 if r["model"] == "llama" and r["status"] == "ok"}
    for r in rows:
        r = {**r, "model": r["model"] + (" (remat)" if r.get("remat") else "")}
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['seq_len']} | {r['batch']} | "
                         f"{r['tokens_per_step']} | {r['status']} | | | | | |")
            continue
        ref = llama_tps.get((r["seq_len"], r["batch"]))
        ratio = (f"{r['tokens_per_s'] / ref:.2f}x" if ref and not r["model"].startswith("llama")
                 else "")
        lines.append(
            f"| {r['model']} | {r['seq_len']} | {r['batch']} | {r['tokens_per_step']} | "
            f"{r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | {ratio} | "
            f"{r['compile_s']:.1f} | {fmt_bytes(r['memory'].get('temp'))} | "
            f"{fmt_bytes(r.get('peak_bytes'))} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}")
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("qdelta", "Q-Delta"), ("llama", "Llama (attention)")):
        pts = sorted((r["seq_len"], r["tokens_per_s"]) for r in rows
                     if r["model"] == name and r["status"] == "ok" and r.get("crossover"))
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("training tokens/s")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return True


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="340m")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--seq-lens", nargs="+", type=int, default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--tokens-per-step", type=int, default=16384)
    p.add_argument("--long-seq-lens", nargs="+", type=int, default=[16384, 32768])
    p.add_argument("--long-batches", nargs="+", type=int, default=[1, 2])
    p.add_argument("--no-long", dest="long", action="store_false",
                   help="skip the long-context points")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--implementation", default=None, help="the Q-Delta op's implementation")
    p.add_argument("--attention", default="auto",
                   help="dot_product_attention implementation: auto (cudnn on GPU), xla, cudnn")
    p.add_argument("--unrolled", action="store_true",
                   help="both models' layers unrolled, not scanned (slow to compile)")
    p.add_argument("--remat", action="store_true", help="recompute each block in the backward")
    p.add_argument("--no-remat-on-oom", dest="remat_on_oom", action="store_false",
                   help="report a point that runs out of memory instead of running it again "
                   "with remat")
    p.add_argument("--model-overrides", default=None,
                   help="fields of the preset for both models, e.g. num_hidden_layers=12")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default="crossover.png", help="PNG path")
    p.add_argument("--json", default=None, help="write the results to this file")
    a = p.parse_args(argv)
    if a.attention == "xla":
        a.attention = None
    elif a.attention not in ("auto", "cudnn"):
        p.error(f"--attention must be auto, xla or cudnn, got {a.attention!r}")
    for flag in ("tokens_per_step", "steps"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    if a.warmup < 0:
        p.error(f"--warmup must be >= 0, got {a.warmup}")
    for flag in ("seq_lens", "long_seq_lens", "long_batches"):
        if min(getattr(a, flag)) < 1:
            p.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(a, flag)}")
    if min(a.seq_lens + a.long_seq_lens) < 2:
        p.error("sequence lengths must be >= 2")
    return a


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    t_start = time.perf_counter()
    qcfg, lcfg = model_configs(a)
    fns = {name: make_fns(name, qcfg, lcfg) for name in a.models}
    if a.long and "qdelta" not in fns:
        fns["qdelta"] = make_fns("qdelta", qcfg, lcfg)
    device = jax.devices()[0].device_kind
    sizes = ", ".join(f"{name} {loop.count_params(f.abstract_params) / 1e6:.1f}M params"
                      for name, f in fns.items())
    print(f"{a.preset}: {sizes}; llama: {lcfg.num_heads} heads of {lcfg.head_dim}, attention "
          f"{lcfg.attention or 'xla'}; {a.dtype} compute, float32 params, on {device} "
          f"(jax {jax.__version__})", flush=True)
    crossover = {(name, T, max(1, a.tokens_per_step // T)) for T in a.seq_lens
                 for name in a.models}
    remat_fns = None
    rows = []
    for name, T, B in plan(a):
        rec = run_point(name, fns[name], qcfg.vocab_size, T, B, a)
        rec["remat"] = a.remat
        if rec["status"] != "ok" and not a.remat and a.remat_on_oom:
            # Remat only where memory needs it: the point again with every block recomputed in
            # the backward (only the blocks' inputs kept).
            print(f"  {name} T={T} B={B}: out of memory; again with remat", flush=True)
            if remat_fns is None:
                rq, rl = model_configs(argparse.Namespace(**{**vars(a), "remat": True}))
                remat_fns = {n: make_fns(n, rq, rl) for n in fns}
            rec = run_point(name, remat_fns[name], qcfg.vocab_size, T, B, a)
            rec["remat"] = True
        rec["crossover"] = (name, T, B) in crossover
        rows.append(rec)
        done = (f"{rec['tokens_per_s']:,.0f} tokens/s" if rec["status"] == "ok"
                else rec["status"]) + (" (remat)" if rec["remat"] else "")
        print(f"  {name} T={T} B={B}: {done}", flush=True)
    print()
    print(format_table(rows))
    title = f"{a.preset}, {a.tokens_per_step} tokens/step, {a.dtype}, {device}"
    if a.out:
        if plot(rows, a.out, title):
            print(f"plot: {a.out}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"device": device, "jax": jax.__version__,
                                            "preset": a.preset, "dtype": a.dtype,
                                            "tokens_per_step": a.tokens_per_step,
                                            "wall_s": time.perf_counter() - t_start,
                                            "rows": rows}, indent=2) + "\n")
    print(f"wall {time.perf_counter() - t_start:.1f} s")
    return rows


if __name__ == "__main__":
    main()
