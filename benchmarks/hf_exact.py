"""The authors' weights run exactly, on every implementation: a table of relative errors.

    python benchmarks/hf_exact.py [--implementations xla,pallas] [--fixtures DIR]

For each fixture of ``tests/fixtures/authors_hf/`` (tiny models made with the authors' code) it
loads the HF folder with :func:`qdelta_jax.hf.from_hf` and prints, for each implementation, the
relative error of the logits against ``logits_exact`` (a float64 loop of the recurrence on the
same weights) three ways: the full forward, prefill of half the tokens then one-token decoding
steps (on a GPU the fused decode kernel), and the full forward in bfloat16. ``q, k`` are
normalised as ``x / |x|`` here, as the loop behind ``logits_exact`` does (the fixture README
says why). The authors' shipped model's error is printed beside them. float32 matmuls run at
``HIGHEST`` precision (a GPU's default float32 matmul is TF32).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qdelta_jax import hf, reference
from qdelta_jax.model import QDeltaLM
from qdelta_jax.testing import rel_err

HERE = Path(__file__).resolve().parent


def with_implementation(model: QDeltaLM, implementation: str) -> QDeltaLM:
    cfg = dataclasses.replace(model.config, implementation=implementation)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: QDeltaLM(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(model))


def decoded(model: QDeltaLM, ids: np.ndarray) -> np.ndarray:
    """Logits of prefill over the first half, then one token at a time."""
    half = ids.shape[1] // 2
    cache = model.init_cache(ids.shape[0])
    out, cache = model.step(jnp.asarray(ids[:, :half]), cache)
    outs = [np.asarray(out)]
    step = nnx.jit(lambda m, t, c: m.step(t, c))
    for t in range(half, ids.shape[1]):
        out, cache = step(model, jnp.asarray(ids[:, t:t + 1]), cache)
        outs.append(np.asarray(out))
    return np.concatenate(outs, axis=1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--implementations", default="reference,xla,pallas")
    p.add_argument("--fixtures", default=str(HERE.parent / "tests" / "fixtures" / "authors_hf"))
    a = p.parse_args(argv)
    reference.l2_normalize = functools.partial(reference.l2_normalize, eps=0.0)
    forward = nnx.jit(lambda m, t: m(t))
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind})")
    print(f"{'fixture':<22} {'implementation':<15} {'forward':>10} {'decode':>10} "
          f"{'bf16 fwd':>10} {'authors':>10}")
    with jax.default_matmul_precision("highest"):
        for d in sorted(Path(a.fixtures).iterdir()):
            if not (d / "config.json").is_file():
                continue
            with np.load(d / "io.npz") as f:
                ids, exact, authors = f["input_ids"].astype(np.int32), f["logits_exact"], f[
                    "logits_authors"]
            base, base16 = hf.from_hf(d), hf.from_hf(d, dtype="bfloat16")
            for impl in a.implementations.split(","):
                m = with_implementation(base, impl)
                full = rel_err(forward(m, jnp.asarray(ids)), exact)
                dec = rel_err(decoded(m, ids), exact)
                b16 = rel_err(forward(with_implementation(base16, impl), jnp.asarray(ids)), exact)
                print(f"{d.name:<22} {impl:<15} {full:>10.2e} {dec:>10.2e} {b16:>10.2e} "
                      f"{rel_err(authors, exact):>10.2e}", flush=True)


if __name__ == "__main__":
    main()
