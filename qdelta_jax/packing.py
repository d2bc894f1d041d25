"""Packed documents: the one place where document offsets are checked and turned into layouts.

A batch of documents packed into rows is described by ``cu_seqlens``, fla's convention of
cumulative offsets, in one of two forms:

* ``[N + 1]`` with batch size 1: the N documents of one packed row (``initial_state`` and
  ``final_state`` have one entry per document, ``[N, H, K, V]``);
* ``[B, S + 1]``: per-row offsets, every row starting at 0 and ending at T, non-decreasing (pad a
  row with fewer documents by repeating T). Document ``s`` of row ``b`` is state entry
  ``n = b S + s`` (``[B S, H, K, V]``).

The state resets at every offset. Empty documents (repeated offsets) are allowed; they pass their
initial state through as their final state.

:func:`documents` checks the offsets once and derives, once, what the op, the layer, the model,
the reference and the chunk layouts read: a :class:`Documents` (the offsets as rows, each
position's document id and its document's start and end). Each of them takes either raw offsets
or a :class:`Documents`, which passes through unchecked and unchanged; so a model checks its
``cu_seqlens`` once however many layers it has.

Two chunk layouts serve the chunked paths (:func:`make_layout`):

* **row-aligned** (no states in or out): chunks of C tokens tile each row as they would without
  packing (``ceil(T / C)`` chunks per row, whatever the number of documents). A document
  boundary may fall inside a chunk; the per-token document id ``seg`` tells the kernels where, so
  that no decay, intra-chunk term or carried state crosses it. No token moves.
* **per-document** (``initial_state`` given or ``output_final_state``): every document starts on
  a chunk boundary and its last chunk ends it (``ceil(len / C)`` chunks per document), so the
  state entering and leaving each document is a chunk-entry or chunk-exit state. Tokens are
  scattered into that layout and gathered back.

Both are exact; the row-aligned one does no scatter, no gather and no extra chunks. Shapes use
the letters of :mod:`qdelta_jax.array_typing`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int


def _fmt(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def check_offsets(cu_seqlens, B: int, T: int) -> Int[Array, "..."]:
    """Checks ``cu_seqlens`` (``[N + 1]`` with ``B == 1``, or ``[B, S + 1]``) and returns it as
    int32. Values are checked when they are concrete (not traced): they start at 0, do not
    decrease and end at ``T``. Raises ``TypeError`` / ``ValueError`` naming ``cu_seqlens``."""
    if isinstance(cu_seqlens, (list, tuple)):
        cu_seqlens = np.asarray(cu_seqlens)
    if not hasattr(cu_seqlens, "shape") or not hasattr(cu_seqlens, "dtype"):
        raise TypeError(
            f"cu_seqlens must be an integer array of offsets, got {type(cu_seqlens).__name__}"
        )
    if not jnp.issubdtype(jnp.result_type(cu_seqlens), jnp.integer):
        raise TypeError(f"cu_seqlens must have an integer dtype, got {cu_seqlens.dtype}")
    if cu_seqlens.ndim == 1:
        if B != 1:
            raise ValueError(
                f"a 1-D cu_seqlens [N+1] packs documents into one row, so the batch size must "
                f"be 1 (shape [1, T, H, K]); got batch size {B}. Pass per-row offsets of shape "
                f"[B, S+1] instead"
            )
        if cu_seqlens.shape[0] < 2:
            raise ValueError(
                f"cu_seqlens must hold N+1 >= 2 offsets, got shape {_fmt(cu_seqlens.shape)}"
            )
    elif cu_seqlens.ndim == 2:
        if cu_seqlens.shape[0] != B or cu_seqlens.shape[1] < 2:
            raise ValueError(
                f"per-row cu_seqlens must have shape [B, S+1] = [{B}, S+1] with S >= 1, got "
                f"{_fmt(cu_seqlens.shape)}"
            )
    else:
        raise ValueError(
            f"cu_seqlens must have shape [N+1] (B == 1) or [B, S+1], got {_fmt(cu_seqlens.shape)}"
        )
    if not isinstance(cu_seqlens, jax.core.Tracer):
        cu = np.asarray(cu_seqlens).reshape(-1, cu_seqlens.shape[-1])
        if np.any(cu[:, 0] != 0):
            raise ValueError(f"cu_seqlens must start at 0 (every row), got {cu[:, 0].tolist()}")
        if np.any(np.diff(cu, axis=1) < 0):
            raise ValueError(f"cu_seqlens must be non-decreasing, got {cu.tolist()}")
        if np.any(cu[:, -1] != T):
            raise ValueError(
                f"cu_seqlens must end at the sequence length T = {T} (pad rows by repeating T), "
                f"got {cu[:, -1].tolist()}"
            )
    return jnp.asarray(cu_seqlens).astype(jnp.int32)


def num_states(cu: Array) -> int:
    """How many documents (state entries) offsets ``cu`` describe: ``N`` or ``B S``."""
    return cu.shape[0] - 1 if cu.ndim == 1 else cu.shape[0] * (cu.shape[1] - 1)


def as_rows(cu: Array) -> Int[Array, "B S+1"]:
    """Offsets as ``[B, S + 1]`` (a 1-D ``[N + 1]`` becomes one row)."""
    return cu[None] if cu.ndim == 1 else cu


def doc_ids(cu: Int[Array, "B S+1"], T: int) -> Int[Array, "B T"]:
    """The document index ``s`` of every position ``t < T`` of each row (empty documents own no
    position). Positions at or past the row's end get the last document."""
    t = jnp.arange(T, dtype=jnp.int32)
    S = cu.shape[1] - 1

    def row(c):
        return jnp.clip(jnp.searchsorted(c, t, side="right") - 1, 0, S - 1).astype(jnp.int32)

    return jax.vmap(row)(cu)


def one_row(cu: Int[Array, "B S+1"], T: int) -> Int[Array, " B*S+1"]:
    """Per-row offsets as the offsets of the same documents in one row of ``B T`` tokens (row
    ``b`` shifted by ``b T``): document ``s`` of row ``b`` becomes document ``b S + s``."""
    B = cu.shape[0]
    shifted = cu[:, :-1] + (jnp.arange(B, dtype=jnp.int32) * T)[:, None]
    return jnp.concatenate([shifted.reshape(-1), jnp.full((1,), B * T, jnp.int32)])


class Documents(NamedTuple):
    """Packed documents of ``B`` rows of ``T`` tokens: the checked offsets and what every user of
    them needs, derived once (:func:`documents`).

    A 1-D ``[N + 1]`` (``B == 1``) is the one row ``[1, N + 1]``: document ``s`` of row ``b`` is
    state entry ``b S + s`` in both forms. A pytree of arrays, each with the batch as its leading
    axis, so it passes through ``jit``, ``vmap``, ``lax.scan`` and a ``shard_map`` over the batch
    unchanged; the model builds it once and every layer, the op, the reference and the chunk
    layouts read it.

    ``offsets [B, S + 1]`` int32; per position ``t`` of each row: ``ids`` the document index
    ``s`` (past the row's end: the last document), ``starts`` and ``ends`` the half-open range
    ``[starts, ends)`` of that document, all ``[B, T]`` int32."""

    offsets: Int[Array, "B S+1"]
    ids: Int[Array, "B T"]
    starts: Int[Array, "B T"]
    ends: Int[Array, "B T"]

    @property
    def num_states(self) -> int:
        """How many documents (state entries): ``B S``."""
        return num_states(self.offsets)


def documents(cu_seqlens, B: int, T: int) -> Documents:
    """Checks packed-document offsets once (:func:`check_offsets`: ``[N + 1]`` with ``B == 1``,
    or ``[B, S + 1]``) and derives their :class:`Documents`. A :class:`Documents` already made
    for ``B`` rows of ``T`` tokens is returned as it is (the one representation passed down);
    one made for another shape raises ``ValueError`` naming ``cu_seqlens``."""
    if isinstance(cu_seqlens, Documents):
        if cu_seqlens.offsets.shape[0] != B or cu_seqlens.ids.shape[1] != T:
            raise ValueError(
                f"cu_seqlens (packing.Documents) describes {cu_seqlens.offsets.shape[0]} rows "
                f"of {cu_seqlens.ids.shape[1]} tokens; the inputs have B = {B}, T = {T}"
            )
        return cu_seqlens
    return _derive(as_rows(check_offsets(cu_seqlens, B, T)), T)


def _derive(rows: Int[Array, "B S+1"], T: int) -> Documents:
    ids = doc_ids(rows, T)
    return Documents(rows, ids, jnp.take_along_axis(rows, ids, axis=1),
                     jnp.take_along_axis(rows, ids + 1, axis=1))


# ----------------------------------------------------------------------------- chunk layouts


class ChunkMeta(NamedTuple):
    """Per-chunk bookkeeping, each ``[B, NC]``: the state entering the chunk is ``h0[seq]``
    (``reset``), the state leaving it is the final state of sequence ``seq`` (``is_last``)."""

    reset: Bool[Array, "B NC"]
    is_last: Bool[Array, "B NC"]
    seq: Int[Array, "B NC"]


class Layout(NamedTuple):
    """How ``[B, T]`` tokens map onto ``[B, Tp]`` chunked rows (``Tp`` a multiple of C).

    ``pos`` (per-document layout only): the padded position of each token of the single row.
    ``seg`` (row-aligned packed layout only): ``[B, Tp]`` int32 document id of every position;
    ``None`` when every chunk lies inside one document."""

    meta: ChunkMeta
    pos: Int[Array, " T"] | None
    seg: Int[Array, "B Tp"] | None
    Tp: int


def row_aligned_meta(seg: Int[Array, "B Tp"], C: int) -> ChunkMeta:
    """The chunk bookkeeping of the row-aligned layout from its document ids: the state resets
    (to the one zero entry) where a document starts exactly at a chunk, no final state is
    written."""
    B, Tp = seg.shape
    prev = jnp.concatenate([jnp.full((B, 1), -1, jnp.int32), seg[:, C - 1:-1:C]], axis=1)
    zeros = jnp.zeros((B, Tp // C), jnp.int32)
    return ChunkMeta(seg[:, ::C] != prev, zeros.astype(bool), zeros)


def make_layout(B: int, T: int, C: int, cu_seqlens: Documents | Array | None = None, *,
                per_document: bool = True) -> Layout:
    """The chunk layout of ``B`` rows of ``T`` tokens in chunks of ``C``.

    ``cu_seqlens``: :class:`Documents`, or offsets that :func:`documents` takes. With offsets,
    ``per_document=True`` gives the per-document layout (one row: ``B == 1``) and ``False`` the
    row-aligned one (any rows; then ``h0`` has one entry, zero, and no final state is
    written)."""
    NC = -(-T // C)
    c = jnp.arange(NC, dtype=jnp.int32)
    if cu_seqlens is None:
        reset = jnp.broadcast_to(c == 0, (B, NC))
        is_last = jnp.broadcast_to(c == NC - 1, (B, NC))
        seq = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, NC))
        return Layout(ChunkMeta(reset, is_last, seq), None, None, NC * C)
    docs = documents(cu_seqlens, B, T)
    S = docs.offsets.shape[1] - 1
    if not per_document:
        # Positions past T (padding to whole chunks) belong to the last document, as in ids.
        seg = jnp.pad(docs.ids, ((0, 0), (0, NC * C - T)), constant_values=S - 1)
        return Layout(row_aligned_meta(seg, C), None, seg, NC * C)
    if B != 1:
        raise ValueError("the per-document layout takes one row (B == 1); lay rows out one by one")
    cu, tok_seq = docs.offsets[0], docs.ids[0]
    N = S
    # Every sequence rounds up to whole chunks: at most (T + N (C - 1)) / C chunks in all.
    NC = max(1, (T + N * (C - 1)) // C)
    lengths = cu[1:] - cu[:-1]
    nchunks = (lengths + C - 1) // C
    start = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(nchunks)[:-1]]).astype(jnp.int32)
    t = jnp.arange(T, dtype=jnp.int32)
    pos = t - docs.starts[0] + start[tok_seq] * C
    c = jnp.arange(NC, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(start, c, side="right") - 1, 0, N - 1).astype(jnp.int32)
    nonempty = nchunks[seq] > 0
    reset = (c == start[seq]) & nonempty
    is_last = (c == start[seq] + nchunks[seq] - 1) & nonempty
    return Layout(ChunkMeta(reset[None], is_last[None], seq[None]), pos, None, NC * C)


def to_padded(x: Array, layout: Layout) -> Array:
    """``[B, T, ...] -> [B, Tp, ...]`` with zeros in pad positions."""
    T = x.shape[1]
    if layout.pos is None:
        pad = [(0, 0)] * x.ndim
        pad[1] = (0, layout.Tp - T)
        return jnp.pad(x, pad)
    out = jnp.zeros((1, layout.Tp) + x.shape[2:], x.dtype)
    return out.at[:, layout.pos].set(x)


def from_padded(x: Array, layout: Layout, T: int) -> Array:
    if layout.pos is None:
        return x[:, :T]
    return x[:, layout.pos]


def chunk_cumsum(g: Array, C: int, seg: Array | None = None) -> Array:
    """``G [B, Tp, H]`` (float32): the inclusive cumulative sum of ``g [B, Tp, H]`` within each
    chunk of ``C`` steps, restarting where the document id ``seg [B, Tp]`` changes.

    The restart is a segmented scan, not a difference of running sums: a long or steep document
    earlier in the chunk does not cost the next one precision."""
    B, Tp, H = g.shape
    # float32, or float64 for float64 inputs (the finite-difference gradient checks).
    g = g.astype(jnp.promote_types(g.dtype, jnp.float32)).reshape(B, Tp // C, C, H)
    if seg is None:
        return jnp.cumsum(g, axis=2).reshape(B, Tp, H)
    s = seg.reshape(B, Tp // C, C)
    new = jnp.concatenate([jnp.ones_like(s[..., :1], bool), s[..., 1:] != s[..., :-1]], -1)
    new = jnp.broadcast_to(new[..., None], g.shape)

    def combine(a, b):
        (va, fa), (vb, fb) = a, b
        return jnp.where(fb, vb, va + vb), fa | fb

    G, _ = jax.lax.associative_scan(combine, (g, new), axis=2)
    return G.reshape(B, Tp, H)
