"""Sampling from a :class:`qdelta_jax.lm.QDeltaLM`: :func:`generate`.

:func:`generate` is one jitted program (masked prefill, then a ``lax.while_loop`` over new
tokens that stops when every row has emitted ``eos_id``). Prompts of different lengths:
``prompt[b, :prompt_lengths[b]]`` is row b's prompt (right padding, the natural layout); rows
are moved to left padding internally and the pad positions are masked (zero conv input,
``beta = g = 0``), so the state after the prompt is what the unpadded prompt leaves and every
row generates what it would generate alone.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from qdelta_jax.lm import QDeltaLM, check_token_ids

F32 = jnp.float32


def _sample(logits: Float[Array, "B vocab"], key, temperature: float, top_k: int | None,
            top_p: float | None = None) -> Int[Array, " B"]:
    """Next tokens: argmax at temperature 0 (``key`` unused), else a draw from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens and to the
    nucleus: the most likely tokens whose more likely predecessors hold less than ``top_p`` of
    the probability (the most likely token always stays; ties at the edge stay together)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(F32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        edge = jnp.min(jnp.where(before < top_p, desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < edge, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p",
                                   "eos_id"))
def _generate(graphdef, state, prompt, lengths, rng, *, max_new_tokens, temperature, top_k,
              top_p, eos_id):
    model = nnx.merge(graphdef, state)
    B, P = prompt.shape
    n_new = max_new_tokens
    # Right padding -> left padding: row b's prompt ends at position P - 1.
    src = jnp.arange(P)[None, :] - (P - lengths[:, None])
    mask = src >= 0
    tokens = jnp.where(mask, jnp.take_along_axis(prompt, jnp.maximum(src, 0), axis=1), 0)
    logits, cache = model.step(tokens, model.init_cache(B), mask=mask)
    keys = jax.random.split(rng, n_new)
    sample = partial(_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    first = sample(logits[:, -1], keys[0])
    fill = 0 if eos_id is None else eos_id
    out = jnp.full((B, n_new), fill, jnp.int32).at[:, 0].set(first)
    done = jnp.zeros((B,), bool) if eos_id is None else first == eos_id

    def cond(carry):
        i, _, _, done, _, _ = carry
        return (i < n_new) & ~jnp.all(done)

    def body(carry):
        i, tok, cache, done, out, n = carry
        # Finished rows are masked: their state and conv caches stay as they are.
        live = None if eos_id is None else ~done[:, None]
        logits, cache = model.step(tok[:, None], cache, mask=live)
        nxt = jnp.where(done, fill, sample(logits[:, 0], keys[i]))
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        n = n + (~done).astype(jnp.int32)
        if eos_id is not None:
            done = done | (nxt == eos_id)
        return i + 1, nxt, cache, done, out, n

    init = (jnp.int32(1), first, cache, done, out, jnp.ones((B,), jnp.int32))
    _, _, _, _, out, n = jax.lax.while_loop(cond, body, init)
    return out, n


def generate(
    model: QDeltaLM,
    prompt: Int[Array, "B P"],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: jax.Array | None = None,
    prompt_lengths: Int[Array, " B"] | None = None,
    eos_id: int | None = None,
    return_lengths: bool = False,
):
    """Samples up to ``max_new_tokens`` tokens after each prompt; returns only the new tokens.

    One compiled program: a masked prefill (chunked op), then a ``lax.while_loop`` of one-token
    steps that ends when every row has emitted ``eos_id`` or after ``max_new_tokens`` tokens.

    Args:
      prompt: ``[B, P]`` int tokens in ``[0, vocab_size)``. Row b's prompt is
        ``prompt[b, :prompt_lengths[b]]`` (right padding; what follows is ignored). Internally
        rows are left-padded and the pad positions masked, so each row generates exactly what
        it would generate alone.
      max_new_tokens: >= 1.
      temperature: 0 means greedy (argmax; no ``rng`` needed); otherwise logits are divided by it.
      top_k: sample among the k most likely tokens only (``None``: all).
      top_p: nucleus sampling, in ``(0, 1]``: sample among the most likely tokens whose more
        likely predecessors hold less than ``top_p`` of the probability (``None`` or 1: all).
        With ``top_k`` too, the nucleus is taken of the top-k distribution.
      rng: a PRNG key, required when ``temperature > 0``.
      prompt_lengths: ``[B]`` ints in ``[1, P]`` (``None``: every row has length P).
      eos_id: end-of-sequence token: a row stops after emitting it (the token is kept, later
        positions hold ``eos_id``, and the row's state is no longer updated). ``None``: every
        row generates ``max_new_tokens``.
      return_lengths: also return the generated lengths ``[B]`` int32 (the number of tokens up
        to and including the row's first ``eos_id``; ``max_new_tokens`` for a row without one).

    Returns:
      ``tokens [B, max_new_tokens]`` int32, or ``(tokens, lengths)`` with ``return_lengths``.

    Raises:
      ValueError for an empty prompt, prompt ids outside the vocabulary, lengths outside
      ``[1, P]``, bad ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p`` or ``eos_id``,
      or a missing rng.
    """
    vocab = model.config.vocab_size
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must be an integer array [B, P], got {prompt.dtype} "
                         f"{list(prompt.shape)}")
    B, P = prompt.shape
    if P < 1:
        raise ValueError("prompt must hold at least one token (P >= 1)")
    check_token_ids(prompt, vocab, "prompt")
    if (not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool)
            or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer))
                              or not 1 <= top_k <= vocab):
        raise ValueError(f"top_k must be None or in [1, vocab_size], got {top_k!r}")
    if top_p is not None:
        top_p = float(top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be None or in (0, 1], got {top_p}")
    if eos_id is not None and (not isinstance(eos_id, (int, np.integer))
                               or not 0 <= eos_id < vocab):
        raise ValueError(f"eos_id must be None or in [0, vocab_size = {vocab}), got {eos_id!r}")
    if temperature > 0 and rng is None:
        raise ValueError("rng (a PRNG key) is required when temperature > 0")
    if rng is None:
        rng = jax.random.key(0)  # unused by greedy decoding
    if prompt_lengths is None:
        lengths = jnp.full((B,), P, jnp.int32)
    else:
        lengths = jnp.asarray(prompt_lengths)
        if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(f"prompt_lengths must be an integer array [B] = [{B}], got "
                             f"{lengths.dtype} {list(lengths.shape)}")
        if not isinstance(lengths, jax.core.Tracer):
            ln = np.asarray(lengths)
            if np.any(ln < 1) or np.any(ln > P):
                raise ValueError(
                    f"prompt_lengths must lie in [1, P = {P}] (empty prompts are not supported), "
                    f"got {ln.tolist()}"
                )
        lengths = lengths.astype(jnp.int32)
    graphdef, state = nnx.split(model)
    out, n = _generate(graphdef, state, prompt.astype(jnp.int32), lengths, rng,
                       max_new_tokens=int(max_new_tokens), temperature=temperature,
                       top_k=None if top_k is None else int(top_k),
                       top_p=None if top_p is None or top_p == 1.0 else top_p,
                       eos_id=None if eos_id is None else int(eos_id))
    return (out, n) if return_lengths else out
