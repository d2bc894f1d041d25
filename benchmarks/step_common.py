"""Pieces shared by the training-step benchmarks (``profile_step.py``, ``crossover.py``).

* :func:`random_text`: a token stream of random ids with end-of-document tokens, so that the
  trainer's own :class:`qdelta_jax.train.data.TextData` packs it into rows with ``cu_seqlens``
  exactly as it packs real text (the cost of the step does not depend on which ids they are).
* :func:`make_session`: the trainer's :class:`qdelta_jax.train.trainer.Session` (model, AdamW,
  mesh) for a preset, and :func:`compile_step`: its train step compiled ahead of time, so that
  the program that is timed or profiled is the one whose HLO text is read.
* :func:`scoped_op`: puts ``qdelta_rule`` under a named scope (for the profile) and, with
  ``stand_in``, replaces ``qdelta_rule`` by an elementwise function of the same inputs and
  output, to measure what the step costs around the op.
* :func:`time_steps`, :func:`peak_bytes`: step timing and device memory.
"""

from __future__ import annotations

import contextlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from qdelta_jax import ops
from qdelta_jax.model import PRESETS
from qdelta_jax.train import data as data_mod
from qdelta_jax.train import loop, trainer
from qdelta_jax.train import sharding as shd

EOS = 0


def random_text(n_tokens: int, vocab: int, mean_doc_len: int = 2048,
                seed: int = 0) -> np.ndarray:
    """``n_tokens`` uniform ids in ``[1, vocab)`` with ``EOS`` (0) ending documents whose
    lengths are geometric with mean ``mean_doc_len``."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, size=n_tokens, dtype=np.int64).astype(np.int32)
    tokens[rng.random(n_tokens) < 1.0 / mean_doc_len] = EOS
    return tokens


def make_session(preset: str, batch: int, seq_len: int, *, dtype: str = "bfloat16",
                 param_dtype: str = "float32", implementation: str | None = None,
                 model_overrides: str | None = None, packed: bool = True, seed: int = 0):
    """``(session, source)``: the trainer's Session for ``preset`` on random packed text
    (``packed=False``: rows without document boundaries) and the batch source."""
    vocab = PRESETS[preset]["vocab_size"]
    args = trainer.TrainArgs(preset=preset, task="text", batch_size=batch, seq_len=seq_len,
                             dtype=dtype, param_dtype=param_dtype,
                             implementation=implementation, model_overrides=model_overrides,
                             steps=1000, warmup=10, lr=1e-3, seed=seed)
    cfg = trainer.model_config_for(args, vocab, True)
    # Enough rows for the training batches and the held-out evaluation rows TextData sets aside.
    n_rows = batch * 8 + 2 * batch
    tokens = random_text(n_rows * seq_len + 1, cfg.vocab_size, seed=seed)
    source = data_mod.TextData(tokens, EOS if packed else None, batch, seq_len, seed=seed)
    return trainer.Session(args, cfg, shd.make_mesh(None)), source


def batch_arrays(source, index: int, packed: bool = True) -> dict:
    b = source.batch(index)
    if not packed:
        b.pop("cu_seqlens", None)
    return b


def jitted_step(sess, batch, *, accuracy: bool = False):
    """The session's train step, jitted with its shardings and donation as
    :meth:`Session.train_step` does (not yet lowered)."""
    fn = loop.make_train_step(sess.fns, sess.tx, sess.args.grad_accum, None, accuracy)
    return jax.jit(
        fn,
        in_shardings=(sess.state_shardings, {k: sess.batch_sharding for k in batch}),
        out_shardings=(sess.state_shardings, sess.repl),
        donate_argnums=0,
    )


def compile_step(sess, state, batch, *, accuracy: bool = False):
    """``(compiled, compile_seconds)``: :func:`jitted_step` lowered and compiled ahead of
    time."""
    jitted = jitted_step(sess, batch, accuracy=accuracy)
    t0 = time.perf_counter()
    with jax.set_mesh(sess.mesh):
        compiled = jitted.lower(state, batch).compile()
    return compiled, time.perf_counter() - t0


def time_steps(compiled, state, batches: list, n: int):
    """Runs ``n`` steps back to back (cycling over ``batches``), one synchronisation at the end;
    returns ``(state, seconds per step, last metrics)``."""
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    metrics = None
    for i in range(n):
        state, metrics = compiled(state, batches[i % len(batches)])
    jax.block_until_ready((state, metrics))
    return state, (time.perf_counter() - t0) / max(n, 1), metrics


def memory_analysis(compiled) -> dict:
    """XLA's compiled memory analysis in bytes (``temp``, ``args``, ``out``), when reported."""
    try:
        m = compiled.memory_analysis()
        return {"temp": int(m.temp_size_in_bytes), "args": int(m.argument_size_in_bytes),
                "out": int(m.output_size_in_bytes)}
    except Exception:  # noqa: BLE001 -- not every backend reports it
        return {}


def peak_bytes() -> int | None:
    """The first device's peak bytes in use since the process started (None where the backend
    keeps no statistics, e.g. the CPU)."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001
        return None
    return stats.get("peak_bytes_in_use")


def _stand_in_rule(q, k, v, g, beta, lam, *, initial_state=None, output_final_state=False,
                   **_):
    # Reads every input once and writes o: the projections, gates and norms around the op keep
    # their forward and backward work, while the op itself costs a few elementwise passes.
    mix = jax.nn.sigmoid(g.astype(jnp.float32) + beta.astype(jnp.float32)
                         + lam.astype(jnp.float32))[..., None]
    qk = jnp.mean(q.astype(jnp.float32) * k.astype(jnp.float32), axis=-1, keepdims=True)
    o = (v.astype(jnp.float32) * mix + qk).astype(v.dtype)
    state = None
    if output_final_state:
        B, _, H, K = k.shape
        state = (jnp.zeros((B, H, K, v.shape[-1]), jnp.float32) if initial_state is None
                 else initial_state)
    return o, state


@contextlib.contextmanager
def scoped_op(stand_in: bool = False):
    """While active, ``qdelta_rule`` (as the layers call it, ``ops.qdelta_rule``) runs under the
    named scope ``qdelta_op``; with ``stand_in`` it is replaced by an elementwise function of
    the same inputs with the same output shape and dtype. Trace (lower) the step inside."""
    real = ops.qdelta_rule
    inner = _stand_in_rule if stand_in else real

    def rule(*args, **kwargs):
        with jax.named_scope("qdelta_op"):
            return inner(*args, **kwargs)

    ops.qdelta_rule = rule
    try:
        yield
    finally:
        ops.qdelta_rule = real

