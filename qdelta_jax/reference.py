"""The Q-Delta recurrence, one token at a time: the definition every fast path is tested against.

Shapes use the letters of :mod:`qdelta_jax.array_typing` (B batch, T time, H heads, K, V head
dims, N sequences, S documents per row). Per batch element and head, with the state ``S`` (the
matrix of the math, not the letter of shapes) of shape ``[K, V]`` (key-major, as in
flash-linear-attention; the paper writes the transpose)::

    x_t = k_t + lam_t * q_t               # mixed key-query read vector
    S   = exp(g_t) * S                    # decay
    e_t = v_t - S^T x_t                   # mixed prediction error        [V]
    S   = S + beta_t * k_t e_t^T          # delta-rule write along k
    o_t = scale * S^T q_t                 # read-out after the update

``qdelta_step`` is that update for one token; it is shared by the scan below and by the
decoding path of :mod:`qdelta_jax.model`, so there is exactly one copy of the math.

Everything here runs in float32 with ``precision=HIGHEST`` (on GPUs XLA's default float32
matmul is TF32, which is not exact enough for a reference).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from qdelta_jax import packing

HIGHEST = lax.Precision.HIGHEST


def l2_normalize(x: Array, eps: float = 1e-6) -> Array:
    """``x / sqrt(sum(x**2) + eps)`` over the last axis, computed in float32."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def qdelta_step(
    q: Float[Array, "... K"],
    k: Float[Array, "... K"],
    v: Float[Array, "... V"],
    g: Float[Array, "..."],
    beta: Float[Array, "..."],
    lam: Float[Array, "..."],
    *,
    scale: float,
    state: Float[Array, "... K V"],
) -> tuple[Float[Array, "... V"], Float[Array, "... K V"]]:
    """One token of the recurrence for any leading batch axes (``q``, ``k`` already normalised).

    Arguments and results in the order of :func:`qdelta_jax.ops.qdelta_rule`: the inputs
    ``q, k, v, g, beta, lam`` positionally, ``scale`` and the incoming ``state`` by keyword;
    returns ``(o, new_state)``, both float32 (float64 for float64 inputs).
    """
    f32 = jnp.promote_types(q.dtype, jnp.float32)  # float64 stays float64 (gradient checks)
    state = state.astype(f32)
    q, k, v = q.astype(f32), k.astype(f32), v.astype(f32)
    g, beta, lam = g.astype(f32), beta.astype(f32), lam.astype(f32)
    x = k + lam[..., None] * q
    s = jnp.exp(g)[..., None, None] * state
    pred = jnp.einsum("...kv,...k->...v", s, x, precision=HIGHEST)
    err = v - pred
    s = s + beta[..., None, None] * (k[..., :, None] * err[..., None, :])
    o = scale * jnp.einsum("...kv,...k->...v", s, q, precision=HIGHEST)
    return o, s


def qdelta_scan(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T H K"],
    v: Float[Array, "B T H V"],
    g: Float[Array, "B T H"],
    beta: Float[Array, "B T H"],
    lam: Float[Array, "B T H"],
    *,
    scale: float,
    initial_state: Float[Array, "N H K V"] | None = None,
    cu_seqlens: Int[Array, " N+1"] | Int[Array, "B S+1"] | packing.Documents | None = None,
) -> tuple[Float[Array, "B T H V"], Float[Array, "N H K V"]]:
    """The recurrence as a ``jax.lax.scan`` over time (``q``, ``k`` already normalised).

    Without ``cu_seqlens`` each batch row is one sequence (``N = B``). With ``cu_seqlens``
    (offsets as :func:`qdelta_jax.packing.documents` takes them, or its
    :class:`~qdelta_jax.packing.Documents`) the state resets to ``initial_state[n]`` (or zero)
    where document ``n`` starts (``n = b S + s`` for document ``s`` of row ``b``).
    Returns float32 outputs and float32 final states ``[N, H, K, V]``.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    f32 = jnp.promote_types(q.dtype, jnp.float32)
    if cu_seqlens is None:
        h0 = jnp.zeros((B, H, K, V), f32) if initial_state is None else initial_state.astype(f32)
        xs = [jnp.moveaxis(a, 1, 0) for a in (q, k, v, g, beta, lam)]

        def body(s, inp):
            o, s = qdelta_step(*inp, scale=scale, state=s)
            return s, o

        final, o = lax.scan(body, h0, xs)
        return jnp.moveaxis(o, 0, 1), final

    docs = packing.documents(cu_seqlens, B, T)
    S = docs.offsets.shape[1] - 1
    h0 = (jnp.zeros((B * S, H, K, V), f32) if initial_state is None
          else initial_state.astype(f32))
    t = jnp.arange(T, dtype=jnp.int32)

    def row(q, k, v, g, beta, lam, ids, starts, ends, h0):
        """One packed row: ``h0``, the final states ``[S, H, K, V]`` of its documents."""
        xs = [q, k, v, g, beta, lam, ids, t == starts, t == ends - 1]

        def body(carry, inp):
            s, finals = carry
            qt, kt, vt, gt, bt, lt, n, first, last = inp
            s = jnp.where(first, h0[n], s)
            o, s = qdelta_step(qt, kt, vt, gt, bt, lt, scale=scale, state=s)
            finals = finals.at[n].set(jnp.where(last, s, finals[n]))
            return (s, finals), o

        # Empty documents keep their initial state as the final state.
        (_, finals), o = lax.scan(body, (jnp.zeros((H, K, V), f32), h0), xs)
        return o, finals

    o, finals = jax.vmap(row)(q, k, v, g, beta, lam, docs.ids, docs.starts, docs.ends,
                              h0.reshape((B, S) + h0.shape[1:]))
    return o, finals.reshape((B * S,) + finals.shape[2:])
