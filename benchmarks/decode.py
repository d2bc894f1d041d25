"""Decode throughput of the Q-Delta LM against the HBM roofline: fused Pallas step vs plain jnp.

One decoding step per token reads every parameter once (the whole batch shares the read) and
reads and writes every layer's recurrent state ``[HV, K, V]`` float32 (plus the tiny short-conv
caches) for every sequence. Nothing else of size grows with the batch, so::

    bytes per step = params (except the embedding table, of which B rows are gathered)
                     + B * layers * (2 * HV * K * V * 4 + 2 * conv cache)
    roofline tokens/s = B / (bytes per step / HBM bandwidth)

Two step implementations, same parameters: ``fused`` (``implementation="pallas"``: the one-token
kernel of ``qdelta_jax.pallas.decode``) and ``jnp`` (``implementation="xla"``: the layer's conv,
gates and ``reference.qdelta_step`` in plain XLA). Timing: ``--steps`` tokens inside one jitted
``lax.scan`` (greedy next token fed back; device time, no dispatch), median over ``--reps`` after
a warm-up; ``--call`` adds one jitted step per token driven from Python (what a serving loop
without a device-side loop pays, dispatch included).

Where the batch-1 time goes (``--breakdown``, on by default; fused step): the whole step; the
step with the recurrent kernel replaced by a pass-through that still consumes every projection
(so the difference is the kernel: conv, norms, gates, state read-modify-write); and the step with
no blocks at all (embedding, final norm, LM head). The table gives each part's share.

Usage::

    python benchmarks/decode.py                        # 340m, bf16, batch 1 16 64 256
    python benchmarks/decode.py --preset tiny --batch-sizes 1,4 --steps 4 --reps 1  # CPU check

HBM bandwidth: ``--hbm-gbps``; by default 4800 on an H200 and 3350 on an H100 (from the device
name); no roofline elsewhere unless given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qdelta_jax.model import QDeltaConfig, QDeltaLM, compiled_step, count_params  # noqa: E402
from qdelta_jax.pallas import decode as pallas_decode  # noqa: E402
from qdelta_jax.testing import time_fn  # noqa: E402

IMPLS = {"fused": "pallas", "jnp": "xla"}


def default_bandwidth_gbps(device) -> float | None:
    kind = getattr(device, "device_kind", "") or ""
    if "H200" in kind:
        return 4800.0
    if "H100" in kind:
        return 3350.0
    return None


def step_bytes(cfg: QDeltaConfig, batch: int) -> dict[str, float]:
    """Bytes moved by one decoding step (see the module docstring)."""
    pbytes = jnp.dtype(cfg.param_dtype).itemsize
    cbytes = jnp.dtype(cfg.compute_dtype).itemsize
    D, V = cfg.hidden_size, cfg.head_v_dim
    table = cfg.vocab_size * D
    # The embedding table is gathered (B rows), unless it is also the (tied) output matrix.
    streamed = count_params(cfg) - (0 if cfg.tie_word_embeddings else table)
    params = streamed * pbytes + batch * D * pbytes
    state = cfg.num_hidden_layers * cfg.v_heads * cfg.head_dim * V * 4 * 2 * batch
    conv = 0
    if cfg.use_short_conv:
        channels = 2 * cfg.num_heads * cfg.head_dim + cfg.v_heads * V
        conv = cfg.num_hidden_layers * (cfg.conv_size - 1) * channels * cbytes * 2 * batch
    return {"params": params, "state": state, "conv": conv,
            "total": params + state + conv}


def build(cfg: QDeltaConfig, seed: int):
    @nnx.jit
    def make():
        return QDeltaLM(cfg, rngs=nnx.Rngs(seed))

    return nnx.split(make())


def time_scan(graphdef, params, batch: int, steps: int, reps: int, no_blocks: bool = False):
    """Seconds per token of ``steps`` greedy steps inside one jitted ``lax.scan``."""

    def one(params, tok, cache):
        model = nnx.merge(graphdef, params)
        if no_blocks:  # embedding, final norm and LM head only
            logits = model._logits(model.embed(tok[:, None]))
        else:
            logits, cache = model.step(tok[:, None], cache)
        return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache

    def run_steps(params, tok, cache):
        def body(carry, _):
            return one(params, *carry), None

        return jax.lax.scan(body, (tok, cache), None, length=steps)[0]

    run = jax.jit(run_steps, donate_argnums=(2,))
    model = nnx.merge(graphdef, params)
    state = {"tok": jnp.zeros((batch,), jnp.int32), "cache": model.init_cache(batch)}

    def go():
        state["tok"], state["cache"] = run(params, state["tok"], state["cache"])
        return state["tok"]

    jax.block_until_ready(go())  # compiles
    return time_fn(go, warmup=0, reps=reps) / 1e3 / steps


def time_call(graphdef, params, batch: int, steps: int, reps: int, warmup: int) -> float:
    """Seconds per token of one compiled step per token driven from Python."""
    model = nnx.merge(graphdef, params)
    step = compiled_step(model)
    state = {"tok": jnp.zeros((batch, 1), jnp.int32), "cache": model.init_cache(batch)}
    pick = jax.jit(lambda logits: jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32))

    def go(n=steps):
        for _ in range(n):
            logits, state["cache"] = step(state["tok"], state["cache"])
            state["tok"] = pick(logits)
        return state["tok"]

    jax.block_until_ready(go(warmup))
    return time_fn(go, warmup=0, reps=reps) / 1e3 / steps


def _pass_through(q, k, v, b, lam, a, state, conv_cache, weights, mask, *, num_heads, scale,
                  gates, config=None, interpret=None):
    """Stands in for the fused kernel: keeps the state and conv caches, returns ``v`` plus a zero
    multiple of every other input (so no projection is dead code)."""
    B, HV, K, V = state.shape
    extra = q.sum(-1) + k.sum(-1) + b.sum(-1)
    extra = extra + (0 if lam is None else lam.sum(-1)) + (0 if a is None else a.sum(-1))
    o = v.reshape(B, HV, V) + (0 * extra).astype(v.dtype)[:, None, None]
    return o, state, conv_cache


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="340m")
    p.add_argument("--batch-sizes", default="1,16,64,256")
    p.add_argument("--impls", default="fused,jnp", help="comma-separated: fused, jnp")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="compute dtype")
    p.add_argument("--param-dtype", default=None, choices=["bfloat16", "float32"],
                   help="parameter dtype (default: the compute dtype, as for inference)")
    p.add_argument("--steps", type=int, default=32, help="tokens per timed repetition")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=4, help="warm-up steps of --call")
    p.add_argument("--call", action="store_true", help="also time Python-driven steps")
    p.add_argument("--no-breakdown", action="store_true", help="skip the batch-1 breakdown")
    p.add_argument("--block-v", type=int, default=None, help="V tile of the fused kernel")
    p.add_argument("--num-warps", type=int, default=None, help="warps of the fused kernel")
    p.add_argument("--hbm-gbps", type=float, default=None,
                   help="HBM bandwidth in GB/s (default: 4800 H200, 3350 H100, else none)")
    p.add_argument("--scan-layers", action="store_true",
                   help="stack the blocks and run them in lax.scan (much faster to compile)")
    p.add_argument("--xla-flags", default=None,
                   help="appended to XLA_FLAGS before the backend starts, e.g. "
                   "'--xla_gpu_enable_command_buffer=' to run without command buffers (CUDA "
                   "graphs) for comparison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    if args.xla_flags:  # read when the backend initialises, which jax.devices() below does
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()

    impls = [x for x in args.impls.split(",") if x]
    bad = sorted(set(impls) - set(IMPLS))
    if bad:
        p.error(f"--impls: unknown {bad}; choose from {sorted(IMPLS)}")
    base = QDeltaConfig.from_preset(
        args.preset, compute_dtype=args.dtype, param_dtype=args.param_dtype or args.dtype,
        scan_layers=args.scan_layers,
    )
    if args.block_v or args.num_warps:
        cfg_kernel = pallas_decode.DecodeConfig(args.block_v, args.num_warps)
        fused = pallas_decode.fused_step
        pallas_decode.fused_step = lambda *a, **kw: fused(*a, **{**kw, "config": cfg_kernel})
    batches = [int(b) for b in args.batch_sizes.split(",") if b]
    dev = jax.devices()[0]
    bw = args.hbm_gbps if args.hbm_gbps is not None else default_bandwidth_gbps(dev)
    print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"preset {args.preset}: {count_params(base) / 1e6:.1f}M params, compute "
          f"{base.compute_dtype}, params {base.param_dtype}, {base.num_hidden_layers} layers"
          f"{' (scanned)' if base.scan_layers else ''}, state per sequence "
          f"{step_bytes(base, 1)['state'] / 2 / 2**20:.2f} MiB (fp32)")
    print(f"HBM bandwidth for the roofline: {f'{bw:.0f} GB/s' if bw else 'n/a (pass --hbm-gbps)'}")

    models = {name: build(dataclasses.replace(base, implementation=IMPLS[name]), args.seed)
              for name in impls}
    rows = []
    cols = ["impl", "batch", "ms/token step", "tok/s", "MB/step", "roofline tok/s",
            "% of roofline"] + (["call ms/step", "call tok/s"] if args.call else [])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for b in batches:
        nbytes = step_bytes(base, b)
        roof = b / (nbytes["total"] / (bw * 1e9)) if bw else None
        for name in impls:
            graphdef, params = models[name]
            t = time_scan(graphdef, params, b, args.steps, args.reps)
            row = dict(impl=name, batch=b, ms=t * 1e3, tok_s=b / t,
                       mbytes_per_step=nbytes["total"] / 1e6, bytes=nbytes, roofline_tok_s=roof,
                       frac_of_roofline=(b / t) / roof if roof else None)
            cells = [name, str(b), f"{t * 1e3:.3f}", f"{b / t:,.0f}",
                     f"{nbytes['total'] / 1e6:.1f}", f"{roof:,.0f}" if roof else "n/a",
                     f"{100 * row['frac_of_roofline']:.1f}%" if roof else "n/a"]
            if args.call:
                tc = time_call(graphdef, params, b, args.steps, args.reps, args.warmup)
                row.update(call_ms=tc * 1e3, call_tok_s=b / tc)
                cells += [f"{tc * 1e3:.3f}", f"{b / tc:,.0f}"]
            rows.append(row)
            print("| " + " | ".join(cells) + " |", flush=True)

    breakdown = None
    if not args.no_breakdown and "fused" in models:
        graphdef, params = models["fused"]
        done = [r["ms"] / 1e3 for r in rows if r["impl"] == "fused" and r["batch"] == 1]
        t_full = done[0] if done else time_scan(graphdef, params, 1, args.steps, args.reps)
        fused = pallas_decode.fused_step
        pallas_decode.fused_step = _pass_through  # read by the layer at trace time
        try:
            t_nokernel = time_scan(graphdef, params, 1, args.steps, args.reps)
        finally:
            pallas_decode.fused_step = fused
        t_head = time_scan(graphdef, params, 1, args.steps, args.reps, no_blocks=True)
        parts = {"fused recurrent kernels (all layers)": t_full - t_nokernel,
                 "blocks without the kernel (projections, MLP, norms)": t_nokernel - t_head,
                 "embedding, final norm, LM head": t_head}
        nb = step_bytes(base, 1)
        head_bytes = (base.hidden_size * base.vocab_size
                      * jnp.dtype(base.param_dtype).itemsize)
        print(f"\nwhere the batch-1 step goes (fused; whole step {t_full * 1e3:.3f} ms, roofline "
              f"{nb['total'] / (bw * 1e9) * 1e3:.3f} ms):" if bw else
              f"\nwhere the batch-1 step goes (fused; whole step {t_full * 1e3:.3f} ms):")
        print("| part | ms | share |")
        print("|---|---|---|")
        for k, v in parts.items():
            print(f"| {k} | {v * 1e3:.3f} | {100 * v / t_full:.1f}% |")
        if bw:
            print(f"(roofline of the LM head alone: {head_bytes / (bw * 1e9) * 1e3:.3f} ms; of the "
                  f"states: {(nb['state'] + nb['conv']) / (bw * 1e9) * 1e3:.4f} ms)")
        breakdown = dict(full_ms=t_full * 1e3, no_kernel_ms=t_nokernel * 1e3,
                         head_only_ms=t_head * 1e3,
                         parts_ms={k: v * 1e3 for k, v in parts.items()})
    if args.json:
        Path(args.json).write_text(json.dumps(
            dict(device=dev.device_kind, preset=args.preset, config=base.to_dict(),
                 hbm_gbps=bw, xla_flags=os.environ.get("XLA_FLAGS", ""), rows=rows,
                 breakdown_batch1=breakdown), indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
