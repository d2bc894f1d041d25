"""One training step of the authors' PyTorch Q-Delta language model, timed on the GPU: the model a
user would train instead of ours, at our preset's sizes, in a process of its own.

    python benchmarks/authors_step.py --authors .anchors --preset 340m --batch 4 --seq-len 4096
    python benchmarks/authors_step.py --preset 340m --print-config      # the config only (CPU)

The model is the authors' ``QDeltaForCausalLM`` (their public repository on fla, not part of this
project: fetch it yourself and point ``--authors`` or ``QDELTA_AUTHORS`` at the folder that holds
``qdelta/``), built from ``qdelta_jax.hf.config_to_hf`` of the preset (the config a checkpoint
converted from ours would carry) and initialised by their code. The step is what their training
loop runs, with our trainer's optimizer settings: float32 parameters under bf16 autocast, the
loss their model computes from ``labels`` (fla's fused cross-entropy), ``backward``, gradients
clipped to global norm 1.0, ``torch.optim.AdamW(fused=True)`` (lr 3e-4, betas 0.9 / 0.95, eps
1e-15, weight decay 0.1 on every parameter), on random token ids in unpacked rows (the same ids
each step). ``--warmup`` steps (their Triton kernels autotune on the first ones: minutes on a
fresh machine), then ``--steps`` steps, each timed with CUDA events; the median is reported, with
tokens/s and the peak memory torch allocated. Prints one JSON object (also to ``--json``).

Run it before JAX starts on the same card (JAX takes most of the GPU's memory at its first
computation); ``benchmarks/gpu_all.sh authors`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def authors_config(preset: str, vocab_size: int | None = None) -> dict:
    """The authors' config dict for our ``preset`` (``qdelta_jax.hf.config_to_hf``), with
    ``vocab_size`` overridden if given. Needs no GPU and no torch."""
    from qdelta_jax import hf
    from qdelta_jax.model import QDeltaConfig

    overrides = {} if vocab_size is None else {"vocab_size": vocab_size}
    return hf.config_to_hf(QDeltaConfig.from_preset(preset, **overrides))


def load_model_class(root: str):
    """``QDeltaConfig, QDeltaForCausalLM`` from the authors' ``qdelta`` package under ``root``."""
    if not os.path.isdir(os.path.join(root, "qdelta")):
        raise FileNotFoundError(
            f"no qdelta/ under {root!r}: fetch the authors' repository (psmiz/Q-Delta) and pass "
            "--authors (or set QDELTA_AUTHORS) to the folder that holds qdelta/")
    sys.path.insert(0, os.path.abspath(root))
    import qdelta

    return qdelta.QDeltaConfig, qdelta.QDeltaForCausalLM


def run(cfg: dict, root: str, batch: int, seq_len: int, warmup: int, steps: int) -> dict:
    """Builds the authors' model from ``cfg`` on the GPU and times its training step."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("the authors' model needs a CUDA GPU (their kernels are Triton)")
    config_cls, model_cls = load_model_class(root)
    # No decoding cache in a training step; model_type is the config class's own.
    cfg = {k: v for k, v in cfg.items() if k != "model_type"} | {"use_cache": False}
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = model_cls(config_cls(**cfg)).cuda().train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-15,
                            weight_decay=0.1, fused=True)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq_len), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(1))

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def progress(line):  # stderr: stdout carries the one JSON result
        print(line, file=sys.stderr, flush=True)

    progress(f"authors' model: {n_params:,} parameters, built in {time.perf_counter() - t0:.1f}"
             f" s; {warmup} warm-up steps (their kernels autotune on the first)")
    for i in range(warmup):
        loss = step()
        torch.cuda.synchronize()
        progress(f"  warm-up step {i + 1}: loss {loss.item():.4f}, "
                 f"{time.perf_counter() - t0:.0f} s")
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    ms = statistics.median(times)
    return {"model": "authors (torch)", "params": n_params, "batch": batch, "seq_len": seq_len,
            "ms_per_step": ms, "tokens_per_s": batch * seq_len / ms * 1e3,
            "step_ms_all": times, "final_loss": float(loss.item()),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "torch": torch.__version__, "device": torch.cuda.get_device_name()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--authors", default=os.environ.get("QDELTA_AUTHORS", ".anchors"),
                   help="folder that holds the authors' qdelta/ package")
    p.add_argument("--preset", default="340m")
    p.add_argument("--vocab-size", type=int, default=None, help="override the preset's")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--print-config", action="store_true",
                   help="print the authors' config for the preset and stop")
    p.add_argument("--json", default=None, help="also write the result to this file")
    a = p.parse_args(argv)
    for flag in ("batch", "seq_len", "steps"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    if a.warmup < 0:
        p.error(f"--warmup must be >= 0, got {a.warmup}")
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    try:
        cfg = authors_config(a.preset, a.vocab_size)
    except ValueError as e:
        raise SystemExit(f"--preset {a.preset}: {e}") from None
    if a.print_config:
        print(json.dumps(cfg, indent=1))
        return cfg
    res = run(cfg, a.authors, a.batch, a.seq_len, a.warmup, a.steps)
    res["preset"] = a.preset
    print(json.dumps(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    # JAX serves only the config mapping here: it must not take the GPU from torch.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
