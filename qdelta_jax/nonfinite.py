"""Non-finite inputs on the chunked paths: the same non-finite outputs and gradients as the scan
(``qdelta_rule(guard_nonfinite=True)``; off by default for its cost, see below).

Why this exists. The recurrence (:mod:`qdelta_jax.reference`) carries a NaN or inf forward in
time only: a non-finite ``q, k, v, g, beta`` or ``lam`` at token ``j`` spoils the outputs from
``j`` on, up to the end of its document, and nothing before ``j``. The chunked form does not: its
masked products (``(Q K^T o causal) D`` with ``D_j`` NaN) multiply a NaN by the zero of the mask,
and ``0 * NaN`` is NaN, so every earlier token of the chunk would turn NaN too. The chunked paths
therefore run on sanitised inputs (each non-finite element replaced by 0, so that the bad token
is harmless to the others) and put the non-finite values back where the scan has them.

Which values the scan spoils (per head and document; ``c`` a value column). A non-finite ``v``
element at ``(j, c)`` touches column ``c`` of the state only: outputs ``o_t[c]`` for ``t >= j``
and column ``c`` of the final state. A non-finite ``q, k, g, beta`` or ``lam`` at ``j`` spoils the
whole state: every output column from ``j`` on and the whole final state. ``g = -inf`` is finite
for this purpose: it is an exact reset (``exp(g) = 0``), in every implementation.

Gradients (of any loss over the outputs and final states) follow the scan's reverse pass. The
state gradient ``dS_t`` depends on the inputs after ``t`` (not on ``v``), the forward state on
the inputs up to ``t``; each token's input gradients combine the two, and :func:`_grad_masks`
spells out which of them is non-finite from the per-token flags. Where the scan's gradient is
finite it is a function of finite inputs only, which the sanitised run sees unchanged; so the
sanitising and the output poisoning pass cotangents straight through (``custom_vjp``), and the
gradient is NaN exactly where the scan's is. In the common all-finite case every mask is false:
the outputs and gradients are those of the chunked path, bit for bit.

Cost: the masks are built only when a call's outputs hold a non-finite value
(:func:`call`): the chunked path runs on the raw inputs first, and one reduction over ``o``
(and the final states) decides, by ``lax.cond``, whether to recompute the call on sanitised
inputs. A non-finite input always spoils at least its own token's output, so finite outputs
mean finite inputs, where the guarded and the plain results are the same. With all-finite
values the guard therefore costs that one reduction forward and one ``cond`` backward (each
branch writes the gradients; the masks and the second run exist only in the branch not
taken). Under ``vmap`` the ``cond`` becomes a select and both branches run. That is still not
free: on an H200 at the 340M layer (B8 T4096 H6 K128 V256 bf16, Pallas) the guarded forward
took 0.723 ms against 0.625 (1.072 against 0.816 with 32 packed documents a row) and
forward+backward 2.524 against 2.403, with 0.56 GiB more temporaries (the branch not taken
holds its own) and the kernels compiled twice; hence off by default.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool

from qdelta_jax import packing


@jax.custom_vjp
def _sanitize(x: Array, ok: Array, grad_nan: Array) -> Array:
    """``x`` where ``ok``, else 0; its cotangent passes through, NaN where ``grad_nan``."""
    return jnp.where(ok, x, jnp.zeros((), x.dtype))


def _sanitize_fwd(x, ok, grad_nan):
    return _sanitize(x, ok, grad_nan), grad_nan


def _sanitize_bwd(grad_nan, ct):
    return jnp.where(grad_nan, jnp.asarray(jnp.nan, ct.dtype), ct), None, None


_sanitize.defvjp(_sanitize_fwd, _sanitize_bwd)


@jax.custom_vjp
def _poison(x: Array, bad: Array) -> Array:
    """NaN where ``bad``, else ``x``; the cotangent passes through unchanged (the scan's value
    there is non-finite, but its gradient still flows into earlier finite inputs)."""
    return jnp.where(bad, jnp.asarray(jnp.nan, x.dtype), x)


def _poison_fwd(x, bad):
    return _poison(x, bad), None


def _poison_bwd(_, ct):
    return ct, None


_poison.defvjp(_poison_fwd, _poison_bwd)


def _finite_g(g: Array) -> Array:
    """``g`` is usable where it is not NaN and not ``+inf`` (``-inf`` is a reset)."""
    return ~jnp.isnan(g) & (g != jnp.inf)


class Guard(NamedTuple):
    """The masks of one call (from :func:`guard`); ``apply_inputs`` / ``apply_outputs`` use
    them."""

    grad_nan: dict  # per input: a mask broadcasting against it (True: gradient NaN)
    o_bad: Bool[Array, "B T H V"]
    final_bad: Bool[Array, "N H 1 V"]


def _doc_bounds(docs: packing.Documents | None, B: int, T: int):
    """``(start, end)`` ``[B, T]``: the half-open token range of each token's document (one
    document per row when unpacked)."""
    if docs is None:
        return jnp.zeros((B, T), jnp.int32), jnp.full((B, T), T, jnp.int32)
    return docs.starts, docs.ends


def _count_in(prefix: Array, lo: Array, hi: Array) -> Array:
    """Whether any flag is set in ``[lo, hi)`` per token: ``prefix [B, T + 1, H]`` holds the
    counts of set flags before each position, ``lo, hi [B, T]``."""
    at = lambda i: jnp.take_along_axis(prefix, i[..., None], axis=1)  # noqa: E731
    return at(hi) - at(lo) > 0


def _prefix(b: Array) -> Array:
    """``[B, T + 1, H]`` counts of set flags of ``b [B, T, H]`` before each position."""
    c = jnp.cumsum(b.astype(jnp.int32), axis=1)
    return jnp.concatenate([jnp.zeros_like(c[:, :1]), c], axis=1)


def _grad_masks(bq, bk, bv, bg, bbeta, blam, px, start, end) -> dict:
    """Per token ``[B, T, H]``: where the scan's gradient of each input is non-finite.

    Per head and document, with ``S_t`` the state after token ``t`` and ``dS_t`` its gradient:
    ``S_t`` is non-finite once any input at or before ``t`` is; ``dS_t`` is non-finite when
    ``q_t`` is, or any of ``q, k, g, beta, lam`` after ``t`` (the reverse step from ``t + 1``
    multiplies by ``exp(g)``, ``beta``, ``k`` and ``x = k + lam q``, never by ``v``). Each
    input's gradient at ``t`` is then non-finite where a factor of its formula is. ``px``:
    :func:`_prefix` of the flags that spoil the whole state (any of ``q, k, g, beta, lam``)."""
    T = bq.shape[1]
    t = jnp.arange(T, dtype=jnp.int32)[None, :]
    bx = bq | bk | blam  # x = k + lam q
    pa = _prefix(bx | bg | bbeta | bv)
    s_now = _count_in(pa, start, t + 1)  # S_t non-finite
    s_prev = _count_in(pa, start, t)  # S_{t-1} non-finite
    ds = bq | _count_in(px, jnp.minimum(t + 1, end), end)  # dS_t non-finite
    dpred = bbeta | bk | ds  # the gradient of the prediction S_{t-1}^T x_t
    dx = s_prev | bg | dpred
    err = bv | s_prev | bg | bx  # the error v_t - S_{t-1}^T x_t
    return {
        "q": s_now | dx | blam | bq,
        "k": dx | bbeta | ds | err | bk,
        "v": bbeta | bk | ds,
        "g": bg | s_prev | ds | bx | dpred,
        "beta": ds | bk | err,
        "lam": bq | dx,
    }


def guard(q, k, v, g, beta, lam, docs: packing.Documents | None = None) -> Guard:
    """The masks for raw op inputs (``[B, T, H, K]`` q, k; ``[B, T, H, V]`` v; ``[B, T, H]`` g,
    beta, lam) and their packed documents (:func:`qdelta_jax.packing.documents`)."""
    B, T, H = g.shape
    finite_vec = lambda x: jnp.all(jnp.isfinite(x), axis=-1)  # noqa: E731
    bq, bk = ~finite_vec(q), ~finite_vec(k)
    bad_v = ~jnp.isfinite(v)
    bv = jnp.any(bad_v, axis=-1)
    bg, bbeta, blam = ~_finite_g(g), ~jnp.isfinite(beta), ~jnp.isfinite(lam)
    start, end = _doc_bounds(docs, B, T)
    px = _prefix(bq | bk | bg | bbeta | blam)  # the flags that spoil the whole state
    grads = _grad_masks(bq, bk, bv, bg, bbeta, blam, px, start, end)
    grad_nan = {n: (m[..., None] if n in ("q", "k", "v") else m) for n, m in grads.items()}

    t = jnp.arange(T, dtype=jnp.int32)
    x_now = _count_in(px, start, jnp.broadcast_to(t + 1, (B, T)))  # [B, T, H]
    # The first non-finite v of every column in each document (T where there is none).
    first = jnp.where(bad_v, t[None, :, None, None], T)
    if docs is None:
        first_v = jnp.min(first, axis=1)  # [B, H, V], one per row
        v_now = t[None, :, None, None] >= first_v[:, None]
        doc_x = px[:, -1] > 0  # [B, H]
        doc_v = first_v < T
        grad_nan["h0"] = doc_x[:, :, None, None]
    else:
        rows = docs.offsets
        S = rows.shape[1] - 1
        ids = docs.ids + S * jnp.arange(B, dtype=jnp.int32)[:, None]
        first_v = jax.ops.segment_min(first.reshape((B * T,) + first.shape[2:]),
                                      ids.reshape(-1), num_segments=B * S,
                                      indices_are_sorted=True)  # [B S, H, V]
        v_now = t[None, :, None, None] >= first_v[ids]
        at = jnp.take_along_axis(px, rows[..., None], axis=1)  # [B, S + 1, H]
        doc_x = (at[:, 1:] - at[:, :-1] > 0).reshape(B * S, H)
        doc_v = first_v < T  # empty documents: no token, min of nothing is the dtype's max
        grad_nan["h0"] = doc_x[:, :, None, None]
    return Guard(grad_nan, x_now[..., None] | v_now, (doc_x[:, :, None] | doc_v)[:, :, None])


def apply_inputs(gd: Guard, q, k, v, g, beta, lam, initial_state):
    """The inputs with every non-finite element set to 0 (``g = -inf`` kept); their gradients
    NaN where the scan's are."""
    m = gd.grad_nan
    out = [_sanitize(x, jnp.isfinite(x), m[n]) for n, x in (("q", q), ("k", k), ("v", v))]
    out.append(_sanitize(g, _finite_g(g), m["g"]))
    out += [_sanitize(x, jnp.isfinite(x), m[n]) for n, x in (("beta", beta), ("lam", lam))]
    if initial_state is not None:
        initial_state = _sanitize(initial_state, True, m["h0"])
    return (*out, initial_state)


def apply_outputs(gd: Guard, o, final):
    """``o`` and ``final`` (or ``None``) with NaN where the scan's are non-finite."""
    o = _poison(o, gd.o_bad)
    if final is not None:
        final = _poison(final, gd.final_bad)
    return o, final


def _spoiled(out) -> Array:
    """Whether the outputs ``(o, final or None)`` hold a non-finite value (a scalar)."""
    return ~jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(out)]))


def call(run, q, k, v, g, beta, lam, initial_state, docs: packing.Documents | None):
    """``run(q, k, v, g, beta, lam, initial_state, docs) -> (o, final or None)`` with
    the scan's non-finite outputs and gradients (the module docstring): ``run`` on the raw
    inputs, and where its outputs are not all finite, ``run`` again on the sanitised inputs
    with the scan's spoiling put back (:func:`guard`, :func:`apply_inputs`,
    :func:`apply_outputs`). Gradients w.r.t. the seven float inputs; the documents get none."""
    x = (q, k, v, g, beta, lam, initial_state)

    def plain(x, cu):
        return run(*x, cu)

    def guarded(x, cu):
        gd = guard(*x[:6], cu)
        o, final = run(*apply_inputs(gd, *x), cu)
        return apply_outputs(gd, o, final)

    @jax.custom_vjp
    def f(x, cu):
        out = plain(x, cu)
        return lax.cond(_spoiled(out), lambda: guarded(x, cu), lambda: out)

    def f_fwd(x, cu):
        out, pull = jax.vjp(lambda x: plain(x, cu), x)
        bad = _spoiled(out)
        out = lax.cond(bad, lambda: guarded(x, cu), lambda: out)
        return out, (pull, x, cu, bad)

    def f_bwd(res, ct):
        pull, x, cu, bad = res
        dx = lax.cond(bad, lambda: jax.vjp(lambda x: guarded(x, cu), x)[1](ct)[0],
                      lambda: pull(ct)[0])
        return dx, None

    f.defvjp(f_fwd, f_bwd)
    return f(x, docs)
