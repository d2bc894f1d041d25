"""Helpers for tests and checks: random op inputs in the ranges the layer produces, and errors.

Not imported by the package itself; tests, ``qdelta-check`` and the benchmarks share them.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def random_inputs(
    key: jax.Array,
    B: int,
    T: int,
    H: int,
    K: int,
    V: int,
    *,
    dtype=jnp.float32,
    N: int | None = None,
    g_scale: float = 1.0,
    lam_zero: bool = False,
):
    """Fresh random ``(q, k, v, g, beta, lam, h0)`` as the layer would feed the op.

    ``g = -exp(A_log) * softplus(.)``-like log decays scaled by ``g_scale`` (0 gives no decay),
    ``beta = sigmoid(.)``, ``lam = sigmoid(. - 0.9)`` (or zeros), ``h0`` float32 ``[N, H, K, V]``
    with ``N = B`` unless given. q, k, v in ``dtype``; g, beta, lam float32.
    """
    ks = jax.random.split(key, 7)
    N = B if N is None else N
    q = jax.random.normal(ks[0], (B, T, H, K), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, H, K), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, H, V), jnp.float32).astype(dtype)
    g = -g_scale * jax.nn.softplus(jax.random.normal(ks[3], (B, T, H)) - 1.0) * 0.5
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
    lam = jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, H)) - 0.9)
    if lam_zero:
        lam = jnp.zeros_like(lam)
    h0 = 0.5 * jax.random.normal(ks[6], (N, H, K, V), jnp.float32)
    return q, k, v, g, beta, lam, h0


def random_offsets(B: int, T: int, S: int, seed: int = 0) -> np.ndarray:
    """``[B, S + 1]`` int32 per-row ``cu_seqlens`` of S documents of random lengths in every row
    of T tokens (short ones included; none empty unless S > T, then rows repeat T)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(B):
        cuts = np.sort(rng.choice(np.arange(1, T), size=min(S - 1, T - 1), replace=False))
        rows.append(np.concatenate([[0], cuts, [T] * (S - len(cuts))]))
    return np.stack(rows).astype(np.int32)


def rel_err(a, b) -> float:
    """``||a - b|| / ||b||`` in float64 (``b`` the reference); inf when either has a NaN."""
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("inf")
    denom = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (denom if denom > 0 else 1.0))


def tolerance(dtype, length: int = 64) -> float:
    """Relative tolerance of a chunked result against the float32 reference, from the dtype.

    Float32 results differ by accumulation order only: 32 units of rounding, grown with the square
    root of the reduction length (3.8e-6 at 64). With bfloat16 matmul inputs the output itself is
    rounded to bfloat16 (eps / 2 relative) and every operand once: 2 units (1.6e-2 at 64).
    """
    eps = float(jnp.finfo(dtype).eps)
    factor = 32.0 if jnp.dtype(dtype) == jnp.float32 else 2.0
    return factor * eps * float(np.sqrt(max(length, 64) / 64))


def time_fn(fn, args, warmup: int = 5, reps: int = 30, *, pipelined: bool = False) -> float:
    """Median wall time of ``fn(*args)`` in milliseconds after ``warmup`` calls.

    Default: ``reps`` calls, each synchronised with ``block_until_ready`` (device time plus
    the host's dispatch and synchronisation, as a caller that waits for every result sees it).
    ``pipelined``: 5 rounds of ``reps`` calls issued back to back with one synchronisation at
    the end of each round, the median of the rounds' time per call (device throughput, as in a
    training loop, where JAX dispatches the next step while the device runs this one)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    if pipelined:
        for _ in range(5):
            t0 = time.perf_counter()
            outs = [fn(*args) for _ in range(reps)]
            jax.block_until_ready(outs)
            times.append((time.perf_counter() - t0) * 1e3 / reps)
            del outs
        return statistics.median(times)
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
