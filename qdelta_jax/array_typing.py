"""The one legend of dimension letters, and the array aliases built from it.

Every shape in ``qdelta_jax`` and its kernels (``qdelta_jax.pallas``) is written with these
letters: ``[B, T, H, K]`` in docstrings, ``Float[Array, "B T H K"]`` in signatures. A letter
names the same size in every module.

======  =============================================================================
letter  size
======  =============================================================================
B       batch: rows of tokens
T       time: tokens per row in one call (a one-token decoding step has ``T == 1``)
H       query and key heads
HV      value heads (``num_v_heads``), a multiple of H; ``HV == H`` unless they are grouped.
        The op repeats q and k to HV heads, so past it (the reference, the chunked form,
        the kernels) H counts value heads
K       query and key head dim
V       value head dim
N       sequences: entries of ``initial_state`` and ``final_state`` (``B``, or ``B S`` for
        packed documents)
S       documents per packed row (``cu_seqlens [B, S + 1]``)
C       chunk length of the chunked paths (``chunk_size``)
NC      chunks per row of a chunk layout
Tp      a row padded to whole chunks, ``NC C``
D       model width (``hidden_size``)
F       MLP width (``intermediate_size``)
W       short-conv width (``conv_size``); its cache holds ``W - 1`` inputs
E       channels of one short conv: ``H*K`` for q and k, ``HV*V`` for v
L       layers (``num_hidden_layers``): the leading axis of scanned blocks and their cache
P       prompt length (:func:`qdelta_jax.generation.generate`)
M       tokens of a batch flattened over its leading axes (the chunked loss)
BK, BV  kernel tiles of K and V
vocab   vocabulary size
======  =============================================================================

Products are written with ``*`` (``H*K``), one more with ``+ 1`` (``S+1``). ``...`` is any
number of leading axes.

Names that are not sizes. The recurrence and the chunk math (docs/MATH.md) name matrices with
capitals too, after the paper and fla: the state ``S [K, V]``, the chunk's ``A``,
``T = (I + A)^-1``, ``W = T (beta gamma X)``, ``U = T (beta V)``, the per-token writes
``D = U - W h`` and the cumulative log decay ``G``. They appear in formulas and as variables of
:mod:`qdelta_jax.xla` and the kernels, never inside a shape; inside ``[...]`` a letter always
has the meaning above.
"""

from __future__ import annotations

from jaxtyping import Array, Bool, Float, Int

#: ``q``, ``k`` of the op: ``[B, T, H, K]``.
QK = Float[Array, "B T H K"]
#: ``v`` and ``o`` of the op: ``[B, T, HV, V]``.
Values = Float[Array, "B T HV V"]
#: Per-token, per-head scalars of the op: ``g``, ``beta``, ``lam``: ``[B, T, HV]``.
HeadScalars = Float[Array, "B T HV"]
#: Recurrent states, one per sequence: ``[N, HV, K, V]`` float32.
States = Float[Array, "N HV K V"]
#: Packed-document offsets: ``[N + 1]`` for one row, or ``[B, S + 1]`` per row.
Offsets = Int[Array, " N+1"] | Int[Array, "B S+1"]
#: Per-row packed-document offsets: ``[B, S + 1]``.
RowOffsets = Int[Array, "B S+1"]
#: Token ids: ``[B, T]``.
Tokens = Int[Array, "B T"]
#: Per-token flags (True: a real token): ``[B, T]``.
TokenMask = Bool[Array, "B T"]
#: The residual stream: ``[B, T, D]``.
Hidden = Float[Array, "B T D"]
#: Logits: ``[B, T, vocab]`` float32.
Logits = Float[Array, "B T vocab"]
#: One decoding state per row and value head: ``[B, HV, K, V]`` float32.
RowStates = Float[Array, "B HV K V"]
#: A short conv's cache of the last ``W - 1`` inputs: ``[B, W-1, E]``.
ConvCache = Float[Array, "B W-1 E"]
#: Per-chunk flags of a chunk layout: ``[B, NC]``.
ChunkFlags = Bool[Array, "B NC"]
