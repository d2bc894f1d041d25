"""Block sizes and launch settings of the Q-Delta kernels, with an opt-in autotuner.

One :class:`StageConfig` per kernel; :class:`Config` bundles them. :func:`default_config` picks
settings from the (padded) head sizes. :func:`autotune` times candidate settings of the whole
forward + backward on the GPU, one stage at a time, and caches the winner in memory and,
optionally, in ``~/.cache/qdelta_jax/pallas_autotune.json``; :func:`get_config` reads those
caches before falling back to the defaults. Nothing here autotunes unless asked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

CACHE_FILE = Path(os.path.expanduser("~/.cache/qdelta_jax/pallas_autotune.json"))



def _env_save_residuals() -> bool:
    """``QDELTA_SAVE_RESIDUALS``: unset or 1/true/yes/on keeps the residuals (the default),
    0/false/no/off recomputes them in the backward."""
    raw = os.environ.get("QDELTA_SAVE_RESIDUALS", "").strip().lower()
    if raw in ("", "1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"QDELTA_SAVE_RESIDUALS must be 1/true/yes/on or 0/false/no/off, got {raw!r}")


# Process-wide switch for Config.save_residuals (see set_save_residuals).
_SAVE_RESIDUALS = _env_save_residuals()


def set_save_residuals(enabled: bool) -> bool:
    """Sets ``Config.save_residuals`` for every config :func:`get_config` returns, i.e. for
    every ``qdelta_rule(..., implementation="pallas")`` traced afterwards (functions already
    jitted keep what they were traced with). Returns the previous setting.

    On (the default): the forward keeps ``W, T, h_in, D`` for the backward (about 300 MB per
    call at B8 T4096 H6 K128 V256 bf16), and the backward skips recomputing them (at that
    shape on an H200, forward+backward 2.54 instead of 3.06 ms, device time). Off: less
    memory, slower. Also ``qdelta-train --recompute-residuals`` (off for one run) and
    ``QDELTA_SAVE_RESIDUALS=0`` (off at import)."""
    global _SAVE_RESIDUALS
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    prev, _SAVE_RESIDUALS = _SAVE_RESIDUALS, enabled
    return prev


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Launch settings of one kernel. ``block_v`` / ``block_k``: the V / K tile where the
    kernel tiles that dimension (0 = unused)."""

    num_warps: int = 4
    num_stages: int = 1
    block_v: int = 0
    block_k: int = 0


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings per stage: ``local`` (W and U from T, grid over chunks, K and V tiles),
    ``a`` (A and its inverse T, K slices of ``block_k``), ``state``
    (forward state pass, grid over V tiles), ``output`` (O, grid over V tiles), ``reverse``
    (reverse state pass, grid over V tiles), ``dqkw`` (the state-side gradients, grid over K
    tiles, loop over V tiles), ``grads`` (V side of the local gradients, loop over V tiles),
    ``grads_k`` (K side of the local
    gradients) and ``dd0`` (``scale P^T dO`` before the reverse pass, loop over V tiles).

    ``save_residuals`` (default on): the forward keeps ``W, T, h_in, D`` for the backward,
    which then skips its recompute (``chunk_solve``, ``chunk_wu``, ``state_pass``) at the cost
    of holding them until the backward runs (``2 K + 4 C + 2 K V / C + 2 V`` bytes a token and
    head in bfloat16: 300 MB at B8 T4096 H6 K128 V256). Off: nothing per chunk is kept, as in
    the XLA path."""

    local: StageConfig
    state: StageConfig
    output: StageConfig
    reverse: StageConfig
    dqkw: StageConfig
    grads: StageConfig
    a: StageConfig = StageConfig(num_warps=1, block_k=64)
    grads_k: StageConfig = StageConfig(num_warps=8)
    dd0: StageConfig = StageConfig(num_warps=4, block_v=64)
    save_residuals: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        return cls(**{k: StageConfig(**v) if isinstance(v, dict) else bool(v)
                      for k, v in d.items()})


def default_config(K: int, V: int, chunk_size: int = 64, dtype=None) -> Config:
    """Defaults for padded head sizes ``K, V`` (powers of two >= 16): the per-stage winners of
    the H200 sweep at B8 T4096 H6 K128 V256 bf16 (docs/KERNELS.md), each checked offline for
    sm_90 (registers and spills by ptxas). Settings that hold more registers per thread as K or
    V grow fall back to the previously validated ones outside the swept sizes. For 4-byte
    ``dtype`` (float32) the tiles that would need more than the 227 KB of shared memory of an
    H100 / H200 (Triton 3.6's count: output V tile 256, dqkw 128 x 128, the reverse pass
    pipelined; at K 256 also whole-K operands in output and grads_k) are the smaller ones."""
    bv_state = min(V, 64 if K <= 128 else 32)
    # State and reverse pass: [K, BV] float32 state per program; 4 warps while it is at most
    # 128 x 64 (64 registers a thread), else 8.
    w_state = 4 if K * bv_state <= 128 * 64 else 8
    # Output: one V tile of up to 256 (the [C, BV] float32 accumulator) where K <= 128.
    bv_out = min(V, 256 if K <= 128 else 128)
    cfg = Config(
        local=StageConfig(num_warps=4, num_stages=1, block_v=min(V, 64), block_k=min(K, 128)),
        state=StageConfig(num_warps=w_state, num_stages=2, block_v=bv_state),
        output=StageConfig(num_warps=4, num_stages=2, block_v=bv_out),
        reverse=StageConfig(num_warps=w_state, num_stages=2, block_v=bv_state),
        dqkw=StageConfig(num_warps=8, num_stages=2, block_v=min(V, 128), block_k=min(K, 128)),
        grads=StageConfig(num_warps=4, num_stages=1, block_v=min(V, 64)),
        a=StageConfig(num_warps=1, num_stages=1, block_k=min(K, 128)),
        grads_k=StageConfig(num_warps=8, num_stages=1),
        dd0=StageConfig(num_warps=4, num_stages=1, block_v=min(V, 128)),
    )
    if dtype is not None and jnp.dtype(dtype).itemsize >= 4:
        cfg = dataclasses.replace(
            cfg,
            output=dataclasses.replace(cfg.output, block_v=min(V, 128)),
            reverse=dataclasses.replace(cfg.reverse, num_stages=1),
            dqkw=dataclasses.replace(cfg.dqkw, block_v=min(V, 64), block_k=min(K, 64)),
        )
        if K > 128:  # K 256: K slices of 128 in output and grads_k, smaller state tiles
            cfg = dataclasses.replace(
                cfg,
                state=dataclasses.replace(cfg.state, num_stages=1),
                reverse=dataclasses.replace(cfg.reverse, block_v=min(V, 16)),
                output=dataclasses.replace(cfg.output, block_v=min(V, 64), block_k=128),
                grads_k=dataclasses.replace(cfg.grads_k, block_k=128),
            )
    return cfg


def padded_size(n: int) -> int:
    """The head size the kernels run at: the next power of two, at least 16."""
    return max(16, 1 << (int(n) - 1).bit_length())


_MEMORY: dict[str, Config] = {}


def _key(K: int, V: int, chunk_size: int, dtype) -> str:
    try:
        kind = jax.devices()[0].device_kind
    except Exception:  # noqa: BLE001 - no device: the key only needs to be stable
        kind = "unknown"
    return f"{kind}|K{K}|V{V}|C{chunk_size}|{jnp.dtype(dtype).name}"


def _read_file(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def get_config(K: int, V: int, chunk_size: int, dtype, *, use_file: bool = True) -> Config:
    """The autotuned config for head sizes ``K, V`` (as passed to the op) if one is cached
    (memory, then ``CACHE_FILE``), else :func:`default_config` of the padded sizes; with
    ``save_residuals`` as :func:`set_save_residuals` last said (default on)."""
    cfg = _lookup(K, V, chunk_size, dtype, use_file)
    if cfg.save_residuals != _SAVE_RESIDUALS:
        cfg = dataclasses.replace(cfg, save_residuals=_SAVE_RESIDUALS)
    return cfg


def _lookup(K: int, V: int, chunk_size: int, dtype, use_file: bool) -> Config:
    key = _key(K, V, chunk_size, dtype)
    if key in _MEMORY:
        return _MEMORY[key]
    if use_file and CACHE_FILE.exists():
        entry = _read_file(CACHE_FILE).get(key)
        if entry is not None:
            cfg = Config.from_dict(entry)
            _MEMORY[key] = cfg
            return cfg
    return default_config(padded_size(K), padded_size(V), chunk_size, dtype)


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
    elif stage in ("grads", "dd0"):
        for bv in [b for b in pow2 if 32 <= b <= 128]:
            for w in (4, 8):
                out.append(StageConfig(num_warps=w, num_stages=1, block_v=bv))
    elif stage == "local":
        for bv in [b for b in pow2 if 64 <= b <= 256]:
            for w in (4, 8):
                out.append(StageConfig(num_warps=w, num_stages=1, block_v=bv,
                                       block_k=min(K, 128)))
    elif stage == "a":
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
    stages: Sequence[str] = ("state", "output", "reverse", "dqkw", "local", "grads", "a",
                             "grads_k", "dd0"),
    reps: int = 10,
    persist: bool = False,
    verbose: bool = False,
) -> Config:
    """Times candidate settings of each stage in turn (the others held at the best so far) on
    the forward + backward of the Pallas core at ``[batch, seq_len, heads, K / V]`` and caches
    the winner for ``(device, K, V, chunk_size, dtype)``; ``persist`` also writes it to
    ``CACHE_FILE``. ``K, V`` are the head sizes as passed to the op. Needs a GPU."""
    from qdelta_jax.pallas import core

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
    key = _key(K, V, C, dtype)
    _MEMORY[key] = best
    if persist:
        CACHE_FILE.parent.mkdir(parents=True, exist_ok=True)
        data = _read_file(CACHE_FILE)
        data[key] = best.to_dict()
        CACHE_FILE.write_text(json.dumps(data, indent=1, sort_keys=True))
    return best
