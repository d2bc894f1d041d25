"""The LM head and the next-token cross-entropy in one chunked pass
(:func:`chunked_cross_entropy`): the ``[B, T, vocab]`` logits never exist at once."""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

F32 = jnp.float32


# Tokens per chunk of the LM head + cross-entropy: the [chunk, vocab] float32 logits of one chunk
# (512 MiB at a 32000 vocabulary) are the most that ever exists.
LOSS_CHUNK_TOKENS = 4096


def _ce_chunks(h, w, targets, mask, chunk, dtype, with_correct, with_grads):
    """Scans ``chunk`` tokens at a time: the per-token nll (not masked), the masked correct
    count and, ``with_grads``, the gradients of the masked nll sum with respect to ``h``
    and ``w``."""
    M, D = h.shape
    n = -(-M // chunk)
    pad = n * chunk - M

    def chunks(a):
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape(n, chunk, *a.shape[1:])

    wc = w.astype(dtype)
    vocab = w.shape[1]

    def body(dw, xs):
        x, t, m = xs
        x = x.astype(dtype)
        logits = jnp.dot(x, wc, preferred_element_type=F32)  # [chunk, vocab]
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        nll = lse - picked
        correct = (jnp.sum((jnp.argmax(logits, axis=-1) == t) * m) if with_correct
                   else jnp.zeros((), F32))
        if not with_grads:
            return dw, (nll, correct, None)
        # d nll / d logits = softmax - onehot(target), times the mask.
        dlogits = (jnp.exp(logits - lse[:, None])
                   - (jnp.arange(vocab)[None, :] == t[:, None])) * m[:, None]
        dlogits = dlogits.astype(dtype)
        dx = jnp.dot(dlogits, wc.T, preferred_element_type=F32).astype(h.dtype)
        dw = dw + jax.lax.dot_general(x, dlogits, (((0,), (0,)), ((), ())),
                                      preferred_element_type=F32)
        return dw, (nll, correct, dx)

    dw0 = jnp.zeros((D, vocab), F32) if with_grads else None
    dw, (nll, correct, dx) = jax.lax.scan(body, dw0, (chunks(h), chunks(targets),
                                                      chunks(mask.astype(F32))))
    nll = nll.reshape(-1)[:M]
    if with_grads:
        dx = dx.reshape(n * chunk, D)[:M]
    return nll, jnp.sum(correct), dx, dw


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked_ce(h, w, targets, mask, chunk, dtype, with_correct):
    nll, correct, _, _ = _ce_chunks(h, w, targets, mask, chunk, dtype, with_correct, False)
    return jnp.sum(nll * mask), correct


def _chunked_ce_fwd(h, w, targets, mask, chunk, dtype, with_correct):
    # The loss is a scalar, so its gradients are computed with it, while each chunk's logits
    # exist, and the backward pass only scales them by the incoming cotangent. The weight's
    # gradient stays float32 until then: summed over chunks, it would lose bits in bfloat16.
    nll, correct, dx, dw = _ce_chunks(h, w, targets, mask, chunk, dtype, with_correct, True)
    w_like = jnp.zeros((0,), w.dtype)  # carries w's dtype to the backward pass
    return (jnp.sum(nll * mask), correct), (nll, dx, dw, w_like)


def _chunked_ce_bwd(chunk, dtype, with_correct, res, cts):
    del chunk, dtype, with_correct
    nll, dx, dw, w_like = res
    g = cts[0].astype(F32)  # the correct count has no gradient
    return ((g * dx.astype(F32)).astype(dx.dtype), (g * dw).astype(w_like.dtype), None,
            g * nll)


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)


def chunked_cross_entropy(
    h: Float[Array, "... D"],
    w: Float[Array, "D vocab"],
    targets: Int[Array, "..."],
    mask: Float[Array, "..."],
    *,
    compute_dtype=None,
    chunk_tokens: int = LOSS_CHUNK_TOKENS,
    return_correct: bool = False,
):
    """The LM head and the masked cross-entropy in one pass over chunks of tokens.

    ``sum(mask * (logsumexp(h @ w) - (h @ w)[target]))`` with the matmul in ``compute_dtype``
    (default ``h``'s dtype) accumulated in float32, as the model's logits are; computed
    ``chunk_tokens`` tokens at a time (a ``lax.scan``), so only one chunk's ``[chunk, vocab]``
    float32 logits exist at once, never all ``[..., vocab]``. A ``custom_vjp`` computes the
    gradients chunk by chunk in the same pass (one matmul for the logits, one each for ``dh``
    and ``dw``: no recomputation in the backward pass).

    Args:
      h: ``[..., D]`` final hidden states (after the final norm).
      w: ``[D, vocab]`` the output projection, any float dtype (its gradient has that dtype and
        is summed over chunks in float32).
      targets: ``[...]`` integer ids in ``[0, vocab)``.
      mask: ``[...]`` weights of the positions (0 or 1), cast to float32.
      return_correct: also count the masked positions whose argmax is the target (an argmax
        over the vocabulary per token: leave it off when the count is not used).

    Returns:
      ``nll_sum`` (float32 scalar), or ``(nll_sum, correct_sum)`` with ``return_correct``.

    Raises:
      ValueError: for shapes that do not match, or ``chunk_tokens`` not a positive integer.
      TypeError: for non-integer ``targets``.
    """
    if h.ndim < 2 or w.ndim != 2 or w.shape[0] != h.shape[-1]:
        raise ValueError(f"h must be [..., D] and w [D, vocab] with the same D, got h "
                         f"{list(h.shape)} and w {list(w.shape)}")
    lead = tuple(h.shape[:-1])
    if tuple(targets.shape) != lead or tuple(mask.shape) != lead:
        raise ValueError(f"targets and mask must have h's leading shape {list(lead)}, got "
                         f"{list(targets.shape)} and {list(mask.shape)}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(f"targets must be integer token ids, got {targets.dtype}")
    if not isinstance(chunk_tokens, (int, np.integer)) or isinstance(chunk_tokens, bool) or (
            chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    M = math.prod(lead)
    dtype = jnp.dtype(compute_dtype if compute_dtype is not None else h.dtype)
    with jax.named_scope("lm_head_loss"):  # the name profiles of the train step look for
        nll, correct = _chunked_ce(h.reshape(M, h.shape[-1]), w, targets.reshape(M),
                                   mask.reshape(M).astype(F32),
                                   int(min(chunk_tokens, max(M, 1))), dtype,
                                   bool(return_correct))
    return (nll, correct) if return_correct else nll
