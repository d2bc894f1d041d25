"""Decode throughput of the Q-Delta LM, with the HBM roofline of one decoding step.

One decoding step per token reads every parameter once (the whole batch shares the read) and
reads and writes every layer's recurrent state ``[HV, K, V]`` float32 (plus the tiny short-conv
caches) for every sequence. Nothing else of size grows with the batch, so::

    bytes per step = params (except the embedding table, of which B rows are gathered)
                     + B * layers * (2 * HV * K * V * 4 + 2 * conv cache)
    roofline tokens/s = B / (bytes per step / HBM bandwidth)

Two timings per batch size, both jitted, greedy next token fed back, cache donated:
``call`` is one jitted step per token driven from Python (what a serving loop does: includes
dispatch), ``scan`` is ``--steps`` tokens inside one jitted ``lax.scan`` (device time only).
Median over ``--reps`` repetitions after a warm-up.

Usage::

    python benchmarks/decode.py                       # 340m, bf16, batch 1 16 64
    python benchmarks/decode.py --preset tiny --batch-sizes 1,4 --steps 8 --reps 2   # CPU check

HBM bandwidth: ``--hbm-gbps``; by default 4800 on an H200 and 3350 on an H100 (from the device
name); no roofline elsewhere unless given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qdelta_jax.model import QDeltaConfig, QDeltaLM, count_params  # noqa: E402


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


def bench_batch(cfg, graphdef, params, batch: int, steps: int, reps: int, warmup: int):
    def one(params, tok, cache):
        model = nnx.merge(graphdef, params)
        logits, cache = model.step(tok[:, None], cache)
        return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache

    step = jax.jit(one, donate_argnums=(2,))

    def run_steps(params, tok, cache):
        def body(carry, _):
            tok, cache = carry
            return one(params, tok, cache), None

        (tok, cache), _ = jax.lax.scan(body, (tok, cache), None, length=steps)
        return tok, cache

    run = jax.jit(run_steps, donate_argnums=(2,))

    init_cache = jax.jit(lambda: nnx.merge(graphdef, params).init_cache(batch))
    tok = jnp.zeros((batch,), jnp.int32)

    cache = init_cache()
    for _ in range(warmup):
        tok, cache = step(params, tok, cache)
    jax.block_until_ready(tok)
    call_times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(steps):
            tok, cache = step(params, tok, cache)
        jax.block_until_ready((tok, cache))
        call_times.append((time.perf_counter() - t0) / steps)

    cache = init_cache()
    tok, cache = run(params, tok, cache)  # compiles
    jax.block_until_ready(tok)
    scan_times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        tok, cache = run(params, tok, cache)
        jax.block_until_ready((tok, cache))
        scan_times.append((time.perf_counter() - t0) / steps)
    return statistics.median(call_times), statistics.median(scan_times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="340m")
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="compute dtype")
    p.add_argument("--param-dtype", default=None, choices=["bfloat16", "float32"],
                   help="parameter dtype (default: the compute dtype, as for inference)")
    p.add_argument("--implementation", default=None, help="qdelta_rule implementation")
    p.add_argument("--steps", type=int, default=64, help="tokens per timed repetition")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=8, help="warm-up steps (compilation included)")
    p.add_argument("--hbm-gbps", type=float, default=None,
                   help="HBM bandwidth in GB/s (default: 4800 H200, 3350 H100, else none)")
    p.add_argument("--scan-layers", action="store_true",
                   help="stack the blocks and run them in lax.scan (much faster to compile)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)

    cfg = QDeltaConfig.from_preset(
        args.preset, compute_dtype=args.dtype, param_dtype=args.param_dtype or args.dtype,
        implementation=args.implementation, scan_layers=args.scan_layers,
    )
    batches = [int(b) for b in args.batch_sizes.split(",") if b]
    dev = jax.devices()[0]
    bw = args.hbm_gbps if args.hbm_gbps is not None else default_bandwidth_gbps(dev)
    print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"preset {args.preset}: {count_params(cfg) / 1e6:.1f}M params, compute "
          f"{cfg.compute_dtype}, params {cfg.param_dtype}, {cfg.num_hidden_layers} layers"
          f"{' (scanned)' if cfg.scan_layers else ''}, "
          "state per sequence "
          f"{step_bytes(cfg, 1)['state'] / 2 / 2**20:.2f} MiB (fp32)")
    print(f"HBM bandwidth for the roofline: {f'{bw:.0f} GB/s' if bw else 'n/a (pass --hbm-gbps)'}")

    graphdef, params = build(cfg, args.seed)
    rows = []
    header = ("| batch | call ms/step | call tok/s | scan ms/step | scan tok/s | MB/step "
              "| roofline tok/s | scan % of roofline |")
    print(header)
    print("|" + "---|" * 8)
    for b in batches:
        t_call, t_scan = bench_batch(cfg, graphdef, params, b, args.steps, args.reps,
                                     args.warmup)
        nbytes = step_bytes(cfg, b)
        roof = b / (nbytes["total"] / (bw * 1e9)) if bw else None
        row = dict(batch=b, call_ms=t_call * 1e3, call_tok_s=b / t_call, scan_ms=t_scan * 1e3,
                   scan_tok_s=b / t_scan, mbytes_per_step=nbytes["total"] / 1e6,
                   bytes=nbytes, roofline_tok_s=roof,
                   frac_of_roofline=(b / t_scan) / roof if roof else None)
        rows.append(row)
        roof_s = f"{roof:,.0f}" if roof else "n/a"
        frac_s = f"{100 * row['frac_of_roofline']:.1f}%" if roof else "n/a"
        print(f"| {b} | {t_call * 1e3:.3f} | {b / t_call:,.0f} | {t_scan * 1e3:.3f} | "
              f"{b / t_scan:,.0f} | {nbytes['total'] / 1e6:.1f} | {roof_s} | {frac_s} |",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(
            dict(device=dev.device_kind, preset=args.preset, config=cfg.to_dict(),
                 hbm_gbps=bw, rows=rows), indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
