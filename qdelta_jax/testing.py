"""What the tests, ``qdelta-check`` and the benchmarks share: random op inputs in the ranges the
layer produces, packed-document offsets, the ``BxTxHxKxV`` shape syntax, relative errors with
their dtype tolerances, and one timing loop.

Not imported by the package itself.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------- inputs


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
    g_rate: tuple[float, float] | None = None,
    lam_zero: bool = False,
    lam_shift: float = 0.9,
    unit_qk: bool = False,
    key_shift: float = 0.0,
    h0_scale: float = 0.5,
):
    """Fresh random ``(q, k, v, g, beta, lam, h0)`` as the layer would feed the op.

    q, k, v are standard normal in ``dtype``; g, beta, lam and ``h0`` are float32.

    - ``g``: log decays ``-g_scale * softplus(n - 1) / 2`` (``g_scale = 0`` gives no decay, 40
      gives decays far below ``exp`` underflow over a chunk); with ``g_rate = (lo, hi)`` instead
      ``-exp(u_h) * softplus(n - 3)`` with one ``u_h ~ U(lo, hi)`` per head, the spread of
      rates the layer's ``A_log`` initialisation gives (some heads barely decay, others fast).
    - ``beta = sigmoid(n)``; ``lam = sigmoid(n - lam_shift)``, or zeros with ``lam_zero``.
    - ``unit_qk``: q and k L2-normalised over K before the cast (what the op computes with);
      ``key_shift`` is added to k's draw first, so that keys are correlated as after a SiLU.
    - ``h0``: ``h0_scale`` times standard normal, ``[N, H, K, V]``, ``N = B`` unless given.
    """
    ks = jax.random.split(key, 7)
    N = B if N is None else N
    q = jax.random.normal(ks[0], (B, T, H, K), jnp.float32)
    k = jax.random.normal(ks[1], (B, T, H, K), jnp.float32) + key_shift
    if unit_qk:
        q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
        k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    q, k = q.astype(dtype), k.astype(dtype)
    v = jax.random.normal(ks[2], (B, T, H, V), jnp.float32).astype(dtype)
    n = jax.random.normal(ks[3], (B, T, H))
    if g_rate is None:
        g = -g_scale * jax.nn.softplus(n - 1.0) * 0.5
    else:
        rate_key = jax.random.fold_in(key, 7)  # the other draws stay those of g_rate=None
        rate = jnp.exp(jax.random.uniform(rate_key, (H,), jnp.float32, *g_rate))
        g = -rate * jax.nn.softplus(n - 3.0)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
    lam = jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, H)) - lam_shift)
    if lam_zero:
        lam = jnp.zeros_like(lam)
    h0 = h0_scale * jax.random.normal(ks[6], (N, H, K, V), jnp.float32)
    return q, k, v, g, beta, lam, h0


def random_offsets(B: int, T: int, S: int, seed: int = 0, *,
                   aligned_to: int | None = None) -> np.ndarray:
    """``[B, S + 1]`` int32 per-row ``cu_seqlens`` of S documents of random lengths in every row
    of T tokens (short ones included; none empty unless S > T, then rows repeat T).

    ``aligned_to``: one boundary of every row falls on a multiple of it (a document that starts
    exactly at a chunk), the others anywhere (mostly inside a chunk)."""
    if S < 1 or T < 1:
        raise ValueError(f"random_offsets needs S >= 1 documents and T >= 1 tokens, got S={S}, "
                         f"T={T}")
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(B):
        n_cuts = min(S - 1, T - 1)
        if aligned_to is not None and T > aligned_to and n_cuts > 0:
            edge = int(rng.integers(1, -(-T // aligned_to))) * aligned_to
            rest = np.setdiff1d(np.arange(1, T), [edge])
            cuts = np.sort(np.append(rng.choice(rest, size=n_cuts - 1, replace=False), edge))
        else:
            cuts = np.sort(rng.choice(np.arange(1, T), size=n_cuts, replace=False))
        rows.append(np.concatenate([[0], cuts, [T] * (S - len(cuts))]))
    return np.stack(rows).astype(np.int32)


def parse_shape(text: str) -> tuple[int, int, int, int, int]:
    """``"BxTxHxKxV"`` (e.g. ``"8x4096x6x128x256"``) as five positive ints; raises ValueError
    naming what was given otherwise."""
    parts = str(text).strip().lower().split("x")
    if len(parts) != 5 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"shape must be BxTxHxKxV with five positive integers, got {text!r}")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- errors


def rel_err(a, b, *, ord: float = 2) -> float:
    """``|a - b| / |b|`` in float64, ``b`` the reference; ``ord=2`` the Euclidean norm of all
    entries, ``ord=np.inf`` the largest entry. Where ``b`` is all zeros, ``|a - b|``.

    The NaN rule: ``inf`` when either side holds a NaN or an infinity, never NaN. A comparison
    that met a non-finite value cannot vouch for closeness, so it must fail every tolerance;
    and a NaN result would not: ``nan < tol`` is False but ``max([1e-7, nan])`` is ``1e-7``, so
    a NaN error disappears from a maximum, a sort or a table. A test that expects non-finite
    values at given places asserts those places and compares the rest.

    Raises ValueError when the shapes differ (a broadcast would compare the wrong entries).
    """
    a = np.asarray(a).astype(np.float64)
    b = np.asarray(b).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_err compares arrays of one shape, got {a.shape} and {b.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("inf")
    denom = np.linalg.norm(b.ravel(), ord)
    return float(np.linalg.norm((a - b).ravel(), ord) / (denom if denom > 0 else 1.0))


def tolerance(dtype, length: int = 64) -> float:
    """Relative tolerance of a chunked result against the float32 reference, from the dtype.

    Float32 results differ by accumulation order only: 32 units of rounding, grown with the square
    root of the reduction length (3.8e-6 at 64). With bfloat16 matmul inputs the output itself is
    rounded to bfloat16 (eps / 2 relative) and every operand once: 2 units (1.6e-2 at 64).
    """
    eps = float(jnp.finfo(dtype).eps)
    factor = 32.0 if jnp.dtype(dtype) == jnp.float32 else 2.0
    return factor * eps * float(np.sqrt(max(length, 64) / 64))


# ----------------------------------------------------------------------------- timing


def time_fn(fn: Callable, args: Sequence = (), warmup: int = 5, reps: int = 30, *,
            pipelined: bool = False, rounds: int = 5,
            sync: Callable = jax.block_until_ready) -> float:
    """Median wall time of ``fn(*args)`` in milliseconds after ``warmup`` calls.

    Default: ``reps`` calls, each synchronised (device time plus the host's dispatch and
    synchronisation, as a caller that waits for every result sees it). ``pipelined``:
    ``rounds`` rounds of ``reps`` calls issued back to back with one synchronisation at the end
    of each round, the median of the rounds' time per call (device throughput, as in a
    training loop, where JAX dispatches the next step while the device runs this one).

    ``sync(outputs)`` waits for the device: ``jax.block_until_ready`` by default; pass e.g.
    ``lambda _: torch.cuda.synchronize()`` to time another framework the same way.
    """
    if warmup < 0 or reps < 1 or rounds < 1:
        raise ValueError(f"time_fn needs warmup >= 0, reps >= 1 and rounds >= 1, got "
                         f"warmup={warmup}, reps={reps}, rounds={rounds}")
    for _ in range(warmup):
        sync(fn(*args))
    times = []
    if pipelined:
        for _ in range(rounds):
            t0 = time.perf_counter()
            outs = [fn(*args) for _ in range(reps)]
            sync(outs)
            times.append((time.perf_counter() - t0) * 1e3 / reps)
            del outs
        return statistics.median(times)
    for _ in range(reps):
        t0 = time.perf_counter()
        sync(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
