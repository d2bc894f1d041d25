"""The in-run speed anchors for benchmarks/ops.py, in PyTorch, in a process of their own.

    python benchmarks/anchors.py --shapes 8x4096x6x128x256 --json /tmp/anchors.json

For every shape BxTxHxKxV (bf16, fresh random inputs, q and k L2-normalised in the kernel):

* ``authors``: the Q-Delta authors' ``chunk_qdelta_rule`` (Triton, from their public repository),
  forward and forward+backward. Their code is not part of this project: fetch the repository
  yourself and point ``--authors`` (or ``QDELTA_AUTHORS``) at its folder that holds ``qdelta/``.
  It autotunes per new shape, which takes minutes on a fresh machine.
* ``fla``: fla's ``chunk_gated_delta_rule`` forward (the same pipeline at lam = 0; its backward
  refuses to run on Hopper with Triton 3.4 to 3.7.0). Needs the flash-linear-attention wheel.
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` causal with head dim K (flash
  attention), forward and forward+backward.

Each is timed two ways after warm-up: "pipelined" (``--reps`` calls back to back, one
synchronisation, the median of 5 rounds: ``qdelta_jax.testing.time_fn``, the loop that times our
side) and ``triton.testing.do_bench`` (median). An anchor that cannot run says why in its row.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import types

# Only the shape syntax and the timing loop; importing JAX claims no GPU memory (JAX takes it
# when its first computation runs).
from qdelta_jax.testing import parse_shape, time_fn


def load_authors(root: str):
    """``chunk_qdelta_rule`` from the authors' ``qdelta/qdelta_rule`` package, without running
    ``qdelta/__init__.py`` (it registers Hugging Face model classes, which the op does not need)."""
    pkg = os.path.join(root, "qdelta")
    if not os.path.isdir(os.path.join(pkg, "qdelta_rule")):
        raise FileNotFoundError(f"no qdelta/qdelta_rule under {root!r}")
    stub = types.ModuleType("qdelta")
    stub.__path__ = [pkg]
    sys.modules.setdefault("qdelta", stub)
    return importlib.import_module("qdelta.qdelta_rule").chunk_qdelta_rule


def timings(fn, warmup: int, reps: int) -> dict:
    """``fn``'s pipelined time per call in milliseconds, measured by the loop that times our side
    (``qdelta_jax.testing.time_fn``, synchronising CUDA instead of JAX arrays), and triton's
    ``do_bench`` median."""
    import torch
    from triton.testing import do_bench

    def sync(_):
        torch.cuda.synchronize()

    return {"pipe": time_fn(fn, (), warmup, reps, pipelined=True, sync=sync),
            "do_bench": float(do_bench(fn, warmup=25, rep=100, return_mode="median"))}


def inputs(shape, requires_grad: bool):
    import torch

    B, T, H, K, V = shape
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)

    def rand(*s, dtype=torch.bfloat16):
        return torch.randn(*s, device=dev, dtype=torch.float32, generator=gen).to(dtype)

    q, k, v = rand(B, T, H, K), rand(B, T, H, K), rand(B, T, H, V)
    g = -torch.nn.functional.softplus(rand(B, T, H, dtype=torch.float32) - 1) * 0.5
    beta = torch.sigmoid(rand(B, T, H, dtype=torch.float32)).bfloat16()
    lam = torch.sigmoid(rand(B, T, H, dtype=torch.float32) - 0.9).bfloat16()
    do = rand(B, T, H, V)
    xs = [q, k, v, g, beta, lam]
    if requires_grad:
        for x in xs:
            x.requires_grad_(True)
    return xs, do


def bench_authors(shape, root, warmup, reps) -> dict:
    op = load_authors(root)
    (q, k, v, g, beta, lam), do = inputs(shape, True)

    def fwd():
        return op(q, k, v, g, beta, lam, use_qk_l2norm_in_kernel=True)[0]

    def fwd_bwd():
        o = op(q, k, v, g, beta, lam, use_qk_l2norm_in_kernel=True)[0]
        o.backward(do)

    import torch

    with torch.no_grad():
        out = {"fwd": timings(fwd, warmup, reps)}
    out["fwd_bwd"] = timings(fwd_bwd, warmup, reps)
    return out


def bench_fla(shape, warmup, reps) -> dict:
    import torch
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    (q, k, v, g, beta, _), _ = inputs(shape, False)

    def fwd():
        return chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)

    with torch.no_grad():
        return {"fwd": timings(fwd, warmup, reps)}


def bench_sdpa(shape, warmup, reps) -> dict:
    import torch
    import torch.nn.functional as F

    B, T, H, K, _ = shape
    (q, k, _, _, _, _), _ = inputs((B, T, H, K, K), False)
    q, k = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
    v = torch.randn_like(q)
    for x in (q, k, v):
        x.requires_grad_(True)
    do = torch.randn_like(q)

    def fwd():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwd_bwd():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)

    with torch.no_grad():
        out = {"fwd": timings(fwd, warmup, reps)}
    out["fwd_bwd"] = timings(fwd_bwd, warmup, reps)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", nargs="+", required=True, help="BxTxHxKxV")
    p.add_argument("--authors", default=os.environ.get("QDELTA_AUTHORS", ".anchors"),
                   help="folder holding the authors' qdelta/ package (default .anchors)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--only", nargs="+", default=["authors", "fla", "sdpa"],
                   choices=["authors", "fla", "sdpa"])
    p.add_argument("--json", required=True, help="write the numbers here")
    a = p.parse_args(argv)
    import torch

    try:
        shapes = [parse_shape(s) for s in a.shapes]
    except ValueError as e:
        p.error(f"--shapes: {e}")
    rows = []
    for shape in shapes:
        for name in a.only:
            row = {"anchor": name, "shape": shape}
            try:
                if name == "authors":
                    row.update(bench_authors(shape, a.authors, a.warmup, a.reps))
                elif name == "fla":
                    row.update(bench_fla(shape, a.warmup, a.reps))
                else:
                    row.update(bench_sdpa(shape, a.warmup, a.reps))
            except Exception as e:  # noqa: BLE001 - report, go on with the other anchors
                first = (str(e).splitlines() or [""])[0][:300]
                row["error"] = f"{type(e).__name__}: {first}"
            torch.cuda.empty_cache()
            rows.append(row)
            print(f"# anchor {name} {shape}: {row}", file=sys.stderr, flush=True)
    with open(a.json, "w") as fh:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
