"""Forward+backward time of the layer's elementwise pieces: the hand-written backward passes of
``qdelta_jax.fused`` against the same formulas under plain autodiff, at the 340m preset's
shapes in a training step (batch 4 x 4096 tokens, bf16 activations, float32 weights).

    python benchmarks/elementwise.py                 # on the GPU
    python benchmarks/elementwise.py --batch 1 --seq-len 256 --reps 3   # CPU smoke run

Each piece is timed as one jitted ``grad`` of ``sum(f(x) * ct)`` (forward, backward and the
weight gradients), pipelined, median of 5 rounds; the table also gives the bytes the fused
version must move at least and the bandwidth that implies.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp

from qdelta_jax import fused
from qdelta_jax.testing import time_fn

F32 = jnp.float32


def cases(B, T, dtype, seed=0):
    """(name, fused fn, plain fn, args, argnums, minimum bytes moved)."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    n = B * T
    D, H, K, V, HV, W = 1024, 6, 128, 256, 6, 4
    x = jax.random.normal(ks[0], (B, T, D), F32).astype(dtype)
    o = jax.random.normal(ks[1], (B, T, HV, V), F32).astype(dtype)
    gate = jax.random.normal(ks[2], (B, T, HV, V), F32).astype(dtype)
    qk = jax.random.normal(ks[3], (B, T, H * K), F32).astype(dtype)
    v = jax.random.normal(ks[4], (B, T, HV * V), F32).astype(dtype)
    wq = 0.3 * jax.random.normal(ks[5], (W, H * K), F32)
    wv = 0.3 * jax.random.normal(ks[5], (W, HV * V), F32)
    sd, sv = jnp.ones((D,), F32), jnp.ones((V,), F32)
    b = jnp.dtype(dtype).itemsize
    # Minimum traffic: forward reads the inputs and writes the output; the backward reads the
    # inputs and the output's cotangent and writes the input cotangents.
    return [
        ("rms_norm [B,T,1024]", lambda x, s: fused.rms_norm(x, s, 1e-6),
         lambda x, s: fused.plain_rms_norm(x, s, 1e-6), (x, sd), (0, 1), 5 * n * D * b),
        ("gated_rms_norm [B,T,6,256]", lambda o, g, s: fused.gated_rms_norm(o, g, s, 1e-6),
         lambda o, g, s: fused.plain_gated_rms_norm(o, g, s, 1e-6), (o, gate, sv), (0, 1, 2),
         8 * n * HV * V * b),
        ("conv_silu + l2 (q or k) [B,T,768]", lambda a, w: fused.conv_silu(a, w, None, H),
         lambda a, w: fused.plain_conv_silu(a, w, None, H), (qk, wq), (0, 1), 5 * n * H * K * b),
        ("conv_silu (v) [B,T,1536]", lambda a, w: fused.conv_silu(a, w, None, None),
         lambda a, w: fused.plain_conv_silu(a, w, None, None), (v, wv), (0, 1),
         5 * n * HV * V * b),
    ]


def grad_fn(f, argnums, ct_like):
    ct = jnp.ones(ct_like.shape, F32).astype(ct_like.dtype)
    return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a).astype(F32) * ct.astype(F32)), argnums))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    dtype = jnp.dtype(a.dtype)
    print(f"# device: {jax.devices()[0].device_kind}, jax {jax.__version__}, B {a.batch} "
          f"T {a.seq_len} {dtype.name}", file=sys.stderr)
    rows = []
    print("| piece | plain autodiff ms | fused ms | speed-up | fused GB/s (minimum bytes) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, fast, plain, args, argnums, nbytes in cases(a.batch, a.seq_len, dtype):
        out = fast(*args)
        t_plain = time_fn(grad_fn(plain, argnums, out), args, a.warmup, a.reps, pipelined=True)
        t_fast = time_fn(grad_fn(fast, argnums, out), args, a.warmup, a.reps, pipelined=True)
        rows.append(dict(piece=name, plain_ms=t_plain, fused_ms=t_fast, min_bytes=nbytes))
        print(f"| {name} | {t_plain:.3f} | {t_fast:.3f} | {t_plain / t_fast:.2f}x | "
              f"{nbytes / t_fast / 1e6:.0f} |", flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
