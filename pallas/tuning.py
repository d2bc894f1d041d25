"""Autotuning of the kernels' launch settings: times candidate settings on the GPU and records
the winner with :func:`qdelta_jax.pallas.config.remember`, where ``get_config`` (and so every
``qdelta_rule(..., implementation="pallas")`` traced afterwards without an explicit config)
finds it. Nothing autotunes unless :func:`autotune` is called.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qdelta_jax.pallas import core
from qdelta_jax.pallas.config import Config, StageConfig, default_config, padded_size, remember


def _candidates(stage: str, K: int, V: int) -> list[StageConfig]:
    pow2 = [b for b in (16, 32, 64, 128, 256) if b <= V]
    out = []
    if stage in ("state", "reverse"):
        for bv in [b for b in pow2 if 16 <= b <= 128]:
            for w in (4, 8):
                for st in (1, 2, 3):
                    out.append(StageConfig(num_warps=w, num_stages=st, block_v=bv))
    elif stage == "output":
        for bv in [b for b in pow2 if b >= 32]:
            for w in (4, 8):
                out.append(StageConfig(num_warps=w, num_stages=2, block_v=bv))
    elif stage == "dqkw":
        for bk in [b for b in (32, 64, 128) if b <= K]:
            for bv in [b for b in pow2 if 32 <= b <= 128]:
                for w in (4, 8):
                    out.append(StageConfig(num_warps=w, num_stages=2, block_v=bv, block_k=bk))
    elif stage == "grads_k":
        for w in (4, 8):
            out.append(StageConfig(num_warps=w, num_stages=1))
    elif stage in ("grads_v", "dd0"):
        for bv in [b for b in pow2 if 32 <= b <= 128]:
            for w in (4, 8):
                for st in (1, 2):
                    out.append(StageConfig(num_warps=w, num_stages=st, block_v=bv))
    elif stage == "wu":
        for bv in [b for b in pow2 if 64 <= b <= 256]:
            for w in (4, 8):
                out.append(StageConfig(num_warps=w, num_stages=1, block_v=bv,
                                       block_k=min(K, 128)))
    elif stage == "solve":
        for bk in [b for b in (32, 64, 128) if b <= K]:
            for w in (1, 2, 4):
                out.append(StageConfig(num_warps=w, num_stages=1, block_k=bk))
    else:
        for w in (2, 4, 8):
            out.append(StageConfig(num_warps=w, num_stages=1))
    return out


def _time(fn, args, reps: int) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def autotune(
    K: int,
    V: int,
    *,
    dtype=jnp.bfloat16,
    chunk_size: int = 64,
    batch: int = 8,
    seq_len: int = 4096,
    heads: int = 6,
    stages: Sequence[str] = ("state", "output", "reverse", "dqkw", "wu", "grads_v", "solve",
                             "grads_k", "dd0"),
    reps: int = 10,
    persist: bool = False,
    verbose: bool = False,
) -> Config:
    """Times candidate settings of each stage in turn (the others held at the best so far) on
    the forward + backward of the Pallas core at ``[batch, seq_len, heads, K / V]`` and caches
    the winner for ``(device, K, V, chunk_size, dtype)``; ``persist`` also writes it to
    ``CACHE_FILE``. ``K, V`` are the head sizes as passed to the op. Needs a GPU."""
    if jax.default_backend() != "gpu":
        raise RuntimeError("autotune times kernels on a GPU; the default backend is "
                           f"{jax.default_backend()!r}")
    Kp, Vp = padded_size(K), padded_size(V)
    C = chunk_size
    B, T, H = batch, seq_len, heads
    NC = -(-T // C)
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    q = jax.random.normal(keys[0], (B, NC * C, H, K), jnp.float32)
    k = jax.random.normal(keys[1], (B, NC * C, H, K), jnp.float32)
    q = (q / jnp.linalg.norm(q, axis=-1, keepdims=True)).astype(dtype)
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
    v = jax.random.normal(keys[2], (B, NC * C, H, V), dtype)
    g = -0.1 * jax.nn.softplus(jax.random.normal(keys[3], (B, NC * C, H)))
    beta = jax.nn.sigmoid(jax.random.normal(keys[4], (B, NC * C, H)))
    lam = jax.nn.sigmoid(jax.random.normal(keys[5], (B, NC * C, H)) - 0.9)
    h0 = jnp.zeros((B, H, K, V), jnp.float32)
    c = jnp.arange(NC)
    reset = jnp.broadcast_to(c == 0, (B, NC))
    is_last = jnp.broadcast_to(c == NC - 1, (B, NC))
    seq = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, NC))
    args = (q, k, v, g, beta, lam, h0)

    def make(cfg: Config):
        fn = core.make_core(K=K, V=V, dtype=dtype, chunk_size=C, config=cfg, interpret=False)

        def loss(q, k, v, g, beta, lam, h0):
            G = jnp.cumsum(g.reshape(B, NC, C, H), axis=2).reshape(g.shape)
            o, fin = fn(q, k, v, G, beta, lam, h0, None, reset, is_last, seq, K**-0.5)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(fin)

        return jax.jit(jax.grad(loss, argnums=tuple(range(7))))

    best = default_config(Kp, Vp, C, dtype)
    best_t = _time(make(best), args, reps)
    for stage in stages:
        for cand in _candidates(stage, Kp, Vp):
            cfg = dataclasses.replace(best, **{stage: cand})
            try:
                t = _time(make(cfg), args, reps)
            except Exception as e:  # noqa: BLE001 - a candidate that fails to compile loses
                if verbose:
                    print(f"{stage} {cand}: failed ({type(e).__name__})")
                continue
            if verbose:
                print(f"{stage} {cand}: {t * 1e3:.3f} ms")
            if t < best_t:
                best, best_t = cfg, t
    remember(K, V, C, dtype, best, persist=persist)
    return best
